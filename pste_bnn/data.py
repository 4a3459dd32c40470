"""Data pipelines of pste_bnn: ImageNet as the official step-1/2 code (spec d.1, incl. `Lighting`), CIFAR-10
(our reading, d.3), synthetic CIFAR-10-format pickles (smoke) and the MNIST split common reads (spec i).

Nothing here downloads; a missing or malformed root is a one-line `DatasetError` / `UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from common.config import check_choice
from common.data import CIFAR, MNIST, ImageFolder, build_transforms, split_indices, write_synthetic_cifar
from common.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from common.errors import UserError

DATASETS = ("imagenet", "cifar10", "synthetic_cifar10", "mnist")

# AlexNet's ImageNet RGB PCA (official `utils.py::imagenet_pca`).
IMAGENET_EIGVAL = np.asarray([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.asarray([[-0.5675, 0.7192, 0.4009],
                              [-0.5808, -0.0045, -0.8140],
                              [-0.5836, -0.6948, 0.4203]])


@dataclass
class DataConfig:
    name: str = "imagenet"  # imagenet | cifar10 | synthetic_cifar10 | mnist
    root: str | None = None
    num_classes: int = 1000
    image_size: int = 224
    crop_scale: float = 0.08  # imagenet: RandomResizedCrop scale lower bound (official --crop_scale... 0.08)
    lighting: float = 0.1  # imagenet: Lighting alphastd on the uint8 image (d.1); 0 = off
    padding: int = 4  # cifar: random-crop padding
    hflip: float = 0.5  # training horizontal-flip probability
    train_per_class: int = 64  # synthetic_cifar10 only
    test_per_class: int = 16
    labelled: int | None = None  # mnist: train on this many of the 8,000 training digits (seeded subset)


def check(cfg: DataConfig) -> None:
    check_choice("data.name", cfg.name, DATASETS)
    if not 0 < cfg.crop_scale <= 1 or cfg.lighting < 0 or not 0 <= cfg.hflip <= 1:
        raise UserError(f"config data: need 0 < crop_scale <= 1, lighting >= 0, 0 <= hflip <= 1 (got "
                        f"{cfg.crop_scale}, {cfg.lighting}, {cfg.hflip})")


class Lighting:
    """AlexNet PCA lighting noise on the uint8 PIL image, in 0-255 units (official `utils.py::Lighting`, d.1).

    The noise is ~0.2 grey levels, so after the uint8 cast it mostly lowers some pixels by one level; kept
    for fidelity. Draws from numpy's global RNG (seeded per sample by the loop's workers, restored on resume).
    """

    def __init__(self, alphastd: float, eigval: np.ndarray = IMAGENET_EIGVAL,
                 eigvec: np.ndarray = IMAGENET_EIGVEC) -> None:
        self.alphastd, self.eigval, self.eigvec = alphastd, eigval, eigvec

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.alphastd == 0.0:
            return img
        v = (np.random.randn(3) * self.alphastd).astype("float32") * self.eigval
        inc = np.dot(self.eigvec, v.reshape(3, 1)).reshape(3)
        arr = np.asarray(img)
        out = np.add(arr, inc)
        if arr.dtype == np.uint8:
            out = np.clip(out, 0, 255)
        return Image.fromarray(out.astype(arr.dtype), "RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def imagenet_transforms(cfg: DataConfig) -> tuple[v2.Compose, v2.Compose]:
    """RRC(224, (0.08, 1)) -> Lighting(0.1) -> flip -> tensor -> normalize; eval Resize(256) -> CenterCrop (d.1)."""
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    train = v2.Compose([v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale, 1.0), antialias=True),
                        Lighting(cfg.lighting), v2.RandomHorizontalFlip(cfg.hflip), *tail])
    resize = round(cfg.image_size * 256 / 224)
    val = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.image_size), *tail])
    return train, val


def build_data(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, evaluation) sets; ImageNet/CIFAR report on their val/test split (spec f)."""
    check(cfg)
    if cfg.name == "mnist":  # spec i on the digits common reads: t10k split 8,000 train / 2,000 test, 1 channel
        if cfg.root is None:
            raise UserError("config data.root is not set: pass the folder of the MNIST IDX files "
                            "(e.g. ../shared/data/mnist)")
        train_idx, test_idx = split_indices(10_000, 8_000, seed=0)
        if cfg.labelled is not None:
            train_idx = np.sort(np.random.default_rng(1).permutation(train_idx)[: cfg.labelled])
        aug = {"mean": (0.5,), "std": (0.5,)}  # (x - 0.5) / 0.5 as spec f
        return (MNIST.from_root(cfg.root, "test", build_transforms("mnist", True, cfg.image_size, **aug),
                                indices=train_idx),
                MNIST.from_root(cfg.root, "test", build_transforms("mnist", False, cfg.image_size, **aug),
                                indices=test_idx))
    if cfg.root is None:
        layout = "cifar-10-batches-py/" if cfg.name == "cifar10" else "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        raise UserError(f"config data.root is not set: pass data.root=<folder holding {layout}> (spec f), "
                        "or profile=smoke for synthetic data")
    if cfg.name == "imagenet":
        train_tf, val_tf = imagenet_transforms(cfg)
        return ImageFolder(cfg.root, "train", train_tf), ImageFolder(cfg.root, "val", val_tf)
    if cfg.name == "synthetic_cifar10":
        write_synthetic_cifar(cfg.root, 10, cfg.train_per_class, cfg.test_per_class, seed=0)
    aug = {"padding": cfg.padding, "hflip": cfg.hflip}
    return (CIFAR(cfg.root, 10, "train", build_transforms("cifar10", True, cfg.image_size, **aug)),
            CIFAR(cfg.root, 10, "test", build_transforms("cifar10", False, cfg.image_size)))
