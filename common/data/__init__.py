"""Dataset readers (ImageNet class folders, CIFAR pickles, MNIST IDX) and synthetic writers of the same
on-disk formats. Nothing here downloads."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from common.data.base import DatasetError
from common.data.cifar import CIFAR, CIFAR10, CIFAR100, load_cifar, resolve_cifar_dir
from common.data.imagefolder import IMG_EXTENSIONS, ImageFolder, find_classes, load_rgb
from common.data.mnist import MNIST, find_mnist_files, read_idx, split_indices, write_idx
from common.data.nyuv2 import NYUv2, NYUv2Transform, write_synthetic_nyuv2
from common.data.segmentation import (
    SEGMENTATION_DATASETS,
    SegmentationDataset,
    majority_class_miou,
    write_synthetic_segmentation,
)
from common.data.synthetic import class_images, write_synthetic_cifar, write_synthetic_imagefolder
from common.data.transforms import build_transforms

DATASETS = ("imagenet", "imagefolder", "cifar10", "cifar100", "mnist")


def build_dataset(
    name: str, root: str | os.PathLike, split: str, transform: Callable[[Any], Any] | None = None
) -> Dataset:
    """A dataset by name: "imagenet"/"imagefolder" (split train|val), "cifar10"/"cifar100" (train|test, val =
    test) or "mnist" (train|test, val = test)."""
    key = name.lower()
    if key in ("imagenet", "imagefolder"):
        return ImageFolder(root, split, transform)
    if key in ("cifar10", "cifar100"):
        return CIFAR(root, int(key[5:]), split, transform)
    if key == "mnist":
        return MNIST.from_root(root, split, transform)
    raise DatasetError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")


__all__ = [
    "CIFAR",
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "DatasetError",
    "IMG_EXTENSIONS",
    "ImageFolder",
    "MNIST",
    "NYUv2",
    "NYUv2Transform",
    "SEGMENTATION_DATASETS",
    "SegmentationDataset",
    "build_dataset",
    "build_transforms",
    "class_images",
    "find_classes",
    "find_mnist_files",
    "load_cifar",
    "load_rgb",
    "majority_class_miou",
    "read_idx",
    "resolve_cifar_dir",
    "split_indices",
    "write_idx",
    "write_synthetic_cifar",
    "write_synthetic_imagefolder",
    "write_synthetic_nyuv2",
    "write_synthetic_segmentation",
]

from common.data.coco import COCOMultiLabel, read_coco_labels, write_synthetic_coco  # noqa: E402

__all__ += ["COCOMultiLabel", "read_coco_labels", "write_synthetic_coco"]

from common.data.skeleton import (  # noqa: E402 - appended: pyskl skeleton pickles (ske2grid)
    SKELETON_DATASETS,
    SkeletonSpec,
    load_skeleton_annotations,
    read_skeleton_pickle,
    write_synthetic_skeleton_pickle,
)

__all__ += ["SKELETON_DATASETS", "SkeletonSpec", "load_skeleton_annotations", "read_skeleton_pickle",
            "write_synthetic_skeleton_pickle"]
