"""Lifting networks by name: the GridConv family (``gridconv.gridconv``) and the Martinez-style MLP baseline.

    build_model({"arch": "dgridconv", "hidden_size": 256, "num_blocks": 2, "sgt": "learnable", ...})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gridconv import NUM_JOINTS, GridLiftingNetwork


class MLPBlock(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.fc2, self.norm2 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.norm1(self.fc1(x))))
        return x + self.dropout(F.relu(self.norm2(self.fc2(y))))


class MLPLiftingNetwork(nn.Module):
    """Fully connected lifting baseline (Martinez et al., ICCV 2017): linear, residual blocks, linear."""

    def __init__(self, hidden_size: int = 1024, num_blocks: int = 2, dropout: float = 0.5,
                 num_joints: int = NUM_JOINTS) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.stem, self.stem_norm = nn.Linear(2 * num_joints, hidden_size), nn.BatchNorm1d(hidden_size)
        self.blocks = nn.ModuleList(MLPBlock(hidden_size, dropout) for _ in range(num_blocks))
        self.head = nn.Linear(hidden_size, 3 * num_joints)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pose2d: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.stem_norm(self.stem(pose2d.flatten(1)))))
        for block in self.blocks:
            y = block(y)
        return self.head(y).view(-1, self.num_joints, 3)

    def forward_train(self, pose2d: torch.Tensor, pose3d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        pred = self(pose2d)
        return pred, {"loss_mse": F.mse_loss(pred, pose3d)}

    def set_temperature(self, temperature: float) -> None:  # no attention: nothing to anneal
        return None

    @property
    def temperature(self) -> None:
        return None


ARCHS = ("gridconv", "dgridconv", "mlp")


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """A lifting network from a model config (``arch`` plus the network's keyword arguments)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", "dgridconv")
    if arch == "mlp":
        keep = ("hidden_size", "num_blocks", "dropout", "num_joints")
        return MLPLiftingNetwork(**{k: v for k, v in cfg.items() if k in keep})
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    for key in ("grid_shape", "padding_mode"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return GridLiftingNetwork(dynamic=arch == "dgridconv", **cfg)
