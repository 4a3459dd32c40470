"""Official Ske2Grid / pyskl ST-GCN state_dicts -> this project's modules (timm's ``checkpoint_filter_fn`` style).

Official mmcv checkpoints (spec §g) hold ``backbone.*`` and ``cls_head.*`` keys; the front-end fixtures hold the
backbone keys without the prefix. A few explicit rules rename them:

==========================================================  ===============================================
official                                                    ours (``Ske2GridNet``; a bare ``Ske2Grid`` drops
                                                            the ``ske2grid.`` prefix)
==========================================================  ===============================================
``backbone.data_bn.*``                                      ``ske2grid.data_bn.*``
``backbone.sampling_stages.{s}``                            ``ske2grid.stages.{s}.upt.weight``
``backbone.SGT_stages.{s}.sgt_trans_mat``                   ``ske2grid.stages.{s}.git.theta``
``backbone.SGT_stages.{s}.index_sel``                       ``ske2grid.stages.{s}.git.index_sel`` (recomputed)
``backbone.st_gcn_networks.{i}.gcn2cn.conv|bn.*``           ``blocks.{i}.grid_conv|grid_bn.*``
``backbone.st_gcn_networks.{i}.tcn2cn.{j}.*``               ``blocks.{i}.tcn.{j}.*``
``backbone.st_gcn_networks.{i}.residual.{j}.*``             ``blocks.{i}.residual.{j}.*``
``cls_head.fc.*`` (a 1×1×1 Conv3d)                          ``head.fc.*`` (Linear; weight squeezed)
``backbone.A`` (unused in compute)                          dropped
pyskl ST-GCN: ``backbone.gcn.{i}.*``, ``cls_head.fc_cls.*``  ``blocks.{i}.*``, ``head.fc.*`` (``STGCN``)
==========================================================  ===============================================

Every GIT assignment is recomputed from its scores (``index_sel`` is derived state that the release rewrites
on each forward); a stored ``index_sel`` that differs is reported with a warning (all zeros, the value of a
module that never ran a forward, is not a mismatch). The stage-0 adjacency ``B``
is not stored; the model rebuilds it from its layout.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import load_foreign_state_dict, load_state_dict_verbose, save_converted
from common.errors import UserError, cli_guard
from ske2grid.ske2grid import Ske2Grid, greedy_assignment

__all__ = ["checkpoint_filter_fn", "convert_file", "load_official", "rename_official_key", "rename_official_tensors"]

_GRID_RULES = [
    (r"^data_bn\.", "{front}data_bn."),
    (r"^sampling_stages\.(\d+)$", r"{front}stages.\1.upt.weight"),
    (r"^SGT_stages\.(\d+)\.sgt_trans_mat$", r"{front}stages.\1.git.theta"),
    (r"^SGT_stages\.(\d+)\.index_sel$", r"{front}stages.\1.git.index_sel"),
    (r"^st_gcn_networks\.(\d+)\.gcn2cn\.conv\.", r"blocks.\1.grid_conv."),
    (r"^st_gcn_networks\.(\d+)\.gcn2cn\.bn\.", r"blocks.\1.grid_bn."),
    (r"^st_gcn_networks\.(\d+)\.tcn2cn\.(\d+)\.", r"blocks.\1.tcn.\2."),
    (r"^st_gcn_networks\.(\d+)\.residual\.(\d+)\.", r"blocks.\1.residual.\2."),
]
_STGCN_RULES = [
    (r"^data_bn\.", "data_bn."),
    (r"^gcn\.(\d+)\.", r"blocks.\1."),
]
_HEAD_RULES = [(r"^fc\.", "head.fc."), (r"^fc_cls\.", "head.fc.")]


def _is_grid_model(model: nn.Module) -> bool:
    return isinstance(model, Ske2Grid) or isinstance(getattr(model, "ske2grid", None), Ske2Grid)


def rename_official_key(key: str, model: nn.Module) -> str | None:
    """Our name for an official key; None for keys ours does not keep (``A``); unknown keys pass unchanged."""
    key = key[7:] if key.startswith("module.") else key
    if key.startswith("cls_head."):
        rules, rest = _HEAD_RULES, key[len("cls_head."):]
    else:
        rest = key[len("backbone."):] if key.startswith("backbone.") else key
        rules = _GRID_RULES if _is_grid_model(model) else _STGCN_RULES
        if rest == "A" and _is_grid_model(model):
            return None  # the ST-GCN partition tensor: a buffer the grid network never uses (spec §b.5)
    front = "" if isinstance(model, Ske2Grid) else "ske2grid."
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl.replace("{front}", front), rest)
        if count:
            return new
    return key


def rename_official_tensors(tensors: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Rename official keys and reshape tensors whose shapes differ from ours only by singleton dims (head)."""
    own = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in tensors.items():
        new = rename_official_key(key, model)
        if new is None:
            continue
        if new in own and value.shape != own[new].shape and value.numel() == own[new].numel() \
                and [s for s in value.shape if s != 1] == [s for s in own[new].shape if s != 1]:
            value = value.reshape(own[new].shape)
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Official state_dict -> ours for ``model`` (a ``Ske2GridNet``, a bare ``Ske2Grid`` or ``STGCN``).

    Recomputes each ``index_sel`` from its GIT scores (warning when the stored one differs) and drops ``A``.
    """
    out = rename_official_tensors(state_dict, model)
    for key in [k for k in out if k.endswith("git.theta")]:
        sel_key = key[: -len("theta")] + "index_sel"
        perm = greedy_assignment(out[key].float()).to(torch.float32)
        stored = out.get(sel_key)
        never_run = stored is not None and not bool(stored.any())  # the release's initial zeros (no forward yet)
        if stored is not None and not never_run and not torch.equal(stored.float().flatten(), perm):
            warnings.warn(f"{sel_key}: the stored GIT assignment differs from the one recomputed from the scores "
                          "(using the recomputed one; spec §b.8.8)", stacklevel=2)
        out[sel_key] = perm
    return out


def load_official(path: str | os.PathLike, model: nn.Module, strict: bool = True) -> tuple[list[str], list[str]]:
    """Read an official ``.pth`` with the restricted loader (no code runs), convert, and load into ``model``.

    Missing and unexpected keys are named: with ``strict`` any is a one-line ``UserError``; otherwise they are
    returned as (missing, unexpected).
    """
    state = checkpoint_filter_fn(load_foreign_state_dict(path), model)
    return load_state_dict_verbose(model, state, strict=strict, source=f"official checkpoint {path}")


def convert_file(source: str | os.PathLike, target: str | os.PathLike, overrides: list[str]) -> Path:
    """Official checkpoint ``source`` -> ``target`` in our names, for the network the overrides compose.

    The file (``common.checkpoint.save_converted``, atomic) is exactly what ``ske2grid.eval checkpoint=`` reads.
    """
    from common.config import compose
    from ske2grid.train import CONFIG_DIR, build_model, validate_config

    cfg = compose(CONFIG_DIR, overrides)
    model = build_model(validate_config(cfg))
    state = checkpoint_filter_fn(load_foreign_state_dict(source, key=cfg.get("checkpoint_key")), model)
    load_state_dict_verbose(model, state, strict=True, source=f"official checkpoint {source}")
    return save_converted(model.state_dict(), target, "ske2grid", source, experiment=str(cfg.name),
                          model=str(cfg.model.name))


@cli_guard
def main(argv: list[str] | None = None) -> None:
    """``python -m ske2grid.convert OFFICIAL.pth OURS.pt experiment=<row> [checkpoint_key=state_dict] [overrides]``"""
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args if "=" not in a]
    if len(paths) != 2 or any(a in ("-h", "--help") for a in args):
        raise UserError("usage: python -m ske2grid.convert OFFICIAL.pth OURS.pt experiment=<row> "
                        "[checkpoint_key=state_dict] [other config overrides]")
    out = convert_file(paths[0], paths[1], [a for a in args if "=" in a])
    print(f"wrote {out} (official weights in our names; evaluate with ske2grid.eval checkpoint={out})")


if __name__ == "__main__":
    main()
