"""MultiClipClassificationTask: clips folded into one forward, softmax averaged; top-1/top-5/mean class accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.dist import DistEnv
from common.metrics import mean_class_accuracy
from common.tasks import EvalContext, MultiClipClassificationTask


class Lookup(nn.Module):
    """A clip (2, 3) -> logits: its first row (so each clip's prediction is chosen by the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x[:, 0]


def test_multiclip_softmax_average_and_metrics() -> None:
    torch.manual_seed(0)
    n, clips, k = 6, 4, 3
    x = torch.randn(n, clips, 2, k) * 3
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    model = Lookup()
    task = MultiClipClassificationTask(num_classes=k, clip_dims=2)
    metrics = task.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3), EvalContext(DistEnv()))
    assert model.calls == [3 * clips, 3 * clips]  # clips folded into the batch: one forward per loader batch
    probs = torch.softmax(x[:, :, 0], -1).mean(1)  # reference: per-clip softmax averaged
    pred = probs.argmax(1)
    hits = torch.bincount(y, weights=(pred == y).double(), minlength=k)
    assert abs(metrics["top1"] - 100 * (pred == y).double().mean().item()) < 1e-9
    assert metrics["top5"] == 100.0  # k = 3 < 5: every class
    assert abs(metrics["mean_class_accuracy"] - mean_class_accuracy(hits, torch.bincount(y, minlength=k))) < 1e-9
    assert abs(metrics["loss"] + probs[torch.arange(n), y].log().mean().item()) < 1e-6
    # probabilities are averaged, not logits: one confident clip is outvoted by two mild ones
    one = MultiClipClassificationTask(num_classes=2, clip_dims=2)
    xx = torch.zeros(1, 3, 2, 2)
    xx[0, 0, 0] = torch.tensor([10.0, 0.0])
    xx[0, 1:, 0] = torch.tensor([0.0, 3.0])
    assert xx[0, :, 0].mean(0).argmax() == 0 and one.probabilities(Lookup(), xx).argmax() == 1


def test_one_clip_inputs_and_mean_class_accuracy_ignores_absent_classes() -> None:
    x = torch.tensor([[[5.0, 0, 0, 0]], [[0, 5.0, 0, 0]], [[5.0, 0, 0, 0]]])  # (N, 1 row, 4): one clip each
    y = torch.tensor([0, 0, 1])
    task = MultiClipClassificationTask(num_classes=4, clip_dims=2)
    m = task.evaluate(Lookup(), DataLoader(TensorDataset(x, y), batch_size=8), EvalContext(DistEnv()))
    assert abs(m["top1"] - 100 / 3) < 1e-9
    assert abs(m["mean_class_accuracy"] - 25.0) < 1e-9  # class 0: 1/2, class 1: 0/1; classes 2, 3 absent
