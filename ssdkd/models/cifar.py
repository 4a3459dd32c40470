"""The CIFAR classifiers of Fast-Datafree's `registry.py::MODEL_DICT` (spec c), under its key names.

Module and parameter names equal the official ones, so released teachers (`checkpoints/pretrained/
{dataset}_{arch}.pth`) load unchanged; BatchNorm layers are registered in the official order (the order of
the L_bn terms, spec b.4). Families: CIFAR ResNet-18/34/50 (DAFL: 3x3 stem, no max-pool, head `linear`),
RepDistiller ResNet-8..110 / x4 (head `fc`), ZSKT WRN-d-k (pre-activation), RepDistiller VGG-BN (head
`classifier`), ShuffleNetV2 and MobileNetV2 (torchvision's layout). Each has timm's `forward_features` /
`forward_head` contract.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNetV2 as _TVMobileNetV2


class _Classifier(nn.Module, metaclass=abc.ABCMeta):
    """timm's contract: `forward(x) = forward_head(forward_features(x))`."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.get_classifier()(x)

    @abc.abstractmethod
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------- DAFL CIFAR ResNet-18/34/50
class BasicBlock(nn.Module):
    """DAFL BasicBlock: conv-bn-relu-conv-bn + (1x1 conv + bn) projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """DAFL Bottleneck (expansion 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes * 4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_Classifier):
    """DAFL's CIFAR ResNet (spec c): 3x3 stride-1 stem, stages 64/128/256/512, head `linear`."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def get_classifier(self) -> nn.Module:
        return self.linear


# ------------------------------------------------------------------- RepDistiller CIFAR ResNet-8..110
class TinyBasicBlock(nn.Module):
    """RepDistiller BasicBlock with an optional `downsample` (1x1 conv + bn)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class TinyResNet(_Classifier):
    """RepDistiller's CIFAR ResNet (depth 6n+2, widths `num_filters`), head `fc`."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.num_features = num_filters[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [TinyBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TinyBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.avg_pool2d(x, 8).flatten(1)  # the official fixed AvgPool2d(8)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc


# ------------------------------------------------------------------------------------- ZSKT WRN-d-k
class WideBasic(nn.Module):
    """ZSKT pre-activation block; the shortcut sees the activated input only when in != out channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A stage of WRN blocks, held in `layer` (official key `blockK.layer.i`)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(_Classifier):
    """ZSKT WRN-depth-k (spec c): widths 16, 16k, 32k, 64k, final BN + ReLU, head `fc`, dropout 0."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.num_features = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


# ------------------------------------------------------------------------------ RepDistiller VGG-BN
VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(_Classifier):
    """RepDistiller VGG-BN (spec c): five blocks `block0..4` (last ReLU applied in forward), max-pools after
    blocks 0-2, the pool after block 3 only for 64x64 inputs, adaptive average pool, head `classifier`."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 10):
        super().__init__()
        in_ch = 3
        for i, widths in enumerate(cfg):
            layers: list[nn.Module] = []
            for v in widths:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
            self.add_module(f"block{i}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)
        self.num_features = 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or (i == 3 and h == 64):
                x = F.max_pool2d(x, 2, 2)
        return x

    def get_classifier(self) -> nn.Module:
        return self.classifier


# ------------------------------------------------------------------------------ RepDistiller ShuffleV2
def _channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBasic(nn.Module):
    """ShuffleNetV2 unit: split half, 1x1 - dw3x3 - 1x1 on one half, concat, shuffle."""

    def __init__(self, in_channels: int):
        super().__init__()
        c = in_channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return _channel_shuffle(torch.cat([x1, out], 1))


class ShuffleDown(nn.Module):
    """ShuffleNetV2 stride-2 unit."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return _channel_shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(_Classifier):
    """RepDistiller ShuffleNetV2 (net size 1): 1x1 stem, three stages, 1x1 conv to 1024, head `linear`."""

    def __init__(self, num_classes: int = 10, out_channels: tuple[int, ...] = (116, 232, 464, 1024),
                 num_blocks: tuple[int, ...] = (3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        for i, (oc, nb) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            self.add_module(f"layer{i}", nn.Sequential(ShuffleDown(in_ch, oc), *[ShuffleBasic(oc) for _ in range(nb)]))
            in_ch = oc
        self.conv2 = nn.Conv2d(in_ch, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.num_features = out_channels[3]

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.avg_pool2d(x, 4).flatten(1)  # the official fixed 4x4 pool (4x4 maps at 32x32)
        return x if pre_logits else self.linear(x)

    def get_classifier(self) -> nn.Module:
        return self.linear


class MobileNetV2(_TVMobileNetV2):
    """torchvision's MobileNetV2 (Fast-Datafree's copy has the same layout and keys), timm's contract added."""

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.classifier(x)  # Dropout(0.2) + Linear

    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- registry (MODEL_DICT)
MODEL_DICT = {
    "wrn16_1": lambda c: WideResNet(16, 1, c),
    "wrn16_2": lambda c: WideResNet(16, 2, c),
    "wrn40_1": lambda c: WideResNet(40, 1, c),
    "wrn40_2": lambda c: WideResNet(40, 2, c),
    "resnet8": lambda c: TinyResNet(8, [16, 16, 32, 64], c),
    "resnet20": lambda c: TinyResNet(20, [16, 16, 32, 64], c),
    "resnet32": lambda c: TinyResNet(32, [16, 16, 32, 64], c),
    "resnet56": lambda c: TinyResNet(56, [16, 16, 32, 64], c),
    "resnet110": lambda c: TinyResNet(110, [16, 16, 32, 64], c),
    "resnet8x4": lambda c: TinyResNet(8, [32, 64, 128, 256], c),
    "resnet32x4": lambda c: TinyResNet(32, [32, 64, 128, 256], c),
    "vgg8": lambda c: VGG(VGG_CFG["vgg8"], c),
    "vgg11": lambda c: VGG(VGG_CFG["vgg11"], c),
    "vgg13": lambda c: VGG(VGG_CFG["vgg13"], c),
    "shufflenetv2": lambda c: ShuffleNetV2(c),
    "mobilenetv2": lambda c: MobileNetV2(num_classes=c),
    "resnet50": lambda c: CifarResNet(Bottleneck, [3, 4, 6, 3], c),
    "resnet18": lambda c: CifarResNet(BasicBlock, [2, 2, 2, 2], c),
    "resnet34": lambda c: CifarResNet(BasicBlock, [3, 4, 6, 3], c),
}
