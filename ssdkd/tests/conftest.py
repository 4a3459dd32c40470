"""Small shared pieces for the ssdkd tests (tiny sizes: every test runs on 2 CPU cores in seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 + GAP + linear: a BN classifier small enough for per-test training."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_ch: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random resnet8 saved as Fast/CMI release their teachers (a smoke run would train one: slower)."""
    from ssdkd.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "cifar10_resnet8.pth"
    torch.save({"state_dict": create_model("resnet8", 10).state_dict(), "best_acc": 0.5}, path)
    return path
