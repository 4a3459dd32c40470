"""``create_model(name, head=...)``: the 26 hosts of spec e (and the other official widths) x {baseline, NOAH}.

Names are the official factory names (``resnet50``, ``mobilenetv2_050``, ``deit_tiny_050_patch16_224``,
``pvt_tiny_075``, ``gmlp_ti16_050_224`` ...); an official ``noah_`` prefix selects ``head="noah"``. Backbones
come from timm (ResNet, MobileNetV2, DeiT, Mixer, gMLP), torchvision (ShuffleNetV2) or local files written with
timm layers (PVT v1, the official MobileNetV3). Host changes of spec b.6/b.8: no class token and 196/49-row
``pos_embed`` for NOAH-DeiT/PVT, DeiT ``pre_logits`` for widths < 192, MobileNetV3's last 1x1 conv before
pooling for NOAH, no classifier dropout in baselines, per-host head initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import timm
from timm.models.mlp_mixer import GatedMlp, MlpMixer, SpatialGatingBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from noah.models.classifier import Classifier, HeadInit, Layout
from noah.models.mobilenetv3 import MobileNetV3
from noah.models.pvt import PyramidVisionTransformer
from noah.models.shufflenetv2 import STAGE_CHANNELS, ShuffleNetV2Features

DEIT_PRE_LOGITS_DIM = 192  # official: Linear(D, 192) + tanh when D < 192


@dataclass(frozen=True)
class HostSpec:
    """One host: its family, backbone arguments and NOAH defaults (spec b.7)."""

    family: str
    args: dict[str, Any] = field(default_factory=dict)
    head_num: int = 4
    key_ratio: float = 0.5
    head_dropout: float = 0.1


def _cnn(family: str, n: int, r: float, p: float, **args: Any) -> HostSpec:
    return HostSpec(family, args, n, r, p)


HOSTS: dict[str, HostSpec] = {
    # c.1 CNNs. ResNet50/101/152 dropout is not stated (spec b.7, k.6): assumed 0.1 as ResNet18.
    "resnet18": _cnn("resnet", 4, 1 / 2, 0.1),
    "resnet34": _cnn("resnet", 4, 1 / 2, 0.1),  # defined by the official file, not a paper row
    "resnet50": _cnn("resnet", 4, 1 / 8, 0.1),
    "resnet101": _cnn("resnet", 4, 1 / 8, 0.1),
    "resnet152": _cnn("resnet", 4, 1 / 8, 0.1),
    **{f"mobilenetv2_{w}": _cnn("mobilenetv2", 8, 1 / 4, 0.2) for w in ("035", "050", "075", "100")},
    "mobilenetv3_small": _cnn("mobilenetv3", 8, 1 / 4, 0.2, mode="small"),
    "mobilenetv3_large": _cnn("mobilenetv3", 8, 1 / 4, 0.2, mode="large"),  # official file, not a paper row
    **{name: _cnn("shufflenetv2", 8, 1 / 4, 0.0, stages=ch) for name, ch in STAGE_CHANNELS.items()},
    # c.2 ViTs: N=4, r=1/2, head dropout 0.1 (model-class defaults)
    "deit_base_patch16_224": HostSpec("deit", {"embed_dim": 768, "num_heads": 12}),
    "deit_small_patch16_224": HostSpec("deit", {"embed_dim": 384, "num_heads": 6}),
    "deit_tiny_patch16_224": HostSpec("deit", {"embed_dim": 192, "num_heads": 3}),
    "deit_tiny_075_patch16_224": HostSpec("deit", {"embed_dim": 144, "num_heads": 3}),
    "deit_tiny_050_patch16_224": HostSpec("deit", {"embed_dim": 96, "num_heads": 3}),
    # MS-COCO host of the abstract (spec d.5); its N, r, dropout are not published: the ViT defaults assumed
    "vit_large_patch16_224": HostSpec("deit", {"embed_dim": 1024, "num_heads": 16, "depth": 24}),
    "pvt_tiny": HostSpec("pvt", {"embed_dims": (64, 128, 320, 512)}),
    "pvt_tiny_075": HostSpec("pvt", {"embed_dims": (48, 96, 240, 384)}),
    "pvt_tiny_050": HostSpec("pvt", {"embed_dims": (32, 64, 160, 256)}),
    # c.3 MLPs
    "mixer_b16_224": HostSpec("mixer", {"embed_dim": 768, "num_blocks": 12}),
    "mixer_s16_224": HostSpec("mixer", {"embed_dim": 512, "num_blocks": 8}),
    "mixer_s16_075_224": HostSpec("mixer", {"embed_dim": 384, "num_blocks": 8}),
    "mixer_s16_050_224": HostSpec("mixer", {"embed_dim": 256, "num_blocks": 8}),
    "gmlp_s16_224": HostSpec("gmlp", {"embed_dim": 256}),
    "gmlp_ti16_224": HostSpec("gmlp", {"embed_dim": 128}),
    "gmlp_ti16_075_224": HostSpec("gmlp", {"embed_dim": 96}),
    "gmlp_ti16_050_224": HostSpec("gmlp", {"embed_dim": 64}),
}

# the host's effect on the head's init (spec b.4): (NOAH, linear baseline)
_HEAD_INIT: dict[str, tuple[HeadInit, HeadInit]] = {
    "resnet": ("kaiming", "normal001"), "mobilenetv2": ("kaiming", "normal001"),
    "mobilenetv3": ("kaiming", "normal001"), "shufflenetv2": ("kaiming", "torch"),
    "deit": ("kaiming", "trunc002"), "pvt": ("kaiming", "trunc002"),
    "mixer": ("lecun", "zeros"), "gmlp": ("lecun", "zeros"),
}
TOKEN_FAMILIES = ("deit", "pvt", "mixer", "gmlp")


def list_models() -> list[str]:
    """Every host name ``create_model`` accepts (without the ``noah_`` prefix)."""
    return sorted(HOSTS)


def resolve_name(name: str, head: str | None = None) -> tuple[str, str]:
    """(host name, head kind) from a name and an optional ``head``; ``noah_<host>`` means head="noah"."""
    host, implied = (name[5:], "noah") if name.startswith("noah_") else (name, None)
    if host not in HOSTS:
        raise ValueError(f"unknown model {name!r}; known hosts: {', '.join(list_models())}")
    kind = head or implied or "noah"
    if kind not in ("noah", "linear", "baseline"):
        raise ValueError(f"head must be 'noah' or 'baseline' (alias 'linear'), got {head!r}")
    if implied and kind != "noah":
        raise ValueError(f"model {name!r} is the NOAH model but head={head!r} was asked for")
    return host, "linear" if kind == "baseline" else kind


def vision_transformer(*, head: str, img_size: int = 224, patch_size: int = 16, embed_dim: int = 192,
                       depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                       layernorm_eps: float = 1e-6, drop_path: float = 0.0) -> VisionTransformer:
    """A DeiT backbone on timm: class token for the baseline, none (``pos_embed`` L rows) for NOAH."""
    noah = head == "noah"
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=partial(nn.LayerNorm, eps=layernorm_eps),
        class_token=not noah, global_pool="" if noah else "token", num_classes=0, drop_path_rate=drop_path)


def deit_pre_logits_dim(embed_dim: int, pre_logits: bool | None) -> int | None:
    """The ``pre_logits`` width: official rule (192 when D < 192) unless switched on/off (spec c.2 notes)."""
    use = embed_dim < DEIT_PRE_LOGITS_DIM if pre_logits is None else pre_logits
    return DEIT_PRE_LOGITS_DIM if use else None


def _backbone(spec: HostSpec, host: str, head: str, img_size: int, drop_path: float,
              drop: float) -> tuple[nn.Module, int, Layout]:
    fam, a = spec.family, spec.args
    if fam == "resnet":
        m = timm.create_model(host, pretrained=False, num_classes=0, zero_init_last=False, drop_path_rate=drop_path)
        return m, m.num_features, "map"
    if fam == "mobilenetv2":
        m = timm.create_model(host, pretrained=False, num_classes=0, drop_path_rate=drop_path)
        return m, m.num_features, "map"
    if fam == "mobilenetv3":
        m = MobileNetV3(a["mode"], pool_before_last_conv=head == "linear")
        return m, m.num_features, "map"
    if fam == "shufflenetv2":
        m = ShuffleNetV2Features(a["stages"])
        return m, m.num_features, "map"
    if fam == "deit":
        m = vision_transformer(head=head, img_size=img_size, embed_dim=a["embed_dim"], num_heads=a["num_heads"],
                               depth=a.get("depth", 12), drop_path=drop_path)
        return m, m.num_features, "tokens"
    if fam == "pvt":
        m = PyramidVisionTransformer(img_size=img_size, embed_dims=a["embed_dims"], drop_path_rate=drop_path,
                                     class_token=head == "linear")
        return m, m.num_features, "tokens"
    if fam in ("mixer", "gmlp"):
        kw: dict[str, Any] = {"embed_dim": a["embed_dim"], "num_blocks": a.get("num_blocks", 30)}
        if fam == "gmlp":
            kw.update(mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)
        m = MlpMixer(num_classes=0, img_size=img_size, patch_size=16, drop_path_rate=drop_path,
                     proj_drop_rate=drop, **kw)
        return m, m.num_features, "tokens"
    raise AssertionError(fam)


def no_weight_decay_names(family: str, head: str) -> tuple[str, ...]:
    """Parameters the official recipe exempts from decay beyond 1-D tensors (spec d.2, d.3)."""
    if family == "deit":
        return ("backbone.pos_embed",) if head == "noah" else ("backbone.pos_embed", "backbone.cls_token")
    if family == "pvt":
        return () if head == "noah" else ("backbone.cls_token",)  # NOAH-PVT decays its pos_embed*
    return ()


def create_model(name: str, head: str | None = None, num_classes: int = 1000, head_num: int | None = None,
                 key_ratio: float | None = None, head_dropout: float | None = None, head_split: bool = True,
                 kv_split: bool = True, pre_logits: bool | None = None, img_size: int = 224,
                 drop_path: float = 0.0, drop: float = 0.0) -> Classifier:
    """Build a host with its baseline (``head="baseline"``/``"linear"``) or NOAH (``head="noah"``) head.

    ``head_num``/``key_ratio``/``head_dropout`` default to the paper's per-family values (spec b.7).
    ``pre_logits`` (DeiT only) forces the ``Linear(D, 192) + tanh`` projection on/off; None = official rule.
    ``drop`` is the dropout inside Mixer/gMLP MLPs (spec d.4); ``drop_path`` the stochastic depth rate.
    """
    host, kind = resolve_name(name, head)
    spec = HOSTS[host]
    if pre_logits is not None and spec.family != "deit":
        raise ValueError(f"pre_logits applies to DeiT hosts only, not {name!r}")
    if drop and spec.family not in ("mixer", "gmlp"):
        raise ValueError(f"drop (MLP dropout) applies to Mixer/gMLP hosts only, not {name!r}")
    backbone, width, layout = _backbone(spec, host, kind, img_size, drop_path, drop)
    pre = deit_pre_logits_dim(width, pre_logits) if spec.family == "deit" else None
    return Classifier(
        backbone, width, num_classes, head=kind, layout=layout,
        head_num=spec.head_num if head_num is None else head_num,
        key_ratio=spec.key_ratio if key_ratio is None else key_ratio,
        head_dropout=spec.head_dropout if head_dropout is None else head_dropout,
        head_split=head_split, kv_split=kv_split, pre_logits_dim=pre,
        head_init=_HEAD_INIT[spec.family][0 if kind == "noah" else 1],
        no_weight_decay=no_weight_decay_names(spec.family, kind),
    )


def family_of(name: str) -> str:
    """The family of a host name (``noah_`` prefix allowed)."""
    return HOSTS[resolve_name(name)[0]].family


def vit_classifier(*, num_classes: int, head: str = "noah", img_size: int = 224, patch_size: int = 16,
                   embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                   qkv_bias: bool = True, layernorm_eps: float = 1e-6, pre_logits_dim: int | None = None,
                   head_num: int = 4, key_ratio: float = 0.5, head_dropout: float = 0.1, head_split: bool = True,
                   kv_split: bool = True, drop_path: float = 0.0) -> Classifier:
    """A DeiT of any size from the official ``NOAH_VisionTransformer`` / ``VisionTransformer`` arguments."""
    _, kind = resolve_name("deit_tiny_patch16_224", head)
    backbone = vision_transformer(head=kind, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                  depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                  layernorm_eps=layernorm_eps, drop_path=drop_path)
    return Classifier(backbone, embed_dim, num_classes, head=kind, layout="tokens", head_num=head_num,
                      key_ratio=key_ratio, head_dropout=head_dropout, head_split=head_split, kv_split=kv_split,
                      pre_logits_dim=pre_logits_dim, head_init=_HEAD_INIT["deit"][0 if kind == "noah" else 1],
                      no_weight_decay=no_weight_decay_names("deit", kind))
