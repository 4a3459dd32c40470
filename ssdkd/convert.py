"""Official Fast-Datafree / CMI checkpoints and golden-fixture records -> this project's modules (spec g).

`checkpoint_filter_fn(state_dict, model)` (timm convention) applies, in order:

0. `module.` prefixes (DataParallel) are stripped;
1. CIFAR classifiers and the generator: identity (our modules keep the official key names);
2. DeepLabV3 saved from torchvision's `deeplabv3_*` layout: `classifier.{i}.` -> `classifier.classifier.{i}.`
   and the auxiliary head `aux_classifier.*` dropped (VainF's layout, ours, has neither difference).

`load_teacher(path, arch, num_classes)` reads a released teacher (`{'state_dict': ...}` or a plain state dict)
with the restricted loader (no code from the file runs) and names expected vs. found architecture / class count.

Golden fixtures (`shared/fixtures/ssdkd/*.pt`) record how they were made in `config`; `fixture_kind(config)`
dispatches on `config['source']` (the official `path::symbol (qualifier)`), `registry_key()` reads the registry
key opening `arch`/`teacher_arch`, and `model_from_record` / `generator_from_record` / `normalizer_from_record`
build what the record describes. Anything unknown or that this code cannot honour is a `UserError` naming it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.checkpoint import extract_state_dict, load_state_dict_verbose, read_checkpoint
from common.errors import UserError

from .datafree import Generator, Normalizer
from .models import create_model, model_names
from .models.deeplab import DeepLabV3

_TV_DEEPLAB = re.compile(r"^classifier\.(\d+)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Official state dict -> ours for `model` (rules 0-2 of the module docstring)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    deeplab = isinstance(model, DeepLabV3)
    tv_layout = deeplab and any(_TV_DEEPLAB.match(k) for k in state_dict)
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if tv_layout:
            if key.startswith("aux_classifier."):
                continue
            key = _TV_DEEPLAB.sub(r"classifier.classifier.\1.", key)
        out[key] = value
    return out


def _classes_of(state_dict: Mapping[str, Tensor]) -> int | None:
    """Class count of a classifier state dict (rows of its last 2-D weight: linear / fc / classifier)."""
    for key in ("linear.weight", "fc.weight", "classifier.weight", "classifier.1.weight",
                "classifier.classifier.4.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def read_state_dict(path: str | Path, what: str = "teacher") -> tuple[dict[str, Tensor], str]:
    """The network tensors of a checkpoint and their origin: a Fast/CMI release (`{'state_dict': ...}` or a plain
    state dict) through the restricted loader; our run's `best.pt` (the student) or `last.pt` (the distiller:
    its `student.` part) and `ssdkd.convert` outputs with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} checkpoint {path} not found; pass model.teacher_checkpoint=<Fast/CMI "
                        "checkpoints/pretrained/<dataset>_<arch>.pth> (spec d.1)" if what == "teacher" else
                        f"{what} checkpoint {path} not found; pass checkpoint=<best.pt of a run, or an official .pth>")
    try:
        obj, origin = read_checkpoint(path)
    except UserError:
        raise
    except Exception as err:  # torch/pickle errors on a torn or foreign file
        raise UserError(f"{what} checkpoint {path} is unreadable ({type(err).__name__}); re-download it") from None
    if isinstance(obj, Mapping) and obj.get("paper") == "ssdkd" and "state_dict" in obj:  # a convert output
        return dict(obj["state_dict"]), origin
    if origin == "ours" and isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
        if any(k.startswith("student.") for k in sd):  # last.pt: the whole distiller
            sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
        return dict(sd), origin
    key = "state_dict" if isinstance(obj, Mapping) and "state_dict" in obj else None
    return dict(extract_state_dict(obj, key)), origin


