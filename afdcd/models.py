"""The four output-stride-8 segmentation networks of spec c, on timm backbones, with the official head names.

* `deeplabv3_resnet101` (teacher), `deeplabv3_resnet18`: DeepLabV3 (ASPP 12/24/36, image pooling) + FCN aux
  head on a deep-stem dilated ResNet (timm `stem_type='deep', stem_width=64, output_stride=8`, bit-exact
  with the official v1s backbone, c.1);
* `deeplabv3_mobilenetv2`: DeepLabV3 (width 128) on timm `mobilenetv2_100` features[0..17] at stride 8 (c.2),
  no aux head;
* `pspnet_resnet18`: pyramid pooling (1, 2, 3, 6) + FCN aux head on the ResNet18 above (c.3).

Module names are the official ones (`head.aspp.b0`, `head.block`, `auxlayer.block`, `head.psp.conv1`, ...), so
head keys load unchanged; the backbone is `backbone` (timm names; afdcd/convert.py renames `pretrained.*`).
`forward(x)` gives the stride-8 logits (inference); `forward_all(x)` gives `SegOutputs` (logits, aux logits or
None, c4, head_feat), the official output list.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import make_divisible
from torch import Tensor, nn

__all__ = ["MODEL_NAMES", "DeepLabV3", "PSPNet", "SegOutputs", "create_model", "feature_channels"]


class SegOutputs(NamedTuple):
    """The official output list: logits, aux logits (ResNet models; else None), c4 and the head feature."""

    logits: Tensor
    aux: Tensor | None
    c4: Tensor
    head_feat: Tensor


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(True))


class _ASPPConv(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int) -> None:
        super().__init__()
        self.block = _conv_bn_relu(cin, cout, 3, rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _ASPPPooling(nn.Module):
    """Image-level branch: global average -> 1x1 conv + BN + ReLU -> bilinear (align_corners=True) upsample."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.gap(x), x.shape[2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (c.3): 1x1, three 3x3 (rates 12/24/36), image pooling; project 5w -> w."""

    def __init__(self, cin: int, width: int, rates: tuple[int, int, int] = (12, 24, 36)) -> None:
        super().__init__()
        self.b0 = _conv_bn_relu(cin, width)
        self.b1, self.b2, self.b3 = (_ASPPConv(cin, width, r) for r in rates)
        self.b4 = _ASPPPooling(cin, width)
        self.project = nn.Sequential(*_conv_bn_relu(5 * width, width), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class DeepLabHead(nn.Module):
    """ASPP -> 3x3 conv + BN + ReLU + Dropout(0.1) (= head_feat) -> 1x1 classifier (`block.4`)."""

    def __init__(self, cin: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.aspp = ASPP(cin, width)
        self.block = nn.Sequential(*_conv_bn_relu(width, width, 3), nn.Dropout(0.1),
                                   nn.Conv2d(width, num_classes, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.block[:4](self.aspp(x))
        return self.block[4](feat), feat


class PyramidPooling(nn.Module):
    """PSP module (c.3): adaptive average pools 1, 2, 3, 6 -> 1x1 conv C -> C/4 + BN + ReLU -> upsample; concat."""

    bins = (1, 2, 3, 6)

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4 = (_conv_bn_relu(cin, cin // 4) for _ in self.bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        convs = (self.conv1, self.conv2, self.conv3, self.conv4)
        pooled = [F.interpolate(conv(F.adaptive_avg_pool2d(x, b)), size, mode="bilinear", align_corners=True)
                  for b, conv in zip(self.bins, convs)]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling -> 3x3 conv 2C -> w + BN + ReLU + Dropout(0.1) (= head_feat) -> 1x1 `classifier`."""

    def __init__(self, cin: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.psp = PyramidPooling(cin)
        self.block = nn.Sequential(*_conv_bn_relu(2 * cin, width, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.block(self.psp(x))
        return self.classifier(feat), feat


class FCNHead(nn.Module):
    """Aux head on c3 (c.3): 3x3 conv C -> C/4 + BN + ReLU + Dropout(0.1) -> 1x1 classifier (`block.4`)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1),
                                   nn.Conv2d(cin // 4, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


# ----------------------------------------------------------------------------------------------- backbones
BACKBONES = {
    # name: (timm name, timm kwargs, c3 channels or None (no aux), c4 channels)
    "resnet18": ("resnet18", {"stem_type": "deep", "stem_width": 64, "out_indices": (3, 4)}, 256, 512),
    "resnet101": ("resnet101", {"stem_type": "deep", "stem_width": 64, "out_indices": (3, 4)}, 1024, 2048),
    "mobilenetv2": ("mobilenetv2_100", {"out_indices": (4,)}, None, 320),
}


def create_backbone(name: str, width: float = 1.0) -> nn.Module:
    """A timm features-only backbone at output stride 8 (random init; no download).

    `width` < 1 scales every channel count (the CPU smoke profile's small networks, the same architecture
    otherwise): ResNet stem and stages by `width`, MobileNetV2 by timm's channel multiplier (rounded to
    multiples of 8, as timm's `mobilenetv2_050` etc.). Tables and parameter counts use width 1.
    """
    timm_name, kwargs, _, _ = BACKBONES[name]
    kwargs = {**kwargs, "pretrained": False, "features_only": True, "output_stride": 8}
    if width == 1.0:
        return timm.create_model(timm_name, **kwargs)
    if name == "mobilenetv2":
        # timm registers fixed multipliers only (mobilenetv2_035 ... _140); its generator takes any
        from timm.models.efficientnet import _gen_mobilenet_v2

        return _gen_mobilenet_v2(timm_name, width, **kwargs)
    kwargs.update(stem_width=_scaled(64, width), channels=tuple(_scaled(c, width) for c in (64, 128, 256, 512)))
    return timm.create_model(timm_name, **kwargs)


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class _SegModel(nn.Module):
    def __init__(self, backbone: str, head: nn.Module, num_classes: int, aux: bool, width: float = 1.0) -> None:
        super().__init__()
        if aux and BACKBONES[backbone][2] is None:
            raise ValueError(f"the {backbone} model has no aux head (spec c.3)")
        self.backbone_name, self.num_classes, self.width = backbone, num_classes, width
        self.backbone = create_backbone(backbone, width)
        self.head = head
        self.auxlayer = FCNHead(_c3(backbone, width), num_classes) if aux else None
        if self.backbone.feature_info.channels()[-1] != _c4(backbone, width):
            raise ValueError(f"{backbone} at width {width}: c4 has {self.backbone.feature_info.channels()[-1]} "
                             f"channels, the head expects {_c4(backbone, width)}")

    @property
    def c4_channels(self) -> int:
        return _c4(self.backbone_name, self.width)

    def forward_all(self, x: Tensor, aux: bool = True) -> SegOutputs:
        """Logits, aux logits (or None), c4 and head_feat, all at stride 8 (the official output list).

        `aux=False` skips the aux head (None in its place): a frozen teacher's aux logits are never used (b.1).
        """
        feats = self.backbone(x)
        c4 = feats[-1]
        logits, head_feat = self.head(c4)
        aux_logits = self.auxlayer(feats[0]) if aux and self.auxlayer is not None else None
        return SegOutputs(logits, aux_logits, c4, head_feat)

    def forward(self, x: Tensor) -> Tensor:
        """Stride-8 logits (inference, identical for every training method)."""
        feats = self.backbone(x)
        return self.head(feats[-1])[0]


def _c3(backbone: str, width: float) -> int:
    c3 = BACKBONES[backbone][2]
    return c3 if width == 1.0 or c3 is None else _scaled(c3, width)


def _c4(backbone: str, width: float) -> int:
    c4 = BACKBONES[backbone][3]
    if width == 1.0:
        return c4
    return make_divisible(c4 * width, 8) if backbone == "mobilenetv2" else _scaled(c4, width)


class DeepLabV3(_SegModel):
    """DeepLabV3 (c.3): ASPP head of width 128 (C4 512/320) or 256 (C4 2048), optional FCN aux head on c3."""

    def __init__(self, backbone: str, num_classes: int, aux: bool = True, width: float = 1.0) -> None:
        head_width = 256 if BACKBONES[backbone][3] == 2048 else 128
        head = DeepLabHead(_c4(backbone, width), num_classes, _scaled(head_width, width))
        super().__init__(backbone, head, num_classes, aux, width)


class PSPNet(_SegModel):
    """PSPNet (c.3): pyramid pooling head of width 128 (C4 512) or 512 (C4 2048), optional FCN aux head."""

    def __init__(self, backbone: str, num_classes: int, aux: bool = True, width: float = 1.0) -> None:
        head_width = 512 if BACKBONES[backbone][3] == 2048 else 128
        super().__init__(backbone, PSPHead(_c4(backbone, width), num_classes, _scaled(head_width, width)),
                         num_classes, aux, width)


MODEL_NAMES = ("deeplabv3_resnet101", "deeplabv3_resnet18", "deeplabv3_mobilenetv2", "pspnet_resnet18")


def create_model(name: str, num_classes: int, aux: bool | None = None, width: float = 1.0) -> DeepLabV3 | PSPNet:
    """A §c model by name; `aux` defaults to True for ResNet models (the official setting) and False for MBV2.

    `width` < 1 (smoke profile only) scales every channel count of backbone and heads."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    family, backbone = name.split("_", 1)
    if aux is None:
        aux = BACKBONES[backbone][2] is not None
    cls = DeepLabV3 if family == "deeplabv3" else PSPNet
    return cls(backbone, num_classes, aux, width)


def feature_channels(name: str, width: float = 1.0) -> int:
    """C of the distilled `c4` map of a model (b.0): 2048 / 512 / 320 (at width 1)."""
    return _c4(name.split("_", 1)[1], width)
