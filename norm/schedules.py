"""The official NORM schedules (spec b.4 item 6, b.9 item 14): the epoch-wise NORM-loss multiplier and
the per-epoch learning rate of `helper/util.py::adjust_learning_rate`.

Both official loops run epochs 0..E inclusive (241 epochs on CIFAR, 101 on ImageNet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .norm import NormMultiplier

# helper/loops.py::train_distill: epochs 0-9 0.1, 10-19 0.5, 20-179 1.0, 180-209 0.5, then 0.1
CIFAR_MULTIPLIER = NormMultiplier((10, 20, 180, 210), (0.1, 0.5, 1.0, 0.5, 0.1), reference_epochs=241)
# ImageNet branch: 0-4 0.1, 5-14 0.5, 15-59 0.9, 60-79 0.5, then 0.1
IMAGENET_MULTIPLIER = NormMultiplier((5, 15, 60, 80), (0.1, 0.5, 0.9, 0.5, 0.1), reference_epochs=101)


def official_lr(epoch: int, base_lr: float, decay: str, epochs: int, milestones: Sequence[int] = (),
                iters_per_epoch: int = 1, rate: float = 0.1) -> float:
    """Learning rate of epoch `epoch` (set once per epoch). `epochs` is the official `--epochs` (240/100).

    step: `base * rate ** #{m : epoch > m}` (so the first decay is at epoch 151 for milestone 150).
    cos:  `base * (1 + cos(pi * epoch * (iters + 1) / (epochs * iters))) / 2`, the official numerator.
    """
    if decay == "step":
        return base_lr * rate ** sum(epoch > m for m in milestones)
    if decay == "cos":
        progress = (epoch + epoch * iters_per_epoch) / (epochs * iters_per_epoch)
        return base_lr * (1 + math.cos(math.pi * progress)) / 2
    raise ValueError(f"unknown lr decay '{decay}' (step or cos)")