def load_teacher(path: str | Path, arch: str, num_classes: int, map_location: str = "cpu",
                 what: str = "teacher") -> nn.Module:
    """A released teacher (`checkpoints/pretrained/{dataset}_{arch}.pth`), one of our runs or a convert output,
    as our `arch`, frozen and in eval mode (also any student: `what` names it in errors).

    Absent, unreadable, of another class count or of another architecture -> one-line `UserError`."""
    raw, _ = read_state_dict(path, what)
    model = create_model(arch, num_classes)
    sd = checkpoint_filter_fn({k: v.to(map_location) for k, v in raw.items()}, model)
    found = _classes_of(sd)
    if found is not None and found != num_classes:
        raise UserError(f"{what} checkpoint {path} has {found} classes, expected {num_classes} "
                        f"(dataset mismatch?)")
    own = model.state_dict()
    overlap = sum(k in own for k in sd)
    if overlap < len(own) // 2:
        guess = _guess_arch(sd, num_classes)
        raise UserError(f"{what} checkpoint {path} is not a '{arch}' (expected {arch}, found "
                        f"{guess or 'an unknown architecture'}); set model.{what} to the checkpoint's architecture")
    load_state_dict_verbose(model, sd, strict=True, source=f"{what} checkpoint {path}")
    return model.eval().requires_grad_(False)


def _guess_arch(sd: Mapping[str, Tensor], num_classes: int) -> str | None:
    """The registry key whose state-dict keys and shapes equal `sd`'s, if any."""
    for name in model_names():
        if name.startswith("deeplab"):
            continue
        own = create_model(name, num_classes).state_dict()
        if own.keys() == sd.keys() and all(own[k].shape == sd[k].shape for k in own):
            return name
    return None


# ---------------------------------------------------------------------------------- golden fixtures
FIXTURE_KINDS = {
    ("datafree/hooks.py", "DeepInversionHook", None): "bn_loss",
    ("datafree/models/generator.py", "Generator", None): "generator",
    ("datafree/synthesis/fast_meta.py", "FastMetaSynthesizer.synthesize", "loss block"): "inversion_losses",
    ("datafree/synthesis/fast_meta.py", "FastMetaSynthesizer.synthesize", None): "meta_synthesis",
}
_SOURCE = re.compile(r"^\s*([\w./-]+\.py)::([\w.]+)\s*(?:\(([^)]*)\))?")


def fixture_kind(config: Mapping[str, Any]) -> str:
    """Which official code path a fixture records, from `config['source']` ("path::symbol (qualifier), ...").

    A parenthesised repository name ("zju-vipa/Fast-Datafree") is not a qualifier."""
    source = config.get("source") if isinstance(config, Mapping) else None
    if not isinstance(source, str):
        raise UserError("fixture config has no 'source' string; cannot tell which official code made it")
    m = _SOURCE.match(source)
    if m is None:
        raise UserError(f"fixture source {source!r} is not 'path.py::symbol'")
    qualifier = m.group(3)
    if qualifier is not None and "/" in qualifier:
        qualifier = None
    kind = FIXTURE_KINDS.get((m.group(1), m.group(2), qualifier))
    if kind is None:
        raise UserError(f"unknown fixture source {m.group(1)}::{m.group(2)}"
                        f"{f' ({qualifier})' if qualifier else ''}; known: "
                        + ", ".join(f"{p}::{s}{f' ({q})' if q else ''}" for p, s, q in FIXTURE_KINDS))
    return kind


def registry_key(text: str, field: str = "arch") -> str:
    """The Fast-Datafree registry key opening a recorded architecture string ("wrn16_1 (perturbed copy ...)")."""
    m = re.match(r"^\s*([A-Za-z0-9_]+)", str(text))
    key = m.group(1) if m else ""
    if key not in model_names():
        raise UserError(f"fixture {field} {text!r} does not open with a known registry key "
                        f"({', '.join(model_names())})")
    return key


def require(config: Mapping[str, Any], key: str) -> Any:
    """A recorded value that must be present."""
    if key not in config:
        raise UserError(f"fixture config lacks '{key}'")
    return config[key]


def model_from_record(arch: str, num_classes: int, state_dict: Mapping[str, Tensor], field: str = "arch") -> nn.Module:
    """The recorded network (registry key from `arch`) with the recorded weights, through `checkpoint_filter_fn`."""
    model = create_model(registry_key(arch, field), int(num_classes))
    load_state_dict_verbose(model, checkpoint_filter_fn(state_dict, model), strict=True, source=f"fixture {field}")
    return model


