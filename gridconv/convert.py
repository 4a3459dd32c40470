"""Official GridConv checkpoints (OSVAI/GridConv) -> this project's ``GridLiftingNetwork``.

In the style of timm's ``checkpoint_filter_fn``: a few explicit renaming rules, the two convolution
branches stacked into one ``weight`` / ``bias`` tensor, 1x1 attention convolutions squeezed to linear
layers, and the kernel-attention temperature (not stored by the official code) set explicitly.
Missing and unexpected keys are reported by name.

    python -m gridconv.convert official.pth.tar ours.pt --padding c r [--temperature 30]

writes (atomically, ``weights_only``-loadable, marked as official weights) the file ``gridconv.eval`` and
``gridconv.infer`` read: our state_dict, the model config, and the official file's metadata.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import (
    extract_state_dict,
    load_official_checkpoint,
    load_state_dict_verbose,
    save_converted,
    to_plain,
)
from common.errors import cli_guard

from .gridconv import GridLiftingNetwork

# Official key prefix -> ours (applied in order, first match wins).
RENAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^w1\.", "stem."),
    (r"^batch_norm1\.", "stem_norm."),
    (r"^atten_conv1\.", "stem.attention."),
    (r"^linear_stages\.(\d+)\.w(\d)\.", r"blocks.\1.conv\2."),
    (r"^linear_stages\.(\d+)\.batch_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^linear_stages\.(\d+)\.atten_conv(\d)\.", r"blocks.\1.conv\2.attention."),
    (r"^w2\.", "head."),
    (r"^atten_conv2\.", "head.attention."),
    (r"^sgt_layer\.sgt_trans_mat$", "sgt.logits"),
)
ATTENTION_RULES = (("attention.fc.", "attention.squeeze."), ("attention.bn.", "attention.norm."),
                   ("attention.position_fc.", "attention.excite."))
# Branch tensors, stacked as weight[0], weight[1] (bias likewise). Plain GridConv: donut = circular branch.
BRANCH_RULES = (
    (r"\.branch([12])_(weight|bias)$", lambda m: (int(m.group(1)) - 1, m.group(2))),
    (r"\.(donut|tablet)_conv\.(weight|bias)$", lambda m: (0 if m.group(1) == "donut" else 1, m.group(2))),
)
PLAIN_GRIDCONV_PADDING = ("c", "z")  # PyTorch-1.4 semantics of the official GridLiftingNetwork


def rename_key(key: str) -> str:
    for pattern, repl in RENAME_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            key = new
            break
    for old, new in ATTENTION_RULES:
        key = key.replace(old, new)
    return key


def our_key(key: str) -> str:
    """The name an official parameter has here (both branches of a GridConv map to one tensor)."""
    key = rename_key(key.removeprefix("module."))
    for pattern, parse in BRANCH_RULES:
        m = re.search(pattern, key)
        if m:
            return key[: m.start()] + "." + parse(m)[1]
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: GridLiftingNetwork | None = None,
                         temperature: float = 30.0) -> dict[str, torch.Tensor]:
    """Official state_dict (or a dict of its gradients) -> ours; tensors already ours pass through.

    ``temperature`` fills every kernel-attention temperature of ``model`` (the official files carry none;
    the official ``--eval`` uses the constructor value 30).
    """
    out: dict[str, torch.Tensor] = {}
    branches: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(("stem", "blocks.", "head.", "sgt.")):  # already in our naming
            out[key] = value
            continue
        key = rename_key(key)
        for pattern, parse in BRANCH_RULES:
            m = re.search(pattern, key)
            if m:
                index, kind = parse(m)
                branches.setdefault(key[: m.start()] + "." + kind, {})[index] = value
                break
        else:
            if re.search(r"attention\.(squeeze|excite)\.weight$", key):
                value = value.flatten(1)  # 1x1 conv (o, i, 1, 1) -> linear (o, i)
            elif key == "sgt.logits":
                value = value.reshape(value.shape[-2], value.shape[-1])
            out[key] = value
    for key, parts in branches.items():
        if sorted(parts) != [0, 1]:
            raise KeyError(f"{key}: only branch {sorted(parts)} present, a two-branch GridConv needs both")
        out[key] = torch.stack([parts[0], parts[1]])
    if model is not None:
        for key, buf in model.state_dict().items():
            if key.endswith("attention.temperature") and key not in out:
                out[key] = torch.full_like(buf, float(temperature))
    return out


def official_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``GridLiftingNetwork`` for an official network configuration.

    ``config`` holds the official class name (``class``) and its arguments (``hidden_size``,
    ``num_block``, ``grid_shape``, ``padding_mode``, ``autosgt_prior``, ``p_dropout``).
    """
    name = str(config["class"]).split()[0]
    kwargs: dict[str, Any] = dict(hidden_size=int(config["hidden_size"]),
                                  num_blocks=int(config.get("num_block", 2)),
                                  grid_shape=tuple(config.get("grid_shape", (5, 5))),
                                  dropout=float(config.get("p_dropout", 0.25)))
    if name == "GridLiftingNetwork":
        return kwargs | dict(dynamic=False, sgt="handcrafted", padding_mode=PLAIN_GRIDCONV_PADDING)
    if name == "DynamicGridLiftingNetwork":
        return kwargs | dict(dynamic=True, sgt="handcrafted",
                             padding_mode=tuple(config.get("padding_mode", ("c", "r"))))
    if name == "AutoDynamicGridLiftingNetwork":
        return kwargs | dict(dynamic=True, sgt="learnable", sgt_prior=config.get("autosgt_prior", "standard"),
                             padding_mode=tuple(config.get("padding_mode", ("c", "z"))))
    raise ValueError(f"unknown official GridConv class {name!r}")


