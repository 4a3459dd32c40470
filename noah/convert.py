"""Official NOAH checkpoints -> this project's models (timm's ``checkpoint_filter_fn`` convention, spec g).

Official containers (spec g): the CNN trainer saves ``{"state_dict": <DDP "module." keys>, "epoch", "acc",
"best_acc", "optimizer"}``; DeiT/PVT ``{"model", "model_ema"?, "optimizer", ...}``; the timm MLP trainer
``{"state_dict", "state_dict_ema", "arch", ...}``; a bare state_dict is accepted too. They are read by
``common.checkpoint.load_official_checkpoint``: ``weights_only=True`` under its allow-list first, the restricted
unpickler only for objects the allow-list cannot express (no code from the file runs).

Key rules, official -> ours (``noah.models.Classifier``):
1. ``module.`` is stripped;
2. the head goes to ``head.*``: NOAH ``head.query/value.*`` (MobileNetV3: ``classifier.*``) unchanged in
   name, baseline ``head.2.*`` (CNN ``Sequential(pool, flatten, linear)``) / ``classifier.1.*`` (MobileNetV3)
   -> ``head.*``; DeiT's ``pre_logits.fc.*`` stays;
3. everything else is the backbone: ``backbone.`` + the key, renamed for MobileNetV2 from torchvision's layout
   (``features.i``) to timm's (``conv_stem``, ``blocks.s.j``, ``conv_head``); other families keep their names.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import extract_state_dict, load_state_dict_verbose, read_checkpoint, save_converted
from common.checkpoint import load_official_checkpoint as load_official_file
from common.errors import UserError, cli_guard
from noah.noah import NOAH

log = logging.getLogger(__name__)
PAPER = "noah"

_NOAH_HEAD = re.compile(r"^(?:head|classifier)\.(query|value)\.(weight|bias)$")
_LINEAR_HEAD = re.compile(r"^(?:head\.2|classifier\.1|head)\.(weight|bias)$")

# spec g: which entry of which official container holds the weights (first match wins)
CONTAINERS = (
    ("CNN main.py checkpoint", ("state_dict", "epoch", "best_acc"), "state_dict"),
    ("timm MLP train.py checkpoint", ("state_dict", "arch"), "state_dict"),
    ("DeiT/PVT main.py checkpoint", ("model", "epoch"), "model"),
    ("dict with 'state_dict'", ("state_dict",), "state_dict"),
    ("dict with 'model'", ("model",), "model"),
)


def sniff_container(obj: Any) -> tuple[str, str | None]:
    """(description, entry holding the weights) of a loaded official checkpoint; entry None = bare state_dict."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return "bare state_dict", None
        for name, needed, key in CONTAINERS:
            if all(k in obj for k in needed):
                return name, key
        raise UserError(f"checkpoint is a dict with entries {sorted(map(str, obj))[:10]} but none of the official "
                        "containers of spec g (state_dict / model / a bare state_dict); name the entry with key=")
    raise UserError(f"checkpoint holds a {type(obj).__name__}, not an official NOAH container (spec g)")


def _mobilenetv2_rules(model: nn.Module) -> Callable[[str], str]:
    """torchvision/official ``features.i.*`` -> timm ``mobilenetv2_*`` names."""
    blocks = getattr(model, "backbone", model).blocks
    table, i = {}, 1
    for s, stage in enumerate(blocks):
        for j in range(len(stage)):
            table[i] = f"blocks.{s}.{j}"
            i += 1
    last = i

    def rename(key: str) -> str:
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if m is None:
            return key
        i, rest = int(m.group(1)), m.group(2)
        if i in (0, last):  # stem / last 1x1 ConvBNReLU: Sequential(conv, bn, relu6)
            conv, bn = ("conv_stem", "bn1") if i == 0 else ("conv_head", "bn2")
            return re.sub(r"^0\.", conv + ".", re.sub(r"^1\.", bn + ".", rest))
        block = table.get(i)
        mm = re.match(r"^conv\.(\d+)\.(.*)$", rest)
        if block is None or mm is None:
            return key
        j, tail = int(mm.group(1)), mm.group(2)
        if block == "blocks.0.0":  # expand ratio 1: [dw ConvBNReLU, pw conv, bn]
            names = {0: ("conv_dw", "bn1"), 1: "conv_pw", 2: "bn2"}
        else:  # [pw ConvBNReLU, dw ConvBNReLU, pw-linear conv, bn]
            names = {0: ("conv_pw", "bn1"), 1: ("conv_dw", "bn2"), 2: "conv_pwl", 3: "bn3"}
        name = names.get(j)
        if isinstance(name, tuple):
            sub, tail = tail.split(".", 1)
            name = name[0] if sub == "0" else name[1]
        return key if name is None else f"{block}.{name}.{tail}"

    return rename


