"""Official `yikaiw/SNN` checkpoints (and fixture state_dicts) -> this project's models (spec g).

`checkpoint_filter_fn(state_dict, model)` is timm's convention: a pure function returning a state_dict
that loads strictly into `model`. Rules:

1. strip `module.` (the official nets are wrapped in `nn.DataParallel`);
2. `binary_conv.binarize.patterns` (SNN step 2) is kept for an SNN model; its tau must be the model's;
   the official quantizer's `memory` and `step` are not saved, so they restart as sign(patterns) and 0
   (entries with |p| < 1e-3 make that memory undefined: warned);
3. for a Sparks model, an SNN sub-codebook seeds the layer: X[r, id_r] = kappa, so Hungarian(X) puts the
   SNN ids in rows 0..n-1; a step-1 checkpoint (no patterns) gets the selector's own init from the
   step-1 latent weights (`freq`: most frequent codewords at kappa, b.8; `zeros`: X = 0);
4. the Sparks selection schedule, absent from other checkpoints, starts at step 0;
5. a step-1 checkpoint for an SNN / fixed model keeps the model's random sub-codebook (the official
   `strict=False` load, d.1); for `bnn` / `real` models patterns are dropped.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import load_foreign_state_dict, load_state_dict_verbose, save_converted
from common.errors import UserError, cli_guard

from .sparks import HardBinaryConv, codeword_ids

PATTERNS = ".binarize.patterns"


def _strip(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Official / fixture state_dict -> a state_dict that loads strictly into `model` (rules above)."""
    sd = _strip(state_dict)
    own = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    convs = {name: m for name, m in model.named_modules() if isinstance(m, HardBinaryConv)}
    for key, value in sd.items():
        if key.endswith(PATTERNS):
            continue  # handled per conv below
        out[key] = value
    for name, conv in convs.items():
        prefix = f"{name}." if name else ""
        patterns = sd.get(f"{prefix}binarize.patterns")
        if patterns is not None and conv.quantizer in ("snn", "sparks", "fixed"):
            n = 2 ** conv.tau
            if patterns.shape != (n, 9):
                tau = patterns.shape[0].bit_length() - 1
                raise UserError(f"checkpoint layer {prefix}binarize.patterns has {patterns.shape[0]} codewords "
                                f"(tau={tau}) but the model is built with tau={conv.tau} ({n}); rebuild it with "
                                f"tau={tau} or use a matching checkpoint")
            if (patterns.abs() < 1e-3).any():
                warnings.warn(f"{prefix}binarize.patterns has entries with |p| < 1e-3: the official memory for "
                              "them was lost with the checkpoint; they restart from sign(patterns)", stacklevel=2)
        if conv.quantizer == "snn":
            if patterns is None:  # step-1 checkpoint: random init kept (official strict=False)
                patterns = own[f"{prefix}binarize.patterns"]
            out[f"{prefix}binarize.patterns"] = patterns
            sign = torch.sign(patterns)
            out[f"{prefix}binarize.memory"] = torch.where(sign == 0, own[f"{prefix}binarize.memory"], sign)
            out[f"{prefix}binarize.step"] = torch.zeros((), dtype=torch.long)
        elif conv.quantizer == "sparks":
            sel = conv.selector
            weight = sd.get(f"{prefix}weight")
            if f"{prefix}selector.logits" in sd:
                continue  # our own Sparks checkpoint
            with torch.no_grad():
                scratch = type(sel)(sel.n, sel.iters, sel.hard_every, sel.init, sel.kappa, sel.rectangular)
                if patterns is not None:
                    scratch.init_from_ids(codeword_ids(patterns))
                elif weight is not None:
                    scratch.init_from_weight(weight)
                else:
                    continue  # nothing to seed from: reported as missing
            out[f"{prefix}selector.logits"] = scratch.logits.detach().to(own[f"{prefix}selector.logits"].dtype)
            out[f"{prefix}selector.selected_ids"] = scratch.selected_ids.clone()
        elif conv.quantizer == "fixed" and patterns is not None:
            out[f"{prefix}binarize.selected_ids"] = codeword_ids(patterns)
        elif conv.quantizer == "fixed":
            out.setdefault(f"{prefix}binarize.selected_ids", own[f"{prefix}binarize.selected_ids"])
    for key, value in own.items():  # a step-2 run from another checkpoint starts its schedule at step 0
        if key.startswith("selection_schedule.") and key not in out:
            out[key] = torch.zeros_like(value) if key.endswith(".step") else value
    return out


def load_official_checkpoint(path: str | os.PathLike, model: nn.Module, strict: bool = True,
                             key: str | None = "state_dict") -> tuple[list[str], list[str]]:
    """Read an official `checkpoint*.pth.tar` with the restricted loader, convert, load; odd keys named."""
    raw = load_foreign_state_dict(path, key=key)
    return load_state_dict_verbose(model, checkpoint_filter_fn(raw, model), strict=strict, source=str(path))


def seed_sparks_from_snn(sparks_conv: HardBinaryConv, snn_conv: HardBinaryConv, kappa: float | None = None) -> None:
    """An SNN layer's sub-codebook seeds a Sparks layer: Hungarian(X)[:n] = the SNN memory ids (spec g)."""
    if sparks_conv.quantizer != "sparks" or snn_conv.quantizer != "snn":
        raise ValueError("seed_sparks_from_snn needs a sparks conv and an snn conv")
    with torch.no_grad():
        sparks_conv.weight.copy_(snn_conv.weight)
    sparks_conv.selector.init_from_ids(snn_conv.binarize.codeword_ids(), kappa)


def convert_file(source: str | os.PathLike, target: str | os.PathLike, overrides: list[str]) -> Path:
    """Official checkpoint `source` -> `target` (our names, atomic) for the network the overrides compose."""
    from common.config import compose

    from .config import build_network, parse
    from .train import CONFIG_DIR

    cfg = compose(CONFIG_DIR, overrides)
    model_cfg, method_cfg = parse(cfg)
    net = build_network(model_cfg, method_cfg)
    load_official_checkpoint(source, net, strict=True, key=cfg.get("checkpoint_key"))
    return save_converted(net.state_dict(), target, "pste_bnn", source, experiment=str(cfg.name),
                          model=model_cfg.name, quantizer=method_cfg.quantizer, tau=method_cfg.tau)


@cli_guard
def main(argv: list[str] | None = None) -> None:
    """`python -m pste_bnn.convert OFFICIAL.pth.tar OURS.pt experiment=<row> [method.tau=..] [checkpoint_key=...]`

    Writes (atomically) exactly what `pste_bnn.eval checkpoint=OURS.pt` reads.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args if "=" not in a]
    if len(paths) != 2 or any(a in ("-h", "--help") for a in args):
        raise UserError("usage: python -m pste_bnn.convert OFFICIAL.pth.tar OURS.pt experiment=<row> "
                        "[method.tau=5] [checkpoint_key=state_dict] [other config overrides]")
    out = convert_file(paths[0], paths[1], [a for a in args if "=" in a])
    print(f"wrote {out} (official weights in our names; evaluate with pste_bnn.eval checkpoint={out})")


if __name__ == "__main__":
    main()
