"""Exact model-size and bit-operation accounting of binary / sub-bit networks (spec b.3, b.12, c).

Counts only the binary 3x3 convs for size and BOPs (as the SNN README does); real-valued MACs (stem,
downsample 1x1 convs, FC) separately; the sub-codebook overhead apart from the size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .sparks import HardBinaryConv, PermutationSelector


@dataclass(frozen=True)
class ConvGeometry:
    """One binary 3x3 conv: channels and output spatial size."""

    name: str
    in_chs: int
    out_chs: int
    out_h: int
    out_w: int


def _meta_forward(model: nn.Module, image_size: int | tuple[int, int], hook_types: tuple[type, ...]):
    """Shape-only forward on the meta device; returns [(name, module, input shape, output shape)]."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    meta = copy.deepcopy(model).to("meta").eval()
    records, handles = [], []
    for name, mod in meta.named_modules():
        if isinstance(mod, hook_types):
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: records.append((name, m, tuple(i[0].shape), tuple(o.shape)))))
    in_chans = next(m for m in meta.modules() if isinstance(m, nn.Conv2d | HardBinaryConv)).weight.shape[1]
    with torch.no_grad():
        meta(torch.empty(1, in_chans, h, w, device="meta"))
    for hd in handles:
        hd.remove()
    return records


def binary_conv_geometry(model: nn.Module, image_size: int | tuple[int, int] = 224) -> list[ConvGeometry]:
    """Every binary 3x3 conv of `model` with its output size at `image_size` input."""
    return [ConvGeometry(n, m.in_chs, m.out_chs, o[2], o[3])
            for n, m, _, o in _meta_forward(model, image_size, (HardBinaryConv,))]


def bops_1bit(layers: list[ConvGeometry]) -> int:
    """1-bit BOPs = sum C_out C_in 9 H_o W_o (b.12)."""
    return sum(g.out_chs * g.in_chs * 9 * g.out_h * g.out_w for g in layers)


def bops_subbit(layers: list[ConvGeometry], tau: int) -> int:
    """Sub-bit BOPs (b.12, FITTED to the SNN README, spec k.5): per layer
    min(C_out C_in 9 HW, C_in n 9 HW + 1/2 C_out C_in HW), n = 2^tau: each input channel convolved once
    with each of the n codewords, then the responses gathered and accumulated (the 1/2 is unexplained).
    """
    n, total = 2 ** tau, Fraction(0)
    for g in layers:
        hw = g.out_h * g.out_w
        total += min(Fraction(g.out_chs * g.in_chs * 9 * hw),
                     Fraction(g.in_chs * n * 9 * hw) + Fraction(g.out_chs * g.in_chs * hw, 2))
    if total.denominator != 1:
        raise ValueError(f"sub-bit BOPs are not an integer ({total}); the fitted rule assumes even C_out C_in HW")
    return int(total)


def model_size_bits(layers: list[ConvGeometry], tau: int) -> int:
    """Size of the binary convs in bits: sum tau C_out C_in (b.3; the README's Mbit figures, tau=9 is 1 bit)."""
    return sum(tau * g.out_chs * g.in_chs for g in layers)


def codebook_overhead_bits(layers: list[ConvGeometry], tau: int) -> int:
    """The sub-codebooks themselves: 9 bits x 2^tau per layer, reported apart (b.3, b.12)."""
    return len(layers) * 9 * 2 ** tau if tau < 9 else 0


def real_macs(model: nn.Module, image_size: int | tuple[int, int] = 224) -> int:
    """MACs of the real-valued layers: every nn.Conv2d (stem, downsample 1x1) and nn.Linear (b.12)."""
    total = 0
    for _, m, _, o in _meta_forward(model, image_size, (nn.Conv2d, nn.Linear)):
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        else:
            kh, kw = m.kernel_size
            total += o[1] * o[2] * o[3] * (m.in_channels // m.groups) * kh * kw
    return total


def count_params(model: nn.Module, training_only: bool = False) -> int:
    """Parameters of the network; the Sparks selection logits X (dropped after training, b.4) only
    with `training_only=True`."""
    logits = {id(m.logits) for m in model.modules() if isinstance(m, PermutationSelector)}
    return sum(p.numel() for p in model.parameters() if training_only or id(p) not in logits)


def binary_weight_count(model: nn.Module) -> int:
    """Latent weights of the binary 3x3 convs (c: 10,985,472 for ResNet-18)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, HardBinaryConv))


def accounting(model: nn.Module, tau: int, image_size: int | tuple[int, int] = 224) -> dict[str, int | float]:
    """Every count of b.12 for `model` at `tau` bits per kernel, plus the ratios to the 1-bit network."""
    layers = binary_conv_geometry(model, image_size)
    one_bit, sub = bops_1bit(layers), bops_subbit(layers, tau)
    size1, size = model_size_bits(layers, 9), model_size_bits(layers, tau)
    return {"params": count_params(model), "binary_weights": binary_weight_count(model),
            "size_bits": size, "codebook_overhead_bits": codebook_overhead_bits(layers, tau),
            "bops_1bit": one_bit, "bops_subbit": sub, "real_macs": real_macs(model, image_size),
            "size_ratio_vs_1bit": size1 / size, "bops_ratio_vs_1bit": one_bit / sub,
            "bits_per_weight": tau / 9}
