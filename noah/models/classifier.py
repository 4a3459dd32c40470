"""A host backbone with its classification head: the baseline pooled linear head or NOAH (spec b.6).

``Classifier`` keeps the backbone (a timm / torchvision / local model built without a classifier) under
``backbone`` and puts the head at the official names: ``pre_logits.fc`` (DeiT widths < 192) and ``head``
(``head.query`` / ``head.value`` for NOAH, ``head.weight`` / ``head.bias`` for the linear baseline). It has timm's
``forward_features`` / ``forward_head`` / ``reset_classifier`` contract.

Backbone contract: ``forward_features(x)`` returns what NOAH sees (a ``(B, C, H, W)`` map for CNNs, the final
normalised ``(B, L, D)`` tokens for ViTs/MLPs); ``forward_head(x, pre_logits=True)`` returns the baseline's
pooled vector (global average, class token or token mean).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from timm.layers import lecun_normal_, trunc_normal_
from torch import Tensor, nn

from noah.noah import NOAH

HeadKind = Literal["noah", "linear"]
Layout = Literal["map", "tokens"]
HeadInit = Literal["kaiming", "lecun", "normal001", "trunc002", "zeros", "torch"]


class PreLogits(nn.Sequential):
    """DeiT's per-token ``Linear(D, dim) + tanh`` before the head (official ``pre_logits``, spec b.6)."""

    def __init__(self, in_features: int, out_features: int = 192) -> None:
        super().__init__(OrderedDict([("fc", nn.Linear(in_features, out_features)), ("act", nn.Tanh())]))
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)


def init_head(head: nn.Module, rule: HeadInit) -> None:
    """The host's effect on its head's initialisation (spec b.4)."""
    if isinstance(head, NOAH):
        if rule == "lecun":  # Mixer/gMLP: the host's init loop re-draws every Conv2d, NOAH's included
            for conv in (head.query, head.value):
                lecun_normal_(conv.weight)
                nn.init.zeros_(conv.bias)
        else:  # CNN hosts re-draw with the same Kaiming fan_out rule; ViT/PVT/ShuffleNet keep NOAH's own
            head.reset_parameters()
        return
    if not isinstance(head, nn.Linear) or rule == "torch":
        return
    if rule == "normal001":
        nn.init.normal_(head.weight, 0.0, 0.01)
    elif rule == "trunc002":
        trunc_normal_(head.weight, std=0.02)
    elif rule == "zeros":
        nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)


class Classifier(nn.Module):
    """``backbone -> [pre_logits] -> head``; the head is NOAH on every position or a linear layer on the pool.

    Args:
        backbone: see the module docstring.
        num_features: channels (D) of the backbone output.
        num_classes: K.
        head: "noah" or "linear" (the baseline).
        layout: "map" (``(B, C, H, W)``) or "tokens" (``(B, L, D)``) backbone output.
        head_num, key_ratio, head_dropout, head_split, kv_split: NOAH's hyper-parameters (ignored by "linear").
        pre_logits_dim: width of the DeiT ``pre_logits`` projection, or None for none.
        head_init: the host's head initialisation rule (spec b.4).
        no_weight_decay: parameter names the host's recipe exempts from weight decay (spec d.2/d.3).
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, head: HeadKind = "noah",
                 layout: Layout = "map", head_num: int = 4, key_ratio: float = 0.5, head_dropout: float = 0.0,
                 head_split: bool = True, kv_split: bool = True, pre_logits_dim: int | None = None,
                 head_init: HeadInit = "kaiming", no_weight_decay: tuple[str, ...] = ()) -> None:
        super().__init__()
        if head not in ("noah", "linear"):
            raise ValueError(f"head must be 'noah' or 'linear', got {head!r}")
        if layout not in ("map", "tokens"):
            raise ValueError(f"layout must be 'map' or 'tokens', got {layout!r}")
        self.backbone = backbone
        self.head_kind = head
        self.layout = layout
        self.head_init = head_init
        self.backbone_features = num_features
        self.pre_logits = PreLogits(num_features, pre_logits_dim) if pre_logits_dim else nn.Identity()
        self.num_features = pre_logits_dim or num_features
        self._no_weight_decay = tuple(no_weight_decay)
        self._noah_config = {"head_num": head_num, "key_ratio": key_ratio, "dropout": head_dropout,
                             "head_split": head_split, "kv_split": kv_split}
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.head_kind == "noah":
            head: nn.Module = NOAH(self.num_features, num_classes, **self._noah_config)
        else:
            head = nn.Linear(self.num_features, num_classes)
        init_head(head, self.head_init)
        return head

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` classes, keeping NOAH's N, r, dropout and split flags (spec j)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.head = self._make_head(num_classes).to(device)

    def no_weight_decay(self) -> set[str]:
        return set(self._no_weight_decay)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features -> logits. ``pre_logits=True`` returns what the head receives."""
        if self.head_kind == "linear":
            x = self.pre_logits(self.backbone.forward_head(x, pre_logits=True))
        elif self.layout == "tokens":
            x = self.pre_logits(x).transpose(1, 2)  # (B, L, D) -> (B, D, L): NOAH's token layout
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
