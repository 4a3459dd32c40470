"""Networks that carry NORM, and the student wrapper that adds the Feature Transform.

Every network exposes the timm contract `forward_features(x)` (the map at the FT position, which is also
the feature a teacher of that family provides for matching; spec b.7), `forward_head(x)`, `get_classifier()`
and `num_features`. `create_model(name, num_classes)` builds the plain network; `NORMStudent(net, C_t, N)`
adds the FT; `NORMStudent.fold()` returns the plain network with the FT merged into its classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import timm
import torch
from timm.models.resnet import Bottleneck as TimmBottleneck
from timm.models.resnet import ResNet as TimmResNet
from torch import Tensor, nn

from ..norm import FeatureTransform, fold_into_linear
from .base import PooledClassifier
from .cifar_resnet import CifarResNet, CifarResNetV2
from .mobilenetv2 import MobileNetV2
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import CFGS, VGG
from .wrn import WideResNet

_CIFAR: dict[str, Callable[..., nn.Module]] = {
    "resnet8": lambda **kw: CifarResNet(8, (16, 16, 32, 64), **kw),  # RepDistiller's; the MNIST check's student
    "resnet14": lambda **kw: CifarResNet(14, (16, 16, 32, 64), **kw),
    "resnet20": lambda **kw: CifarResNet(20, (16, 16, 32, 64), **kw),
    "resnet32": lambda **kw: CifarResNet(32, (16, 16, 32, 64), **kw),
    "resnet56": lambda **kw: CifarResNet(56, (16, 16, 32, 64), **kw),
    "resnet110": lambda **kw: CifarResNet(110, (16, 16, 32, 64), **kw),
    "resnet8x4": lambda **kw: CifarResNet(8, (32, 64, 128, 256), **kw),
    "resnet32x4": lambda **kw: CifarResNet(32, (32, 64, 128, 256), **kw),
    "resnet50_cifar": lambda **kw: CifarResNetV2((3, 4, 6, 3), **kw),
    "wrn_16_2": lambda **kw: WideResNet(16, 2, **kw),
    "wrn_40_1": lambda **kw: WideResNet(40, 1, **kw),
    "wrn_40_2": lambda **kw: WideResNet(40, 2, **kw),
    "vgg8": lambda **kw: VGG(CFGS["vgg8"], **kw),
    "vgg13": lambda **kw: VGG(CFGS["vgg13"], **kw),
    "mobilenetv2": lambda **kw: MobileNetV2(0.5, 6, **kw),
    "shufflev1": lambda **kw: ShuffleNetV1(**kw),
    "shufflev2": lambda **kw: ShuffleNetV2(**kw),
}

_IMAGENET: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kw: timm.create_model("resnet18", pretrained=False, **kw),
    "resnet34": lambda **kw: timm.create_model("resnet34", pretrained=False, **kw),
    "resnet50": lambda **kw: timm.create_model("resnet50", pretrained=False, **kw),
    # ResNet50-1/4: every stage's planes divided by 4, 64-channel stem kept (official `resnet50_4S`)
    "resnet50_quarter": lambda **kw: TimmResNet(TimmBottleneck, (3, 4, 6, 3), channels=(16, 32, 64, 128),
                                                **kw),
    # MobileNet v1 with plain ReLU, as the official `models/imagenet/MobileNet.py`
    "mobilenet_v1": lambda **kw: timm.create_model("mobilenetv1_100", pretrained=False, act_layer="relu",
                                                   **kw),
}

MODEL_NAMES = sorted(_CIFAR) + sorted(_IMAGENET)


def create_model(name: str, num_classes: int, norm_variant: bool = False) -> nn.Module:
    """Build a plain network by name. `norm_variant` selects the official NORM student variant where it
    differs from the plain network (only MobileNetV2: no ReLU after the stem and the last 1x1 conv)."""
    if name in _CIFAR:
        kwargs = {"norm_variant": norm_variant} if name == "mobilenetv2" else {}
        return _CIFAR[name](num_classes=num_classes, **kwargs)
    if name in _IMAGENET:
        return _IMAGENET[name](num_classes=num_classes)
    raise KeyError(f"unknown model '{name}'; choose one of {', '.join(MODEL_NAMES)}")


def is_foldable(net: nn.Module) -> bool:
    """True when only global average pooling and one Linear follow `forward_features` (spec b.5)."""
    return getattr(net, "foldable", True)


def pre_logits(net: nn.Module, feat: Tensor) -> Tensor:
    """The pooled feature `net`'s classifier reads, from its `forward_features` map (CRD's f_s / f_t)."""
    if isinstance(net, PooledClassifier):
        return net.pool(feat)
    return net.forward_head(feat, pre_logits=True)  # timm


class NORMStudent(nn.Module):
    """A plain network `net` with NORM's Feature Transform between its last stage and its head."""

    def __init__(self, net: nn.Module, teacher_channels: int, n: int = 8, residual: bool = True):
        super().__init__()
        self.net = net
        self.ft = FeatureTransform(net.num_features, teacher_channels, n, residual)

    def forward_ft(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns `(e, y)`: the expanded feature matched to the teacher and the FT output the head reads."""
        return self.ft(self.net.forward_features(x))

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns `(e, logits)`: the expanded feature matched to the teacher and the raw logits."""
        e, y = self.forward_ft(x)
        return e, self.net.forward_head(y)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_train(x)[1]

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The deployed student: a copy of `net` whose classifier absorbs the eval-mode FT (spec b.5)."""
        if not is_foldable(self.net):
            raise ValueError(f"{type(self.net).__name__} has a BN-ReLU between the FT and the classifier; "
                             "the FT cannot be folded exactly (spec b.5)")
        plain = copy.deepcopy(self.net).eval()
        merged = fold_into_linear(self.ft, self.net.get_classifier())
        fc = plain.get_classifier()
        fc.weight.copy_(merged.weight)
        fc.bias.copy_(merged.bias)
        return plain
