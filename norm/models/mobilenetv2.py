"""MobileNetV2 for CIFAR in the RepDistiller layout (`models/cifar/mobilenetv2.py`, `mobile_half`).

`norm_variant=True` is the official NORM student (`mobilenetv2_student.py`): no ReLU after the stem
(`conv1`) nor after the last 1x1 conv (`conv2`). The deployed NORM MobileNetV2 is that variant, not the
plain network of the baseline rows (fixture `mobilenetv2_student_s0.pt`, spec b.6).
`forward_features` is the `conv2` output (1280 x 2 x 2 at 32 px).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import PooledClassifier

# t (expansion), c (channels before width scaling), n (blocks), s (first stride)
SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
           [6, 320, 1, 1]]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(PooledClassifier):
    head_name = "classifier"
    linear_name = "classifier.0"

    def __init__(self, width_mult: float = 0.5, expansion: int = 6, num_classes: int = 100,
                 norm_variant: bool = False):
        super().__init__()
        self.norm_variant = norm_variant
        c = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        blocks = []
        for t, ch, n, s in SETTING:
            t = expansion if t != 1 else 1
            c_out = int(ch * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(c, self.num_features, 1, bias=False),
                                   nn.BatchNorm2d(self.num_features))
        self.classifier = nn.Sequential(nn.Linear(self.num_features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.norm_variant:
            x = F.relu(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return x if self.norm_variant else F.relu(x)
