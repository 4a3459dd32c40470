"""Bi-Real / ReActNet networks carrying the sub-bit quantizers (spec b.11, c), built by hand (not timm).

ImageNet: `birealnet18` / `birealnet34` (official `step1|step2/birealnet.py`; any tau on both, the
quantizer by name). CIFAR-10 candidates (spec c: which nets Sparks used is unverified; OUR READING):
`cifar_birealnet18`, `cifar_birealnet20`, `cifar_vgg_small`. The mini-reproduction net of spec i:
`mini_net`. Every model has `forward_features` / `forward_head`, `binary_convs()` and, for Sparks, one
global `selection_schedule` whose selection is computed for all layers at once per training forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .sparks import HardBinaryConv, PermutationSelector, SelectionSchedule, select_codebooks


class BinaryActivation(nn.Module):
    """sign(x) with sign(0) = 0; gradient of the piecewise polynomial, max(0, 2 - 2|x|) (b.11.2)."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
            ctx.save_for_backward(x)
            return torch.sign(x)

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * (2.0 - 2.0 * x.abs()).clamp_min_(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self._Fn.apply(x)


class LearnableBias(nn.Module):
    """x + b, b [1, C, 1, 1] initialised to 0 (ReActNet's RSign / RPReLU shifts, b.11)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class BasicBlock(nn.Module):
    """Bi-Real block with one binary 3x3 conv: move0 -> sign -> conv -> BN -> + residual -> RPReLU (b.11)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: nn.Module | None = None,
                 quantizer: str = "bnn", tau: int = 5, quantizer_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.move0 = LearnableBias(in_chs)
        self.binary_activation = BinaryActivation()
        self.binary_conv = HardBinaryConv(in_chs, out_chs, stride, quantizer, tau, **(quantizer_kwargs or {}))
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.move1 = LearnableBias(out_chs)
        self.prelu = nn.PReLU(out_chs)
        self.move2 = LearnableBias(out_chs)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.binary_conv(self.binary_activation(self.move0(x))))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.move2(self.prelu(self.move1(out)))


def avgpool_downsample(in_chs: int, out_chs: int, stride: int) -> nn.Sequential:
    """AvgPool2d(2, stride) -> real 1x1 conv -> BN (official `downsample`; indices 0/1/2 kept for keys)."""
    return nn.Sequential(nn.AvgPool2d(kernel_size=2, stride=stride),
                         nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False), nn.BatchNorm2d(out_chs))


class SubBitNet(nn.Module):
    """Shared machinery: the binary convs, the global selection schedule, the batched PSTE selection."""

    def _setup_selection(self, schedule_kwargs: dict[str, Any] | None) -> None:
        selectors = [m for m in self.modules() if isinstance(m, PermutationSelector)]
        if selectors:
            self.selection_schedule = SelectionSchedule(**(schedule_kwargs or {}))
            for s in selectors:
                s.attach_schedule(self.selection_schedule)
        elif schedule_kwargs:
            raise ValueError("a selection schedule is only meaningful with quantizer='sparks'")

    def binary_convs(self) -> list[tuple[str, HardBinaryConv]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, HardBinaryConv)]

    def selectors(self) -> list[PermutationSelector]:
        return [m for m in self.modules() if isinstance(m, PermutationSelector)]

    def prime_selection(self) -> None:
        """Compute every layer's training sub-codebook at once (b.5: batched Sinkhorn, threaded Hungarian)."""
        selectors = self.selectors()
        if self.training and selectors:
            for sel, words in zip(selectors, select_codebooks(selectors, self.selection_schedule)):
                sel.prime(words)

    def forward(self, x: Tensor) -> Tensor:
        self.prime_selection()
        return self.forward_head(self.forward_features(x))