def generator_from_record(gen_cfg: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None) -> Generator:
    """A `Generator(nz, ngf, img_size, nc)` from a recorded generator config (+ weights); train mode (spec b.2)."""
    for key in ("nz", "ngf", "img_size", "nc"):
        if key not in gen_cfg:
            raise UserError(f"fixture generator config lacks '{key}'")
    mode = gen_cfg.get("mode", "train")
    if mode != "train":
        raise UserError(f"fixture generator mode {mode!r} cannot be honoured: the generator is always in train mode")
    gen = Generator(int(gen_cfg["nz"]), int(gen_cfg["ngf"]), int(gen_cfg["img_size"]), int(gen_cfg["nc"]))
    if state_dict is not None:
        load_state_dict_verbose(gen, checkpoint_filter_fn(state_dict, gen), strict=True, source="fixture generator")
    return gen.train()


def normalizer_from_record(config: Mapping[str, Any]) -> Normalizer:
    """The recorded normaliser (`normalizer: {mean, std}`)."""
    norm = require(config, "normalizer")
    return Normalizer(tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"]))


def augmentation_disabled(config: Mapping[str, Any]) -> bool:
    """Fixtures can only be replayed without the random crop/flip (its RNG stream is kornia's); anything else
    recorded under `augmentation` is refused by name."""
    aug = str(config.get("augmentation", "none"))
    if not aug.startswith("none"):
        raise UserError(f"fixture augmentation {aug!r} cannot be replayed (kornia's random stream); "
                        "only 'none (normalizer only)' fixtures are supported")
    return True


def set_mode(model: nn.Module, mode: str, field: str) -> nn.Module:
    """Honour a recorded `model_mode` / `teacher_mode` / `student_mode`."""
    if mode not in ("eval", "train"):
        raise UserError(f"fixture {field} {mode!r} is neither 'eval' nor 'train'")
    return model.train(mode == "train")


def adam_state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Any]]:
    """An Adam's per-parameter state keyed by `module`'s parameter names (the fixtures' layout)."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        out[names[id(p)]] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": float(st["step"])}
    return out


def load_adam_state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module,
                            state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore an Adam's state recorded per parameter name (`exp_avg`, `exp_avg_sq`, `step`)."""
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise UserError(f"recorded optimizer state names unknown parameters: {', '.join(unknown[:5])}")
    for name, st in state.items():
        p = params[name]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key not in st:
                raise UserError(f"recorded optimizer state of {name} lacks '{key}'")
        if tuple(st["exp_avg"].shape) != tuple(p.shape):
            raise UserError(f"recorded optimizer state of {name} has shape {tuple(st['exp_avg'].shape)}, "
                            f"parameter {tuple(p.shape)}")
        optimizer.state[p] = {"step": torch.tensor(float(st["step"])),
                              "exp_avg": st["exp_avg"].detach().clone().to(p.device),
                              "exp_avg_sq": st["exp_avg_sq"].detach().clone().to(p.device)}


def main(argv: list[str] | None = None) -> None:
    """`python -m ssdkd.convert SRC DST --arch A --classes N`: a Fast/CMI release (teacher or student) or one of
    our checkpoints -> the state dict `ssdkd.eval` and `model.teacher_checkpoint` read (atomic, weights_only)."""
    import argparse

    from common.checkpoint import save_converted

    p = argparse.ArgumentParser(description="Fast-Datafree / CMI checkpoint -> ssdkd state dict")
    p.add_argument("src", help="official .pth ({'state_dict': ...} or a plain state dict), or our best.pt/last.pt")
    p.add_argument("dst", help="output .pt (weights_only-loadable)")
    p.add_argument("--arch", required=True, help=f"registry key: {', '.join(model_names())}")
    p.add_argument("--classes", type=int, required=True, help="10 (CIFAR-10), 100 (CIFAR-100), 13 (NYUv2)")
    p.add_argument("--role", default="teacher", choices=("teacher", "student"))
    args = p.parse_args(argv)
    if args.arch not in model_names():
        raise UserError(f"--arch {args.arch!r} is not a registry key; valid: {', '.join(model_names())}")
    _, origin = read_state_dict(args.src, args.role)
    model = load_teacher(args.src, args.arch, args.classes, what=args.role)
    save_converted(model.state_dict(), args.dst, "ssdkd", args.src, origin, arch=args.arch,  # type: ignore[arg-type]
                   num_classes=args.classes, role=args.role)
    print(f"wrote {args.arch} ({args.classes} classes, {origin} weights) to {args.dst}")


if __name__ == "__main__":
    from common.errors import cli_guard

    cli_guard(main)()
