"""The Ske2Grid training object (mdistiller / common.engine shape): a recognizer over a skeleton network.

`forward_train(skeletons, labels)` returns the logits and `{"loss_cls": CE}` (pyskl `CrossEntropyLoss`, weight
1, no label smoothing, no regulariser on UPT/GIT; spec §b.5); `predict(clips)` is the multi-clip test (softmax
per clip averaged over clips, §b.7); `eval_model()` is the deployable network. PLS needs nothing here: the
earlier UPT/GIT pairs are frozen inside the network, so every trainable parameter is the method's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ske2grid.models import multiclip_predict

__all__ = ["SkeletonRecognizer"]


class SkeletonRecognizer(nn.Module):
    """Cross-entropy training and multi-clip testing of a Ske2Grid or ST-GCN network (`(N, M, T, V, C)` input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, skeletons: Tensor) -> Tensor:
        return self.model(skeletons)

    def forward_train(self, skeletons: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(skeletons)
        return logits, {"loss_cls": F.cross_entropy(logits.float(), labels)}

    def predict(self, clips: Tensor) -> Tensor:
        """`(N, clips, M, T, V, C)` -> class probabilities `(N, K)` (or `(N, M, T, V, C)` as one clip)."""
        return multiclip_predict(self.model, clips if clips.dim() == 6 else clips[:, None])

    def eval_model(self) -> nn.Module:
        return self.model
