"""VGG-BN for CIFAR in the RepDistiller layout (`models/cifar/vgg.py`: blocks 0-4, one Linear).

`forward_features` is ReLU(block4), 512 x 4 x 4 at 32 px: the FT position of the NORM student (`VGGS`)
and the matched teacher feature `feat[4]` (spec b.6, b.7).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import PooledClassifier

CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _block(widths: list[int], c_in: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(PooledClassifier):
    head_name = "classifier"

    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        c = 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(widths, c))
            c = widths[-1]
        self.num_features = c
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        pool_block3 = x.shape[2] == 64  # the official net pools after block3 only for 64-px inputs
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if pool_block3:
            x = F.max_pool2d(x, 2)
        return F.relu(self.block4(x))
