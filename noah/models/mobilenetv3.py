"""The official MobileNetV3 (``models/noah_mobilenetv3.py``, spec c.1), written with timm's activation layers.

Not torchvision's or timm's MobileNetV3: SE (no-bias linears, reduction 4, hard-sigmoid) sits *before* the
block activation, the stem is a plain 3x3 conv, and the last 1x1 conv (576 -> 1280, bias, no BN) + h-swish
runs after the global pool in the baseline but on every position for NOAH (spec b.6, b.8.7). Module indices
follow the official ``features`` Sequential, so official backbone keys load unchanged.
"""

from __future__ import annotations

import math

from timm.layers import get_act_layer
from torch import Tensor, nn

# k, exp, out, SE, activation, stride (official tables; "RE" = ReLU, "HS" = hard-swish)
SMALL = [
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
]
LARGE = [
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
]
_ACT = {"RE": "relu", "HS": "hard_swish"}


def make_divisible_up(x: float, divisor: int = 8) -> int:
    """The official rounding: *up* to a multiple of ``divisor`` (timm's rounds to nearest)."""
    return int(math.ceil(x / divisor) * divisor)


class SqueezeExcite(nn.Module):
    """GAP -> Linear(c, c/4, no bias) -> ReLU -> Linear(c/4, c, no bias) -> hard-sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False), get_act_layer("hard_sigmoid")(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean((2, 3))).unsqueeze(-1).unsqueeze(-1)


class Bottleneck(nn.Module):
    """1x1 expand-BN-act, depthwise kxk-BN, SE, act, 1x1 project-BN; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, exp: int, se: bool, act: str) -> None:
        super().__init__()
        act_layer = get_act_layer(_ACT[act])
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, bias=False), nn.BatchNorm2d(exp), act_layer(inplace=True),
            nn.Conv2d(exp, exp, kernel, stride, (kernel - 1) // 2, groups=exp, bias=False), nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(), act_layer(inplace=True),
            nn.Conv2d(exp, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _conv_bn_act(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, bias=False), nn.BatchNorm2d(oup),
                         get_act_layer("hard_swish")(inplace=True))


class MobileNetV3(nn.Module):
    """Backbone of the official MobileNetV3 (no classifier); ``pool_before_last_conv`` = the baseline layout."""

    def __init__(self, mode: str = "small", width_mult: float = 1.0, pool_before_last_conv: bool = False) -> None:
        super().__init__()
        if mode not in ("small", "large"):
            raise ValueError(f"MobileNetV3 mode must be 'small' or 'large', got {mode!r}")
        last_channel = make_divisible_up(1280 * width_mult) if width_mult > 1.0 else 1280
        features: list[nn.Module] = [_conv_bn_act(3, 16, 3, 2)]
        inp = 16
        for k, exp, c, se, act, s in SMALL if mode == "small" else LARGE:
            out = make_divisible_up(c * width_mult)
            features.append(Bottleneck(inp, out, k, s, make_divisible_up(exp * width_mult), se, act))
            inp = out
        last_conv = make_divisible_up((576 if mode == "small" else 960) * width_mult)
        features.append(_conv_bn_act(inp, last_conv, 1, 1))
        if pool_before_last_conv:
            features.append(nn.AdaptiveAvgPool2d(1))
        features += [nn.Conv2d(last_conv, last_channel, 1), get_act_layer("hard_swish")(inplace=True)]
        self.features = nn.Sequential(*features)
        self.num_features = last_channel
        self._init_weights()

    def _init_weights(self) -> None:
        """Official ``_initialize_weights``: Kaiming fan_out convs, BN identity, N(0, 0.01) linears (SE)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = True) -> Tensor:
        """The baseline's pooled vector (the pool already ran inside ``features``)."""
        return x.mean((2, 3))
