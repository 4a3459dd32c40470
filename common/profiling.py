"""Parameter and FLOP counts (torch's own FLOP counter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); buffers are not parameters."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, inputs: torch.Tensor | Sequence[Any], per_module: bool = False) -> dict[str, Any]:
    """FLOPs of one forward pass in eval mode: {"flops", "macs"} (macs = flops / 2, the papers' "FLOPs").

    With `per_module`, also {"by_module": {name: flops}} for the top-level children.
    """
    from torch.utils.flop_counter import FlopCounterMode

    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    out: dict[str, Any] = {"flops": flops, "macs": flops // 2}
    if per_module:
        out["by_module"] = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return out


def human(n: float, unit: str = "") -> str:
    """12345678 -> '12.35M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"
