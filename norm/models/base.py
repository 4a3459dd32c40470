"""The timm-style contract every CIFAR network here shares: features, global average pool, classifier."""

from __future__ import annotations

from torch import Tensor, nn


class PooledClassifier(nn.Module):
    """`forward = forward_head(forward_features(x))`; the head pools globally, then applies `head_name`.

    Subclasses keep the official (RepDistiller) attribute names, so checkpoints load unchanged: they set
    `head_name` (the module applied to the pooled features) and `linear_name` when the linear layer sits
    inside it (`classifier.0`).
    """

    head_name = "fc"
    linear_name: str | None = None

    def pool(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))

    def forward_head(self, x: Tensor) -> Tensor:
        return getattr(self, self.head_name)(self.pool(x))

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.linear_name or self.head_name)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]
