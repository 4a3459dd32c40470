"""Build timm networks from recorded mmcls model configs (`ImageClassifier` dicts, spec c/g).

Used to rebuild the teacher and student of an official checkpoint or golden fixture from its
`teacher_cfg` / `student_cfg`. Every backbone key either changes the network (and is honoured) or is
listed as inert; any other key, or an unsupported value, is a `UserError` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from common.errors import UserError

from . import convnext, mixer, mobilenet_v1, resnet, swin, vit

# keys that never change the forward maths of a freshly built network
_INERT = {"type", "out_indices", "init_cfg", "with_cp", "frozen_stages", "norm_eval", "out_type",
          "final_norm", "norm_cfg", "act_cfg", "conv_cfg", "style", "num_stages", "drop_rate",
          "attn_drop_rate", "drop_path_rate", "gap_before_final_norm", "with_cls_token", "output_cls_token",
          "avg_token", "patch_cfg", "layer_cfgs", "stage_cfgs", "interpolate_mode", "pad_small_map",
          "out_after_downsample", "use_abs_pos_embed", "patch_norm", "in_channels", "pre_norm"}
# inert keys whose value must be the one we build
_REQUIRED = {"style": "pytorch", "use_abs_pos_embed": False, "out_after_downsample": False, "pad_small_map": False,
             "gap_before_final_norm": False, "drop_rate": 0.0, "attn_drop_rate": 0.0, "in_channels": 3,
             "pre_norm": False, "patch_norm": True, "final_norm": True}

_SWIN = {"t": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
         "b": (128, (2, 2, 18, 2), (4, 8, 16, 32)), "l": (192, (2, 2, 18, 2), (6, 12, 24, 48))}
_VIT = {"deit-tiny": (192, 12, 3, 768), "deit-small": (384, 12, 6, 1536), "deit-base": (768, 12, 12, 3072),
        "b": (768, 12, 12, 3072), "l": (1024, 24, 16, 4096)}
_MIXER = {"s": (512, 8, 256, 2048), "b": (768, 12, 384, 3072), "l": (1024, 24, 512, 4096)}
_CONVNEXT = {"tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
             "base": ((3, 3, 27, 3), (128, 256, 512, 1024)), "large": ((3, 3, 27, 3), (192, 384, 768, 1536))}
_ALIASES = {"tiny": "t", "small": "s", "base": "b", "large": "l"}


def _arch(arch: Any, table: Mapping[str, Any], keys: tuple[str, ...], what: str) -> tuple:
    if isinstance(arch, Mapping):
        missing = [k for k in keys if k not in arch]
        if missing:
            raise UserError(f"{what} arch dict lacks {missing}; it needs {list(keys)}")
        return tuple(tuple(arch[k]) if isinstance(arch[k], (list, tuple)) else arch[k] for k in keys)
    name = str(arch).lower()
    name = name if name in table else _ALIASES.get(name, name)
    if name not in table:
        raise UserError(f"{what} arch {arch!r} is not one of {sorted(table)} (or a dict with {list(keys)})")
    return table[name]


def _check_keys(cfg: Mapping[str, Any], honoured: set[str]) -> None:
    for key, value in cfg.items():
        if key in honoured:
            continue
        if key not in _INERT:
            raise UserError(f"backbone key {key!r} of {cfg.get('type')} is not supported by scalekd's builder")
        want = _REQUIRED.get(key)
        if key in _REQUIRED and value != want:
            raise UserError(f"backbone {cfg.get('type')}: {key}={value!r} is not supported (only {want!r})")


def build_backbone(cfg: Mapping[str, Any], num_classes: int, img_size: int = 224) -> nn.Module:
    """An mmcls backbone config (+ a linear head of `num_classes`) -> the equivalent timm network."""
    kind = cfg.get("type")
    dpr = float(cfg.get("drop_path_rate", 0.0))
    if kind in ("ResNet", "ResNetV1d"):
        _check_keys(cfg, {"depth", "stem_channels", "base_channels", "deep_stem", "avg_down"})
        deep = bool(cfg.get("deep_stem", kind == "ResNetV1d"))
        avg = bool(cfg.get("avg_down", kind == "ResNetV1d"))
        return resnet(int(cfg["depth"]), int(cfg.get("stem_channels", 64)), int(cfg.get("base_channels", 64)),
                      deep_stem=deep, avg_down=avg, num_classes=num_classes, drop_path_rate=dpr)
    if kind == "SwinTransformer":
        _check_keys(cfg, {"arch", "img_size", "patch_size", "window_size"})
        dim, depths, heads = _arch(cfg.get("arch", "tiny"), _SWIN, ("embed_dims", "depths", "num_heads"), kind)
        return swin(dim, depths, heads, window_size=int(cfg.get("window_size", 7)),
                    patch_size=int(cfg.get("patch_size", 4)), img_size=int(cfg.get("img_size", img_size)),
                    num_classes=num_classes, drop_path_rate=dpr)
    if kind == "VisionTransformer":
        _check_keys(cfg, {"arch", "img_size", "patch_size"})
        if cfg.get("with_cls_token", True) and cfg.get("output_cls_token", False):
            raise UserError("VisionTransformer students with a class-token head are not ScaleKD's (spec c)")
        dim, depth, heads, ffn = _arch(cfg.get("arch", "b"), _VIT,
                                       ("embed_dims", "num_layers", "num_heads", "feedforward_channels"), kind)
        return vit(dim, depth, heads, mlp_ratio=ffn / dim, patch_size=int(cfg.get("patch_size", 16)),
                   img_size=int(cfg.get("img_size", img_size)), num_classes=num_classes, drop_path_rate=dpr)
    if kind == "MlpMixer":
        _check_keys(cfg, {"arch", "img_size", "patch_size"})
        dim, depth, tok, ch = _arch(cfg.get("arch", "b"), _MIXER,
                                    ("embed_dims", "num_layers", "tokens_mlp_dims", "channels_mlp_dims"), kind)
        return mixer(dim, depth, tok, ch, patch_size=int(cfg.get("patch_size", 16)),
                     img_size=int(cfg.get("img_size", img_size)), num_classes=num_classes, drop_path_rate=dpr)
    if kind == "ConvNeXt":
        _check_keys(cfg, {"arch"})
        depths, dims = _arch(cfg.get("arch", "tiny"), _CONVNEXT, ("depths", "channels"), kind)
        return convnext(depths, dims, num_classes=num_classes, drop_path_rate=dpr)
    if kind == "MobileNetV1":
        _check_keys(cfg, set())
        return mobilenet_v1(num_classes=num_classes)
    raise UserError(f"backbone type {kind!r} is not supported; ScaleKD's are ResNet, ResNetV1d, MobileNetV1, "
                    "ConvNeXt, SwinTransformer, VisionTransformer, MlpMixer")


def build_classifier(cfg: Mapping[str, Any], img_size: int = 224) -> nn.Module:
    """An mmcls `ImageClassifier` config (backbone, GAP neck, linear head) -> a timm network."""
    if "backbone" not in cfg or "head" not in cfg:
        raise UserError(f"model config needs 'backbone' and 'head', got keys {sorted(cfg)}")
    head = cfg["head"]
    return build_backbone(cfg["backbone"], int(head.get("num_classes", 1000)), img_size)
