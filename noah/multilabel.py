"""Multi-label classification with NOAH (MS-COCO, spec d.5 and j): the losses and the training object.

The paper's MS-COCO protocol is not published (spec k.1); the defaults here (sigmoid per class on NOAH's
logits unchanged, BCE, or the asymmetric loss of Ridnik et al., ICCV 2021) are assumptions, named in the
experiment files. The official code has none of this (GitHub issue #1). Evaluation (mAP, mean BCE, prevalence)
is common's ``common.tasks.MultiLabelTask``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021, eq. 7): ``-sum[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)]``, ``p_m = max(p-m, 0)``.

    Defaults are the ASL paper's MS-COCO values (gamma_neg 4, gamma_pos 0, clip 0.05); as in its reference
    code the focusing weight is a constant (no gradient through it) and the loss is summed over the batch
    and the classes.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        p = torch.sigmoid(logits.float())
        y = targets.float()
        p_neg = (1 - p + self.clip).clamp(max=1) if self.clip > 0 else 1 - p  # probability shifting
        loss = y * torch.log(p.clamp(min=self.eps)) + (1 - y) * torch.log(p_neg.clamp(min=self.eps))
        with torch.no_grad():
            pt = p * y + p_neg * (1 - y)
            weight = (1 - pt).pow(self.gamma_pos * y + self.gamma_neg * (1 - y))
        return -(loss * weight).sum()


class MultiLabelClassifier(nn.Module):
    """Training object (mdistiller shape): ``forward_train(images, targets) -> (logits, {"loss_<name>": loss})``.

    Args:
        model: a network giving one logit per class (baseline or NOAH head).
        loss: "bce" (mean binary cross-entropy) or "asl" (``AsymmetricLoss`` with its defaults).
    """

    def __init__(self, model: nn.Module, loss: str = "bce") -> None:
        super().__init__()
        if loss not in ("bce", "asl"):
            raise ValueError(f"multi-label loss must be 'bce' or 'asl', got {loss!r}")
        self.model = model
        self.loss_name = loss
        self.criterion: Callable[[Tensor, Tensor], Tensor] = (
            AsymmetricLoss() if loss == "asl" else nn.BCEWithLogitsLoss())

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def forward_train(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(images)
        return logits, {f"loss_{self.loss_name}": self.criterion(logits, targets.to(logits.dtype))}

    def eval_model(self) -> nn.Module:
        return self.model

