"""The two DeepLabV3 of NYUv2 (spec c, d.3, g): VainF's layout as vendored by Fast-Datafree, its key names.

* `deeplabv3_resnet50`: torchvision's ResNet-50 with layers 3-4 dilated (output stride 8), wrapped in
  torchvision's `IntermediateLayerGetter` (keys `backbone.conv1.weight`, `backbone.layer1...`).
* `deeplabv3_mobilenet`: VainF's dilated MobileNetV2 (explicit "fixed" padding before each inverted residual,
  an unpadded stride-2 stem), truncated to `features[4:-1]` (320 channels): keys
  `backbone.low_level_features.*`, `backbone.high_level_features.*`.
* Head (`classifier.classifier.{0..4}`): ASPP(256, rates 12/24/36) + 3x3 conv + BN + ReLU + 1x1 classifier,
  no auxiliary head; logits are bilinearly resized to the input size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter


class ASPPConv(nn.Sequential):
    """3x3 atrous conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Sequential):
    """Image-level branch: global pool, 1x1 conv + BN + ReLU, upsampled back."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (256 channels, five branches, dropout 0.1 after the projection)."""

    def __init__(self, cin: int, rates: tuple[int, int, int], cout: int = 256):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)),
            *[ASPPConv(cin, cout, r) for r in rates], ASPPPooling(cin, cout)])
        self.project = nn.Sequential(nn.Conv2d(5 * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Module):
    """ASPP + 3x3 conv + BN + ReLU + 1x1 classifier (kaiming-normal convs, BN 1/0)."""

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, int, int] = (12, 24, 36)):
        super().__init__()
        self.classifier = nn.Sequential(ASPP(cin, rates), nn.Conv2d(256, 256, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])


class DeepLabV3(nn.Module):
    """backbone -> head -> bilinear resize to the input (VainF `_SimpleSegmentationModel`)."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        out = self.classifier(self.backbone(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------- VainF dilated MobileNetV2
class _ConvBNReLU6(nn.Sequential):
    """Conv (padding 0: VainF pads explicitly) + BN + ReLU6."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, 0, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    """MobileNetV2 block; the input is zero-padded for the 3x3 (dilated) depthwise conv *before* the whole block,
    so the 1x1 expansion also runs on the padded border (VainF's behaviour)."""

    def __init__(self, inp: int, oup: int, stride: int, dilation: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = [] if expand_ratio == 1 else [_ConvBNReLU6(inp, hidden, 1)]
        layers += [_ConvBNReLU6(hidden, hidden, 3, stride, dilation, hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        eff = 3 + 2 * (dilation - 1)
        beg = (eff - 1) // 2
        self.input_padding = (beg, eff - 1 - beg, beg, eff - 1 - beg)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.pad(x, self.input_padding))
        return x + out if self.use_res_connect else out


class DeepLabMobileNetV2Backbone(nn.Module):
    """VainF's MobileNetV2 at output stride 8 split into `low_level_features` (features[0:4]) and
    `high_level_features` (features[4:-1]); the final 1x1 conv to 1280 is dropped."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, output_stride: int = 8):
        super().__init__()
        features: list[nn.Module] = [_ConvBNReLU6(3, 32, 3, 2)]
        current_stride, dilation, cin = 2, 1, 32
        for t, c, n, s in self.SETTING:
            previous_dilation = dilation
            if current_stride == output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                features.append(_InvertedResidual(cin, c, stride if i == 0 else 1,
                                                  previous_dilation if i == 0 else dilation, t))
                cin = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.low_level_features = nn.Sequential(*features[0:4])
        self.high_level_features = nn.Sequential(*features[4:])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict(out=self.high_level_features(self.low_level_features(x)))


def deeplabv3_resnet50(num_classes: int = 13, output_stride: int = 8) -> DeepLabV3:
    """DeepLabV3-ResNet50 (spec c: 39,636,813 parameters at 13 classes)."""
    dilate = [False, True, True] if output_stride == 8 else [False, False, True]
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    backbone = IntermediateLayerGetter(resnet50(weights=None, replace_stride_with_dilation=dilate),
                                       return_layers={"layer4": "out"})
    return DeepLabV3(backbone, DeepLabHead(2048, num_classes, rates))


def deeplabv3_mobilenet(num_classes: int = 13, output_stride: int = 8) -> DeepLabV3:
    """DeepLabV3-MobileNetV2 (spec c: 5,111,821 parameters at 13 classes)."""
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    return DeepLabV3(DeepLabMobileNetV2Backbone(output_stride), DeepLabHead(320, num_classes, rates))


SEGMENTATION_MODEL_DICT = {"deeplabv3_resnet50": deeplabv3_resnet50, "deeplabv3_mobilenet": deeplabv3_mobilenet}
