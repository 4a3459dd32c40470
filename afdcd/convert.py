"""Official Af-DCD / CIRKD checkpoints <-> this project's modules (timm `checkpoint_filter_fn` style, spec g).

Official files are plain state dicts (`module.` is stripped defensively). Rules, official -> ours:

* ResNet backbone: `pretrained.` -> `backbone.`, deep stem `conv1 -> conv1.0`, `bn1 -> conv1.1`,
  `conv2 -> conv1.3`, `bn2 -> conv1.4`, `conv3 -> conv1.6`, `bn3 -> bn1`; `layer*` unchanged;
* MobileNetV2 backbone: `pretrained.net.features.{i}` -> timm `conv_stem`/`bn1` (i = 0) and
  `blocks.{stage}.{block}` (i >= 1) with `conv.{0,1,3,4,6,7}` -> `conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3`
  (first block, t = 1: `conv.{0,1,3,4}` -> `conv_dw, bn1, conv_pw, bn2`);
* heads (`head.*`, `auxlayer.*`) keep their official names;
* Af-DCD loss module: `projetor` -> `generator`, `adpator_{1,2}` -> `adaptor_{1,2}` (sic in the official keys).

`to_official` / `loss_to_official` invert these rules exactly. ImageNet initialisations (CSAIL
`resnet18-imagenet.pth` / `mobilenetv2-imagenet.pth`, keys without `pretrained.`) load by intersection as in
the official code (`load_imagenet_backbone`). Our own checkpoints (`student.` / `model.` prefixes) pass through.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from common.checkpoint import extract_state_dict, load_foreign_state_dict, load_state_dict_verbose
from common.errors import UserError

from .afdcd import AfDCDLoss
from .models import MODEL_NAMES, DeepLabV3, PSPNet, create_model

__all__ = [
    "OFFICIAL_MODELS",
    "checkpoint_filter_fn",
    "infer_architecture",
    "load_imagenet_backbone",
    "load_loss_module",
    "load_model",
    "loss_filter_fn",
    "loss_kwargs_from_official",
    "loss_to_official",
    "to_official",
]

_STEM = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6",
         "bn3": "bn1"}
_STEM_BACK = {v: k for k, v in _STEM.items()}
# official MobileNetV2 features[1..17] -> timm (stage, block): t,c,n,s rows of c.2 give 1, 2, 3, 4, 3, 3, 1 blocks
_MBV2_BLOCKS = [(s, b) for s, n in enumerate((1, 2, 3, 4, 3, 3, 1)) for b in range(n)]
_MBV2_FIRST = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
_MBV2_REST = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}
_LOSS = [("projetor.", "generator."), ("adpator_", "adaptor_")]
# official `get_segmentation_model(model=..., backbone=...)` -> our model name
OFFICIAL_MODELS = {
    ("deeplabv3", "resnet101"): "deeplabv3_resnet101",
    ("deeplabv3", "resnet18"): "deeplabv3_resnet18",
    ("deeplab_mobile", "mobilenetv2"): "deeplabv3_mobilenetv2",
    ("psp", "resnet18"): "pspnet_resnet18",
}
CAMVID_CROP = 44  # the official CamVid branch crops the 45x45 map to 44x44 and does not pool (b.3.1)


def _strip(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    out: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in state_dict.items():
        out[k[7:] if k.startswith("module.") else k] = v
    return out


def _resnet_key(key: str) -> str:
    """An official ResNet backbone key without `pretrained.` -> timm's."""
    head, _, rest = key.partition(".")
    return f"{_STEM[head]}.{rest}" if head in _STEM else key


def _mbv2_key(key: str) -> str:
    """An official `features.{i}.{...}` key -> timm's, or the key unchanged when it is not one."""
    m = re.match(r"^features\.(\d+)\.(conv\.)?(\d+)\.(.+)$", key)
    if m is None:
        return key
    idx, sub, rest = int(m.group(1)), m.group(3), m.group(4)
    if idx == 0:
        stem = {"0": "conv_stem", "1": "bn1"}.get(sub)
        return f"{stem}.{rest}" if stem and m.group(2) is None else key
    names = _MBV2_FIRST if idx == 1 else _MBV2_REST
    if idx > len(_MBV2_BLOCKS) or m.group(2) is None or sub not in names:
        return key  # left as is: the strict load names it as unexpected
    stage, block = _MBV2_BLOCKS[idx - 1]
    return f"blocks.{stage}.{block}.{names[sub]}.{rest}"


def _mbv2_key_back(key: str) -> str:
    m = re.match(r"^(conv_stem|bn1)\.(.+)$", key)
    if m:
        return f"features.0.{'0' if m.group(1) == 'conv_stem' else '1'}.{m.group(2)}"
    m = re.match(r"^blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)$", key)
    if m is None:
        return key
    idx = _MBV2_BLOCKS.index((int(m.group(1)), int(m.group(2)))) + 1
    names = {v: k for k, v in (_MBV2_FIRST if idx == 1 else _MBV2_REST).items()}
    return f"features.{idx}.conv.{names[m.group(3)]}.{m.group(4)}"


