"""Whole-split mIoU as the official `SegmentationMetric` computes it (spec f.4), on `common.metrics`.

Totals are accumulated over the split; a class absent from ground truth and predictions counts IoU 0 and the
mean is over all classes. Pixel accuracy is the true one; `official_pixel_accuracy` keeps the official quirk
(argmax of integer-truncated logits) for compatibility tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.metrics import ConfusionMatrix

from .distiller import IGNORE_INDEX


class SegMetric(ConfusionMatrix):
    """Confusion matrix over a split; `scores()` -> mIoU (%, absent classes = 0), pixAcc (%), inter, union."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_classes, ignore_index=IGNORE_INDEX, device=device)

    def update_logits(self, logits: Tensor, labels: Tensor) -> None:
        """Upsample stride-8 (or any) logits bilinearly (align_corners=True) to the label size and count."""
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=True)
        self.update(logits.argmax(1), labels)

    def inter_union(self) -> tuple[Tensor, Tensor]:
        """Per-class intersection and union pixel counts (float64)."""
        cm = self.mat.to(torch.float64)
        inter = cm.diagonal()
        return inter, cm.sum(0) + cm.sum(1) - inter

    def scores(self) -> dict[str, float]:
        out = self.compute(absent_as_zero=True)
        return {"mIoU": out["mIoU"], "pixAcc": out["aAcc"]}


def official_pixel_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The official `batch_pix_accuracy` (f.4 quirk): argmax over `logits.long()`, i.e. truncated logits."""
    pred = torch.argmax(logits.long(), 1)
    valid = labels >= 0
    return float(((pred == labels) & valid).sum()) / max(int(valid.sum()), 1)