def _family(model: nn.Module) -> str:
    from noah.models.mobilenetv3 import MobileNetV3
    from noah.models.shufflenetv2 import ShuffleNetV2Features

    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return "bare_head" if isinstance(model, NOAH) else "other"
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks"):
        return "mobilenetv2"
    if isinstance(backbone, (MobileNetV3, ShuffleNetV2Features)):
        return "cnn"
    return "other"


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official (or our own) state_dict -> keys of ``model`` (rules in the module docstring); no tensor changes."""
    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    family = _family(model)
    if family == "bare_head" or any(k.startswith("backbone.") for k in sd):
        return dict(sd)  # a bare NOAH head or a checkpoint of ours: names already match
    rename = _mobilenetv2_rules(model) if family == "mobilenetv2" else (lambda k: k)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _NOAH_HEAD.match(key) or _LINEAR_HEAD.match(key)
        if m is not None:
            out["head." + key.split(".", 1)[1] if _NOAH_HEAD.match(key) else "head." + m.group(1)] = value
        elif key.startswith("pre_logits."):
            out[key] = value
        else:
            out["backbone." + rename(key)] = value
    return out


def head_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the classifier (``head.*``) in a converted state_dict."""
    return [k for k in state_dict if k.startswith("head.")]


def infer_head_config(state_dict: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, Any]:
    """Head arguments read from an official state_dict's shapes (``head_split=True`` assumed).

    Returns ``head`` ("noah" / "baseline"), ``num_classes``, and for NOAH ``head_num`` and ``key_ratio``, plus
    ``pre_logits`` (whether the DeiT ``pre_logits.fc`` projection is present). ``in_channels`` = head input C.
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    q = next((v for k, v in sd.items() if _NOAH_HEAD.match(k) and k.endswith("query.weight")), None)
    out: dict[str, Any] = {"pre_logits": "pre_logits.fc.weight" in sd}
    if q is None:
        w = next((v for k, v in sd.items() if _LINEAR_HEAD.match(k) and k.endswith("weight")), None)
        if w is None:
            raise UserError("checkpoint has neither NOAH head keys (head.query.*) nor a linear head (head.weight)")
        return {**out, "head": "baseline", "num_classes": int(w.shape[0])}
    v = next(v for k, v in sd.items() if _NOAH_HEAD.match(k) and k.endswith("value.weight"))
    if "pre_logits.fc.weight" in sd:
        in_channels = int(sd["pre_logits.fc.weight"].shape[0])
    per_group = int(q.shape[1]) + int(v.shape[1])
    if in_channels % per_group:
        raise UserError(f"NOAH head shapes {tuple(q.shape)} / {tuple(v.shape)} do not fit C={in_channels} channels")
    n = in_channels // per_group
    k = n * int(q.shape[1])
    ratio = k / in_channels if int(in_channels * (k / in_channels)) == k else (k + 0.5) / in_channels
    return {**out, "head": "noah", "num_classes": int(q.shape[0]) // n, "head_num": n, "key_ratio": ratio}


def state_dict_of(obj: Any, origin: str, model: nn.Module, key: str | None = None,
                  source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model tensors of any checkpoint an entry point is given, in ``model``'s key names.

    Ours: a run's ``last.pt`` / ``best.pt`` (``"model"``, the trained wrapper's ``model.`` prefix stripped) or a
    ``noah.convert`` output (``"state_dict"``); anything else is an official container (spec g), sniffed unless
    ``key`` names the entry, and renamed by ``checkpoint_filter_fn``.
    """
    if isinstance(obj, Mapping) and obj.get("paper") == PAPER and "state_dict" in obj:
        return dict(obj["state_dict"])  # written by noah.convert: our names already
    if origin == "ours" and isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and key is None:
        state = dict(obj["model"])
        if state and all(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items()}
        return state
    if key is None:
        what, key = sniff_container(obj)
        log.info("%s: %s", source, what)
    return checkpoint_filter_fn(extract_state_dict(obj, key), model)


def fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                   finetune: bool = False) -> tuple[list[str], list[str]]:
    """Load ``sd`` into ``model`` strictly; with ``finetune`` head keys of another shape (another K) are dropped
    with one log line and the fresh head is kept. Any other mismatch is one line naming the keys, with the
    expected and found shapes."""
    own = model.state_dict()
    if finetune:
        bad = [k for k in head_keys(sd) if k not in own or own[k].shape != sd[k].shape]
        if bad:
            log.warning("fine-tuning: dropped %d head keys of another class count (%s); the head is re-initialised",
                        len(bad), ", ".join(bad))
            sd = {k: v for k, v in sd.items() if k not in bad}
            missing, unexpected = load_state_dict_verbose(model, sd, strict=False, source=source)
            if [k for k in missing if not k.startswith("head.")] or unexpected:
                load_state_dict_verbose(model, sd, strict=True, source=source)  # raises, naming the keys
            return missing, unexpected
    return load_state_dict_verbose(model, sd, strict=True, source=source)


def load_weights(model: nn.Module, path: str | os.PathLike, key: str | None = None, finetune: bool = False) -> str:
    """Load any checkpoint (ours, a ``noah.convert`` output, or an official release) into ``model``.

    Returns the weights' origin, ``ours`` or ``official`` (``common.checkpoint.read_checkpoint``).
    """
    obj, origin = read_checkpoint(path)
    sd = state_dict_of(obj, origin, model, key, source=f"checkpoint {path}")
    fit_state_dict(model, sd, f"checkpoint {path}", finetune)
    return origin


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike, key: str | None = None,
                             drop_head_on_mismatch: bool = False) -> tuple[list[str], list[str]]:
    """Load an official checkpoint into ``model``; returns (missing, unexpected) key names.

    ``key`` picks the container entry (e.g. ``model_ema``, ``state_dict_ema``); by default it is sniffed.
    With ``drop_head_on_mismatch`` (fine-tuning to another K) head keys whose shapes differ are dropped with
    one log line and the head keeps its fresh init; otherwise any mismatch is a one-line ``UserError`` that
    names the keys with the expected and found shapes.
    """
    obj = load_official_file(path)  # weights_only + allow-list first; the restricted unpickler only as fallback
    sd = state_dict_of(obj, "official", model, key, source=str(path))
    return fit_state_dict(model, sd, str(path), drop_head_on_mismatch)


def convert_file(source: str | os.PathLike, target: str | os.PathLike, overrides: list[str]) -> Path:
    """Official checkpoint ``source`` -> ``target`` in our names, for the model the overrides compose."""
    from common.config import compose, validate
    from noah.train import CONFIG_DIR, DataConfig, MethodConfig, ModelConfig, build_model

    cfg = compose(CONFIG_DIR, overrides)
    model = build_model(validate(cfg.model, ModelConfig, "model."), validate(cfg.data, DataConfig, "data."),
                        validate(cfg.method, MethodConfig, "method."))
    obj, origin = read_checkpoint(source)
    sd = state_dict_of(obj, origin, model, cfg.get("checkpoint_key"), source=str(source))
    fit_state_dict(model, sd, f"checkpoint {source}")
    return save_converted(model.state_dict(), target, PAPER, source, origin=origin, experiment=str(cfg.name),
                          model=str(cfg.model.name))


@cli_guard
def main(argv: list[str] | None = None) -> None:
    """``python -m noah.convert OFFICIAL.pth OURS.pt experiment=<row> [checkpoint_key=model_ema] [overrides]``

    Writes (atomically) exactly what ``noah.eval checkpoint=OURS.pt`` reads.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args if "=" not in a]
    if len(paths) != 2 or any(a in ("-h", "--help") for a in args):
        raise UserError("usage: python -m noah.convert OFFICIAL.pth OURS.pt experiment=<row> "
                        "[checkpoint_key=model_ema] [other config overrides]")
    out = convert_file(paths[0], paths[1], [a for a in args if "=" in a])
    print(f"wrote {out} (our key names; evaluate with: python -m noah.eval experiment=... checkpoint={out})")


if __name__ == "__main__":
    main()
