"""Classification transforms: timm's `create_transform` for ImageNet, torchvision v2 for CIFAR and MNIST."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from common.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The CIFAR-100 statistics used by the KD code bases (CRD, mdistiller) that the CIFAR papers build on.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# Options passed straight to timm.data.create_transform.
_TIMM_OPTIONS = {
    "auto_augment",
    "re_prob",
    "re_mode",
    "re_count",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "color_jitter",
    "hflip",
    "vflip",
    "scale",
    "ratio",
    "mean",
    "std",
    "train_crop_mode",
}
_TIMM_EVAL_OPTIONS = {"interpolation", "crop_pct", "crop_mode", "mean", "std"}
_CIFAR_OPTIONS = {"padding", "hflip", "mean", "std"}
_MNIST_OPTIONS = {"mean", "std", "padding", "to_rgb"}
DEFAULT_SIZE = {"imagenet": 224, "cifar": 32, "cifar10": 32, "cifar100": 32, "mnist": 28}


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize with Pillow >= 12 (which rejects 0 bits): 0 bits keeps nothing, a black image, as older
    Pillow did. RandAugment ``inc1`` reaches 0 bits at magnitude 10 (m9 with mstd 0.5 draws it now and then)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    """Route timm's Posterize ops through ``_posterize`` (ops look their function up when built)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def _check(dataset: str, aug: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(aug) - allowed)
    if unknown:
        raise UserError(
            f"unknown augmentation option '{unknown[0]}' for {dataset}; valid options: {sorted(allowed)}"
        )


def _to_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_transforms(
    dataset: str, train: bool, image_size: int | None = None, **aug: Any
) -> Callable[[Any], torch.Tensor]:
    """The standard train or eval transform of a classification dataset, PIL image -> normalised tensor.

    Args:
        dataset: "imagenet", "cifar10", "cifar100" ("cifar" = "cifar100") or "mnist".
        train: the training (augmenting) pipeline, else the evaluation one.
        image_size: output side; default 224 / 32 / 28.
        **aug: imagenet: timm's `auto_augment` (e.g. "rand-m9-mstd0.5-inc1"), `re_prob`, `re_mode`,
            `re_count`, `interpolation`, `crop_pct`, `crop_mode`, `color_jitter`, `hflip`, `vflip`, `scale`,
            `ratio`, `mean`, `std`, `train_crop_mode`. cifar: `padding` (4), `hflip` (0.5), `mean`, `std`.
            mnist: `padding` (0: no random crop), `mean`, `std`, `to_rgb` (repeat to 3 channels).
    """
    dataset = dataset.lower()
    if dataset not in DEFAULT_SIZE:
        raise UserError(f"no transforms for dataset '{dataset}'; valid: {sorted(DEFAULT_SIZE)}")
    size = int(image_size or DEFAULT_SIZE[dataset])

    if dataset == "imagenet":
        _check(dataset, aug, _TIMM_OPTIONS)
        from timm.data import create_transform

        _patch_timm_posterize()
        opts = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **aug}
        if not train:  # evaluation takes only the resize/crop/normalise options
            opts = {k: v for k, v in opts.items() if k in _TIMM_EVAL_OPTIONS}
        return create_transform(input_size=size, is_training=train, **opts)

    if dataset == "mnist":
        _check(dataset, aug, _MNIST_OPTIONS)
        mean, std = tuple(aug.get("mean", MNIST_MEAN)), tuple(aug.get("std", MNIST_STD))
        ops: list[Callable] = []
        if size != 28:
            ops.append(v2.Resize(size, antialias=True))
        if train and aug.get("padding", 0):
            ops.append(v2.RandomCrop(size, padding=int(aug["padding"])))
        if aug.get("to_rgb", False):
            ops.append(v2.Grayscale(num_output_channels=3))
            mean, std = mean * (3 // len(mean)), std * (3 // len(std))
        return v2.Compose(ops + _to_tensor(mean, std))

    # CIFAR: pad-4 random crop + horizontal flip (the ResNet-paper recipe), then normalise.
    _check(dataset, aug, _CIFAR_OPTIONS)
    stats = (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    mean, std = tuple(aug.get("mean", stats[0])), tuple(aug.get("std", stats[1]))
    ops = [v2.Resize(size, antialias=True)] if size != 32 else []
    if train:
        ops += [
            v2.RandomCrop(size, padding=int(aug.get("padding", 4))),
            v2.RandomHorizontalFlip(float(aug.get("hflip", 0.5))),
        ]
    return v2.Compose(ops + _to_tensor(mean, std))
