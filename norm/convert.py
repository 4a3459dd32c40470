"""Official NORM / RepDistiller checkpoints -> this project's modules (timm `checkpoint_filter_fn` style).

Rules, applied in order to every key of an official state dict (after `{'model': ...}` unwrapping and
`module.` stripping by `common.checkpoint.extract_state_dict`):

0. our own checkpoints (`best.pt` holds the `NORMStudent`, `last.pt` the whole distiller) pass through:
   `student.` is stripped and `teacher.*` dropped; a teacher run's `last.pt` loses the `model.` prefix of
   `common.engine.Classifier`;
1. drop the official student's unused tensors: `alpha`, `layer21.*`, `layer22.*` (spec b.6);
2. the FT: `layer31.` / `layer41.` -> `ft.expand.`, `layer32.` / `layer42.` -> `ft.contract.`;
3. ImageNet MobileNet-v1 only: `model1.{i}` / `model2.{i}` -> timm `conv_stem`/`bn1`/`blocks.{s}.{j}`, `fc` ->
   `classifier`; every other architecture already uses the official names (RepDistiller or torchvision);
4. student backbone keys get the `net.` prefix of `NORMStudent`.

`N` is inferred as `ft.expand.0.weight.shape[0] // C_t`. CLI:

    python -m norm.convert OFFICIAL.pth OUT.pt --arch resnet8x4 --teacher-channels 256 [--fold]
    python -m norm.convert TEACHER.pth OUT.pt --arch resnet32x4 --teacher
    python -m norm.convert RUN_DIR/best.pt OUT.pt --arch resnet8x4 --teacher-channels 256 --fold

The output (written atomically, `weights_only`-loadable, marked with the weights' origin) is what `norm.eval`
reads: a student for the NORM rows, a plain network for the CE rows (`--teacher`, or `--fold`, which writes
the deployed plain student, FT merged into the classifier, and reports the max logit deviation against the
unfolded student on a random batch). `checkpoint_filter_fn(state_dict, model)` is the pure key conversion.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from common.checkpoint import (
    Origin,
    extract_state_dict,
    load_state_dict_verbose,
    read_checkpoint,
    save_converted,
)
from common.errors import UserError, cli_guard

from .models import NORMStudent, create_model, is_foldable

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet50_quarter", "mobilenet_v1")
# official model names (train_*_student.py `--model_s/--model_t`) -> ours
OFFICIAL_ARCH = {
    "resnet20": "resnet20", "resnet32": "resnet32", "resnet56": "resnet56", "resnet110": "resnet110",
    "resnet8x4": "resnet8x4", "resnet32x4": "resnet32x4", "ResNet50": "resnet50_cifar",
    "wrn_16_2": "wrn_16_2", "wrn_40_1": "wrn_40_1", "wrn_40_2": "wrn_40_2", "vgg8": "vgg8", "vgg13": "vgg13",
    "MobileNetV2": "mobilenetv2", "ShuffleV1": "shufflev1", "ShuffleV2": "shufflev2",
    "resnet18S": "resnet18", "resnet34T": "resnet34", "resnet50T": "resnet50",
    "resnet50_4S": "resnet50_quarter",
    "MobileNet": "mobilenet_v1",
}
_UNUSED = re.compile(r"^(alpha$|layer21\.|layer22\.)")
_FT = [(re.compile(r"^layer[34]1\."), "ft.expand."), (re.compile(r"^layer[34]2\."), "ft.contract.")]

# official MobileNet (models/imagenet/MobileNet.py): model1 = [stem, dw x 11], model2 = [dw x 2]
# timm mobilenetv1_100: conv_stem/bn1, blocks = stages of 1, 2, 2, 6, 2 depthwise-separable blocks
_MBV1_STAGES = (1, 2, 2, 6, 2)
_MBV1_SUB = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}


def _mobilenet_v1_key(key: str) -> str:
    m = re.match(r"^model([12])\.(\d+)\.(\d+)\.(.+)$", key)
    if m is None:
        return "classifier." + key[3:] if key.startswith("fc.") else key
    seq, idx, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    if seq == 1 and idx == 0:
        return {"0": "conv_stem", "1": "bn1"}[sub] + "." + rest
    flat = idx if seq == 1 else 12 + idx  # 1-based index of the depthwise-separable block
    for stage, n in enumerate(_MBV1_STAGES):
        if flat <= n:
            return f"blocks.{stage}.{flat - 1}.{_MBV1_SUB[sub]}.{rest}"
        flat -= n
    raise UserError(f"official MobileNet key {key} is out of range; is this a MobileNet-v1 checkpoint?")


def convert_state_dict(state_dict: Mapping[str, Tensor], arch: str,
                       student: bool) -> OrderedDict[str, Tensor]:
    """Official keys -> ours: a `NORMStudent` state dict (`student=True`) or a plain network's."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    ours = any(k.startswith(("net.", "ft.", "student.net.")) for k in state_dict)
    if not student and all(k.startswith("model.") for k in state_dict):  # our Classifier-wrapped teacher
        state_dict = {k[6:]: v for k, v in state_dict.items()}
    for key, value in state_dict.items():
        key = key[7:] if key.startswith("module.") else key
        if ours:
            if not key.startswith("teacher."):
                out[key[8:] if key.startswith("student.") else key] = value
            continue
        if _UNUSED.match(key):
            continue
        for pattern, new in _FT:
            if pattern.match(key):
                key = pattern.sub(new, key)
                break
        else:
            if arch == "mobilenet_v1":
                key = _mobilenet_v1_key(key)
            if student:
                key = "net." + key
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Official (NORM / RepDistiller / torchvision) state dict -> ``model``'s keys (timm's convention, pure).

    ``model`` is a ``NORMStudent`` or a plain network; the MobileNet-v1 rule applies when the keys are the
    official MobileNet's (``model1.*``).
    """
    arch = "mobilenet_v1" if any(k.removeprefix("module.").startswith("model1.") for k in state_dict) else ""
    return convert_state_dict(state_dict, arch, student=isinstance(model, NORMStudent))


def read_state_dict(path: str | Path) -> tuple[Mapping[str, Tensor], Origin]:
    """The tensors of a checkpoint file and their origin: our run's ``best.pt`` / ``last.pt`` and
    ``norm.convert`` outputs with ``weights_only=True``, an official file through the safe official loader."""
    obj, origin = read_checkpoint(path)
    if isinstance(obj, Mapping) and obj.get("paper") == "norm" and "state_dict" in obj:  # a convert output
        return obj["state_dict"], origin
    if origin == "ours":
        return obj["model"], origin
    return extract_state_dict(obj), origin


def infer_n(state_dict: Mapping[str, Tensor], teacher_channels: int) -> int:
    """N from the FT's first conv, `[N*C_t, C_s, 1, 1]` (converted keys)."""
    if "ft.expand.0.weight" not in state_dict:
        raise UserError("checkpoint has no FT (layer31/layer41) weights; is it a NORM student checkpoint?")
    width = state_dict["ft.expand.0.weight"].shape[0]
    if width % teacher_channels:
        raise UserError(f"FT width {width} is not a multiple of the teacher's channels {teacher_channels}; "
                        "pass the C_t of the teacher this student was distilled from")
    return width // teacher_channels


