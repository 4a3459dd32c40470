"""Ske2Grid models by name: the grid network (any grid, cascade, block plan) and the ST-GCN graph baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ske2grid.models.grid_net import BlockSpec, GridBlock, PersonAveragingHead, Ske2GridNet, stgcn_block_plan
from ske2grid.models.stgcn import STGCN, stgcn_spatial_partitions

__all__ = ["BlockSpec", "GridBlock", "MODELS", "PersonAveragingHead", "STGCN", "Ske2GridNet", "create_model",
           "model_from_config", "multiclip_predict", "stgcn_block_plan", "stgcn_spatial_partitions"]

MODELS = ("ske2grid", "stgcn")


def create_model(name: str, num_classes: int, layout: str = "coco", in_channels: int = 3,
                 widths: Sequence[int] | None = None, blocks: Sequence[BlockSpec | Mapping] | None = None,
                 **kwargs: Any) -> nn.Module:
    """`ske2grid` (kwargs: grid_shape, progressive_joint_seq, num_person) or `stgcn` (num_person).

    `widths` shrinks the ST-GCN channel plan (e.g. (16, 32, 32) for smoke runs); `blocks` gives it in full.
    """
    if widths is not None and blocks is not None:
        raise ValueError("give either widths or blocks, not both")
    plan = blocks if blocks is not None else stgcn_block_plan(in_channels, *(() if widths is None else (widths,)))
    if name == "ske2grid":
        allowed = {"grid_shape", "progressive_joint_seq", "num_person"}
        cls: type[nn.Module] = Ske2GridNet
    elif name == "stgcn":
        allowed, cls = {"num_person"}, STGCN
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for model {name!r}; valid: {sorted(allowed)}")
    return cls(num_classes=num_classes, layout=layout, in_channels=in_channels, blocks=plan, **kwargs)


def multiclip_predict(model: nn.Module, clips: Tensor) -> Tensor:
    """Multi-clip test (§b.7, pyskl `average_clip='prob'`): clips `(N, clips, M, T, V, C)` are folded into the
    batch, and the per-clip softmax is averaged over clips -> `(N, K)` probabilities."""
    n, nc = clips.shape[:2]
    logits = model(clips.reshape(n * nc, *clips.shape[2:]))
    return torch.softmax(logits.float(), dim=-1).view(n, nc, -1).mean(dim=1)


def model_from_config(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> nn.Module:
    """The network of a composed config: `model` group (name, grid, cascade, widths) + `data` (layout, C, K)."""
    kw: dict[str, Any] = {k: v for k, v in model_cfg.items() if k not in ("name", "widths")}
    if "grid_shape" in kw:
        kw["grid_shape"] = tuple(kw["grid_shape"])
    if "progressive_joint_seq" in kw:
        kw["progressive_joint_seq"] = list(kw["progressive_joint_seq"])
    widths = model_cfg.get("widths")
    return create_model(str(model_cfg["name"]), int(data_cfg["num_classes"]), layout=str(data_cfg["layout"]),
                        in_channels=int(data_cfg["in_channels"]), widths=None if widths is None else list(widths),
                        num_person=int(data_cfg.get("num_person", 2)), **kw)