def _is_mobilenet(model: nn.Module) -> bool:
    return getattr(model, "backbone_name", "") == "mobilenetv2"


def _unwrap(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Strip `module.`; keep only `student.*` of a whole distiller of ours; strip a `model.` wrapper."""
    sd = _strip(state_dict)
    if any(k.startswith("student.") for k in sd):
        sd = OrderedDict((k[8:], v) for k, v in sd.items() if k.startswith("student."))
    if sd and all(k.startswith("model.") for k in sd):
        sd = OrderedDict((k[6:], v) for k, v in sd.items())
    return sd


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Official (or our own) segmentation state dict -> `model`'s keys (see the module docstring)."""
    sd = _unwrap(state_dict)
    mobile = _is_mobilenet(model)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in sd.items():
        if key.startswith("pretrained."):
            key = key[len("pretrained."):]
            if mobile:
                key = _mbv2_key(key[4:] if key.startswith("net.") else key)
            else:
                key = _resnet_key(key)
            key = "backbone." + key
        out[key] = value
    return out


def to_official(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Our `model` state dict -> the official keys (the inverse of `checkpoint_filter_fn`)."""
    mobile = _is_mobilenet(model)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
            if mobile:
                key = "pretrained.net." + _mbv2_key_back(key)
            else:
                head, _, rest = key.partition(".")
                if head in ("conv1", "bn1"):
                    sub, _, rest2 = rest.partition(".")
                    stem = f"{head}.{sub}" if head == "conv1" else head
                    key = _STEM_BACK[stem] + "." + (rest2 if head == "conv1" else rest)
                key = "pretrained." + key
        out[key] = value
    return out


def loss_filter_fn(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Official loss-module keys -> `AfDCDLoss` keys (`projetor`/`adpator` -> `generator`/`adaptor`)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in _strip(state_dict).items():
        for old, new in _LOSS:
            key = key.replace(old, new)
        out[key] = value
    return out


def loss_to_official(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """`AfDCDLoss` keys -> the official ones (inverse of `loss_filter_fn`)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        for old, new in _LOSS:
            key = key.replace(new, old)
        out[key] = value
    return out


def loss_kwargs_from_official(cfg: Mapping[str, object]) -> dict[str, object]:
    """`AfDCDLoss` arguments from the official `OmniContrastiveFeatureLoss` constructor arguments (b.5).

    `dataset='camvid'` selects the 44x44 crop without pooling; every other dataset max-pools by `pool_size`.
    """
    required = ("student_channels", "teacher_channels", "tau_ocd", "M_ocd", "pool_size", "patch_size",
                "rand_mask", "mask_ratio", "enhance_projector", "dataset")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise UserError(f"official Af-DCD loss config lacks {', '.join(missing)}")
    camvid = cfg["dataset"] == "camvid"
    return {
        "student_channels": int(cfg["student_channels"]), "teacher_channels": int(cfg["teacher_channels"]),
        "tau": float(cfg["tau_ocd"]), "groups": int(cfg["M_ocd"]),
        "patch_size": tuple(int(p) for p in cfg["patch_size"]),  # type: ignore[union-attr]
        "pool_size": 0 if camvid else int(cfg["pool_size"]), "crop": CAMVID_CROP if camvid else None,
        "mask": "random" if cfg["rand_mask"] else "centre", "mask_ratio": float(cfg["mask_ratio"]),
        "generator": "enhanced" if cfg["enhance_projector"] else "plain",
    }


def infer_architecture(state_dict: Mapping[str, Tensor]) -> tuple[str, int, bool]:
    """(model name, num_classes, aux) read from an official or converted state dict's keys and shapes (k.10)."""
    sd = _unwrap(state_dict)
    keys = set(sd)
    aux = any(k.startswith("auxlayer.") for k in keys)
    if "head.classifier.weight" in keys:
        family, classes = "pspnet", sd["head.classifier.weight"].shape[0]
    elif "head.block.4.weight" in keys:
        family, classes = "deeplabv3", sd["head.block.4.weight"].shape[0]
    else:
        raise UserError("checkpoint has no DeepLabV3 (head.block.4) or PSPNet (head.classifier) classifier; "
                        "is it a segmentation checkpoint of Af-DCD/CIRKD (spec g)?")
    if any(".features." in k or k.startswith(("backbone.conv_stem", "backbone.blocks.")) for k in keys):
        backbone = "mobilenetv2"
    elif any(k.endswith("layer4.0.conv3.weight") for k in keys):
        backbone = "resnet101" if any(".layer3.22." in k for k in keys) else "resnet50"
    elif any(k.endswith("layer4.0.conv1.weight") for k in keys):
        backbone = "resnet18"
    else:
        raise UserError("cannot tell the backbone of this checkpoint (no layer4 / MobileNetV2 features keys)")
    name = f"{family}_{backbone}"
    if name not in MODEL_NAMES:
        raise UserError(f"checkpoint holds a {name} model, which is not one of spec c's: {', '.join(MODEL_NAMES)}")
    return name, int(classes), aux


def infer_width(state_dict: Mapping[str, Tensor], name: str) -> float:
    """The channel width of a model (1 for every spec c network; < 1 for the smoke profile's small ones):
    ResNets from the stem (64 at width 1), MobileNetV2 from the c4 channels the ASPP reads (320 at width 1)."""
    sd = _unwrap(state_dict)
    if "mobilenetv2" in name:
        head = sd.get("head.aspp.b0.0.weight")
        return 1.0 if head is None or head.shape[1] == 320 else head.shape[1] / 320
    stem = sd.get("pretrained.conv1.weight", sd.get("backbone.conv1.0.weight"))
    return 1.0 if stem is None or stem.shape[0] == 64 else stem.shape[0] / 64


def load_model(source: str | Path | Mapping[str, Tensor], name: str | None = None,
               num_classes: int | None = None, aux: bool | None = None) -> DeepLabV3 | PSPNet:
    """An official or own segmentation checkpoint as our model (strict; mismatches are named).

    `name`/`num_classes`/`aux` default to what the keys say; when given, a checkpoint of another architecture or
    class count is refused with a one-line message naming both.
    """
    raw = load_foreign_state_dict(source) if isinstance(source, (str, Path)) else extract_state_dict(source)
    found_name, found_classes, found_aux = infer_architecture(raw)
    where = f"checkpoint {source}" if isinstance(source, (str, Path)) else "state dict"
    if name is not None and name != found_name:
        raise UserError(f"{where} holds a {found_name} model, but {name} was asked for (spec c, g)")
    if num_classes is not None and num_classes != found_classes:
        raise UserError(f"{where} has {found_classes} classes, but the dataset has {num_classes}")
    model = create_model(found_name, found_classes, found_aux if aux is None else aux,
                         infer_width(raw, found_name))
    sd = checkpoint_filter_fn(raw, model)
    if aux is False and found_aux:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("auxlayer."))
    load_state_dict_verbose(model, sd, strict=True, source=f"{found_name} {where}")
    return model


def load_loss_module(source: str | Path | Mapping[str, Tensor], module: AfDCDLoss) -> AfDCDLoss:
    """Load an official (or our) Af-DCD loss-module state dict into `module` (strict; mismatches named)."""
    raw = load_foreign_state_dict(source) if isinstance(source, (str, Path)) else extract_state_dict(source)
    load_state_dict_verbose(module, loss_filter_fn(raw), strict=True, source="Af-DCD loss module")
    return module


def load_imagenet_backbone(model: DeepLabV3 | PSPNet, source: str | Path | Mapping[str, Tensor]) -> list[str]:
    """Initialise `model.backbone` from a CSAIL ImageNet file (`conv1..bn3, layer*` / `features.*`) by key
    intersection (c.1-c.2; the classifier is dropped). Returns the backbone keys left at their init."""
    raw = load_foreign_state_dict(source) if isinstance(source, (str, Path)) else extract_state_dict(source)
    mobile = _is_mobilenet(model)
    mapped = OrderedDict((_mbv2_key(k) if mobile else _resnet_key(k), v) for k, v in _strip(raw).items())
    own = model.backbone.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"no key of the ImageNet file fits the {model.backbone_name} backbone; expected the CSAIL "
                        "layout (conv1..bn3, layer1..4 or features.N) of spec c.1-c.2")
    model.backbone.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def main(argv: list[str] | None = None) -> None:
    """`python -m afdcd.convert SRC DST`: an official (or our) segmentation checkpoint -> what afdcd.eval reads."""
    import argparse

    from common.checkpoint import read_checkpoint, save_converted
    from common.errors import cli_guard

    @cli_guard
    def convert(args: list[str] | None) -> Path:
        p = argparse.ArgumentParser(prog="python -m afdcd.convert", description=main.__doc__)
        p.add_argument("src", help="official Af-DCD/CIRKD .pth (teacher or student) or a checkpoint of ours")
        p.add_argument("dst", help="output .pt: {'state_dict', 'origin', 'paper', 'source', 'arch'} (atomic)")
        p.add_argument("--model", choices=MODEL_NAMES, help="refuse a file of another architecture")
        p.add_argument("--num-classes", type=int, help="refuse a file with another class count")
        a = p.parse_args(args)
        if not Path(a.src).is_file():
            raise UserError(f"no checkpoint at {a.src}")
        obj, origin = read_checkpoint(a.src)
        model = load_model(obj, name=a.model, num_classes=a.num_classes)
        name, classes, aux = infer_architecture(extract_state_dict(obj))
        out = save_converted(model.state_dict(), a.dst, "afdcd", a.src, origin,
                             arch={"name": name, "num_classes": classes, "aux": aux, "width": model.width})
        print(f"wrote {name} ({classes} classes, aux {aux}, {origin} weights) to {out}")
        return Path(out)

    convert(argv)


if __name__ == "__main__":
    main()