def num_classes_of(state_dict: Mapping[str, Tensor]) -> int:
    """Rows of the last 2-D weight (the classifier) of a state dict."""
    return [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2][-1].shape[0]


def load_student(source: str | Path | Mapping[str, Tensor], arch: str, teacher_channels: int,
                 num_classes: int | None = None) -> NORMStudent:
    """A NORM student checkpoint (official, or one of ours) as a `NORMStudent`; mismatches are named."""
    raw = read_state_dict(source)[0] if isinstance(source, (str, Path)) else extract_state_dict(source)
    sd = convert_state_dict(raw, arch, student=True)
    n = infer_n(sd, teacher_channels)
    net = create_model(arch, num_classes or num_classes_of(sd), norm_variant=True)
    model = NORMStudent(net, teacher_channels, n)
    load_state_dict_verbose(model, sd, strict=True, source=f"{arch} student checkpoint")
    return model


def load_teacher(source: str | Path | Mapping[str, Tensor], arch: str,
                 num_classes: int | None = None) -> nn.Module:
    """A teacher (RepDistiller / torchvision file, one of our runs, or a state dict) as our plain network,
    in eval mode."""
    raw = read_state_dict(source)[0] if isinstance(source, (str, Path)) else extract_state_dict(source)
    sd = convert_state_dict(raw, arch, student=False)
    model = create_model(arch, num_classes or num_classes_of(sd))
    load_state_dict_verbose(model, sd, strict=True, source=f"{arch} teacher checkpoint")
    return model.eval()


@torch.no_grad()
def fold_and_check(student: NORMStudent, image_size: int, batch: int = 4,
                   seed: int = 0) -> tuple[nn.Module, float]:
    """Fold the FT; return the plain network and the max |logit difference| on a random batch (eval)."""
    if not is_foldable(student.net):
        raise UserError(f"{type(student.net).__name__} students cannot be folded exactly (a BN-ReLU follows "
                        "the FT, spec b.5); deploy the unfolded student instead")
    student = student.eval()
    plain = student.fold()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return plain, (plain(x) - student(x)).abs().max().item()


@cli_guard
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="official checkpoint (.pth)")
    p.add_argument("dst", help="output state dict (.pt, weights_only-loadable)")
    p.add_argument("--arch", required=True, help="our model name, e.g. resnet8x4, mobilenetv2, resnet18")
    p.add_argument("--teacher", action="store_true", help="the file is a plain (teacher) network")
    p.add_argument("--teacher-channels", type=int, help="C_t of the teacher feature (students only)")
    p.add_argument("--fold", action="store_true", help="write the deployed plain student (FT folded)")
    args = p.parse_args(argv)
    origin = read_state_dict(args.src)[1]

    def save(model: nn.Module, **meta: object) -> None:
        save_converted(model.state_dict(), args.dst, "norm", args.src, origin, arch=args.arch, **meta)

    if args.teacher:
        model = load_teacher(args.src, args.arch)
        save(model, role="teacher")
        print(f"wrote {args.arch} teacher state dict to {args.dst}")
        return
    if args.teacher_channels is None:
        raise UserError("--teacher-channels is required for a student checkpoint (e.g. 256 for resnet32x4)")
    student = load_student(args.src, args.arch, args.teacher_channels)
    if args.fold:
        plain, err = fold_and_check(student, 224 if args.arch in IMAGENET_MODELS else 32)
        save(plain, role="deployed")
        print(f"wrote folded {args.arch} (N={student.ft.n}) to {args.dst}; "
              f"max |logit diff| vs unfolded {err:.2e}")
    else:
        save(student, role="student")
        print(f"wrote {args.arch} NORM student (N={student.ft.n}) to {args.dst}")


if __name__ == "__main__":
    main()