class BiRealNet(SubBitNet):
    """ReActNet-style Bi-Real ResNet: stem conv 7x7/2 -> BN -> maxpool (no ReLU), single-conv blocks (b.11).

    `cifar_stem=True` (our reading for CIFAR-10, spec c): conv 3x3/1 -> BN, no maxpool.
    """

    def __init__(self, layers: list[int], widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 1000,
                 quantizer: str = "bnn", tau: int = 5, quantizer_kwargs: dict[str, Any] | None = None,
                 schedule_kwargs: dict[str, Any] | None = None, cifar_stem: bool = False) -> None:
        super().__init__()
        self.num_classes, self.quantizer, self.tau = num_classes, quantizer, tau
        stem = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem)
        in_chs = stem
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                down = avgpool_downsample(in_chs, width, s) if (s != 1 or in_chs != width) else None
                stage.append(BasicBlock(in_chs, width, s, down, quantizer, tau, quantizer_kwargs))
                in_chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        self._setup_selection(schedule_kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


class VGGSmall(SubBitNet):
    """VGG-small for CIFAR-10 (OUR READING, spec c): real conv 3->128 + BN, then five binary convs
    128-256-256-512-512 in ReAct form (move0 -> sign -> conv -> [maxpool] -> BN -> RPReLU), FC 512*4*4 -> 10.
    """

    def __init__(self, num_classes: int = 10, quantizer: str = "bnn", tau: int = 5,
                 quantizer_kwargs: dict[str, Any] | None = None, schedule_kwargs: dict[str, Any] | None = None,
                 widths: tuple[int, ...] = (128, 128, 256, 256, 512, 512)) -> None:
        super().__init__()
        self.num_classes, self.quantizer, self.tau = num_classes, quantizer, tau
        self.conv0 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(widths[0])
        blocks = []
        for i in range(1, len(widths)):
            pool = i % 2 == 1
            blocks.append(nn.ModuleDict({
                "move0": LearnableBias(widths[i - 1]), "binary_activation": BinaryActivation(),
                "binary_conv": HardBinaryConv(widths[i - 1], widths[i], 1, quantizer, tau, **(quantizer_kwargs or {})),
                "pool": nn.MaxPool2d(2) if pool else nn.Identity(), "bn1": nn.BatchNorm2d(widths[i]),
                "move1": LearnableBias(widths[i]), "prelu": nn.PReLU(widths[i]), "move2": LearnableBias(widths[i]),
            }))
        self.blocks = nn.ModuleList(blocks)
        self.num_features = widths[-1] * 4 * 4
        self.fc = nn.Linear(self.num_features, num_classes)
        self._setup_selection(schedule_kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.bn0(self.conv0(x))
        for b in self.blocks:
            x = b["bn1"](b["pool"](b["binary_conv"](b["binary_activation"](b["move0"](x)))))
            x = b["move2"](b["prelu"](b["move1"](x)))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)


class MiniNet(SubBitNet):
    """Spec i: real conv3x3 1->32 + BN, ReAct blocks 32->32 (s1) and 32->64 (s2), GAP, Linear(64, 10)."""

    def __init__(self, num_classes: int = 10, quantizer: str = "bnn", tau: int = 1, in_chans: int = 1,
                 quantizer_kwargs: dict[str, Any] | None = None, schedule_kwargs: dict[str, Any] | None = None,
                 widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.num_classes, self.quantizer, self.tau = num_classes, quantizer, tau
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = nn.Sequential(
            BasicBlock(widths[0], widths[0], 1, None, quantizer, tau, quantizer_kwargs),
            BasicBlock(widths[0], widths[1], 2, avgpool_downsample(widths[0], widths[1], 2), quantizer, tau,
                       quantizer_kwargs))
        with torch.no_grad():
            for _, conv in self.binary_convs():
                conv.weight.normal_(0.0, 0.05)  # latent init randn * 0.05 (spec i)
        self.num_features = widths[1]
        self.fc = nn.Linear(widths[1], num_classes)
        self._setup_selection(schedule_kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer1(self.bn1(self.conv1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)


def birealnet18(**kwargs: Any) -> BiRealNet:
    """ReActNet/Bi-Real ResNet-18: [4, 4, 4, 4] single-conv blocks (spec c)."""
    return BiRealNet([4, 4, 4, 4], **kwargs)


def birealnet34(**kwargs: Any) -> BiRealNet:
    """ReActNet/Bi-Real ResNet-34: [6, 8, 12, 6]; unlike the official step 2 it honours tau (spec c note)."""
    return BiRealNet([6, 8, 12, 6], **kwargs)


def cifar_birealnet18(num_classes: int = 10, **kwargs: Any) -> BiRealNet:
    """OUR READING (spec c): Bi-Real ResNet-18 with a CIFAR stem (3x3/1, no maxpool), widths 64..512."""
    return BiRealNet([4, 4, 4, 4], num_classes=num_classes, cifar_stem=True, **kwargs)


def cifar_birealnet20(num_classes: int = 10, **kwargs: Any) -> BiRealNet:
    """OUR READING (spec c): ResNet-20 as 18 single-conv Bi-Real blocks [6, 6, 6], widths 16/32/64."""
    return BiRealNet([6, 6, 6], widths=(16, 32, 64), num_classes=num_classes, cifar_stem=True, **kwargs)


def cifar_birealnet8(num_classes: int = 10, **kwargs: Any) -> BiRealNet:
    """Smoke-size network (not a paper model): 6 single-conv Bi-Real blocks [2, 2, 2], widths 16/32/64, CIFAR stem."""
    return BiRealNet([2, 2, 2], widths=(16, 32, 64), num_classes=num_classes, cifar_stem=True, **kwargs)


def cifar_vgg_small(num_classes: int = 10, **kwargs: Any) -> VGGSmall:
    """OUR READING (spec c): VGG-small with five binary convs."""
    return VGGSmall(num_classes=num_classes, **kwargs)


def mini_net(num_classes: int = 10, **kwargs: Any) -> MiniNet:
    """The mini-reproduction net of spec i (sklearn digits / MNIST-size inputs)."""
    return MiniNet(num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., SubBitNet]] = {
    "birealnet18": birealnet18, "birealnet34": birealnet34, "cifar_birealnet18": cifar_birealnet18,
    "cifar_birealnet20": cifar_birealnet20,
    "cifar_birealnet8": cifar_birealnet8, "cifar_vgg_small": cifar_vgg_small, "mini_net": mini_net,
}


def create_model(name: str, **kwargs: Any) -> SubBitNet:
    """Build a model by name (`MODELS`); quantizer/tau/quantizer_kwargs/schedule_kwargs pass through."""
    if name not in MODELS:
        raise ValueError(f"unknown pste_bnn model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def teacher_resnet34(num_classes: int = 1000) -> nn.Module:
    """The KD teacher: torchvision ResNet-34 architecture (weights from a local file, spec c, d.1)."""
    import torchvision

    return torchvision.models.resnet34(weights=None, num_classes=num_classes)