def infer_model_config(state_dict: Mapping[str, torch.Tensor],
                       padding_mode: tuple[str, str] = ("c", "r")) -> dict[str, Any]:
    """Network arguments read off an official state_dict (the padding modes are not stored in it)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    plain = any("donut_conv" in k for k in keys)
    stem = re.compile(r"^(module\.)?w1\.(branch1_weight|donut_conv\.weight)$")
    w1 = next(v for k, v in state_dict.items() if stem.search(k))
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"linear_stages\.(\d+)\.", k))}
    kwargs: dict[str, Any] = dict(hidden_size=int(w1.shape[0]), num_blocks=len(blocks))
    if plain:
        return kwargs | dict(dynamic=False, sgt="handcrafted", padding_mode=PLAIN_GRIDCONV_PADDING)
    cells = next(v for k, v in state_dict.items() if k.endswith("atten_conv1.position_fc.bias")).numel() // 9
    side = int(round(cells ** 0.5))
    learnable = "sgt_layer.sgt_trans_mat" in keys
    return kwargs | dict(dynamic=True, sgt="learnable" if learnable else "handcrafted",
                         grid_shape=(side, cells // side), padding_mode=tuple(padding_mode))


def official_from_checkpoint(ckpt: Any, padding_mode: tuple[str, str] = ("c", "r"), temperature: float = 30.0,
                             strict: bool = True, source: str = "official checkpoint"
                             ) -> tuple[GridLiftingNetwork, dict[str, Any]]:
    """Build the network a loaded official checkpoint describes and load its weights (see ``load_official``)."""
    key = "state_dict" if isinstance(ckpt, Mapping) and "state_dict" in ckpt else None
    state = extract_state_dict(ckpt, key)
    config = infer_model_config(state, padding_mode)
    model = GridLiftingNetwork(**config)
    missing, unexpected = load_state_dict_verbose(model, checkpoint_filter_fn(state, model, temperature),
                                                  strict=strict, source=source)
    meta = {k: to_plain(ckpt[k]) for k in ("epoch", "lr", "error") if isinstance(ckpt, Mapping) and k in ckpt}
    return model, meta | {"model": config, "missing_keys": missing, "unexpected_keys": unexpected}


def load_official(path: str | Path, padding_mode: tuple[str, str] = ("c", "r"), temperature: float = 30.0,
                  strict: bool = True) -> tuple[GridLiftingNetwork, dict[str, Any]]:
    """Build the network an official checkpoint describes and load it safely (``weights_only`` with the
    allow-list, else the restricted unpickler: the official files pickle the Adam optimizer object; nothing
    from the file is executed).

    Returns the model and metadata: the checkpoint's epoch / lr / error, the model arguments, and the
    missing / unexpected keys.
    """
    return official_from_checkpoint(load_official_checkpoint(path), padding_mode, temperature, strict, str(path))


def model_config(network_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``GridLiftingNetwork`` arguments -> the model config ``gridconv.models.build_model`` reads."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in network_kwargs.items() if k != "dynamic"}
    return {"arch": "dgridconv" if network_kwargs.get("dynamic", True) else "gridconv", **kwargs}


@cli_guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="official checkpoint (.pth.tar)")
    parser.add_argument("target", help="where to write the checkpoint gridconv.eval / gridconv.infer read (.pt)")
    parser.add_argument("--padding", nargs=2, default=["c", "r"], help="padding modes of the two branches")
    parser.add_argument("--temperature", type=float, default=30.0, help="kernel-attention temperature")
    args = parser.parse_args(argv)
    model, meta = load_official(args.source, tuple(args.padding), args.temperature)
    save_converted(model.state_dict(), args.target, "gridconv", args.source, model_config=model_config(meta["model"]),
                   official_meta={k: v for k, v in meta.items() if k != "model"})
    print(f"wrote {args.target}: {sum(p.numel() for p in model.parameters()):,} parameters, {meta}")


if __name__ == "__main__":
    main()
