"""CIFAR-10 / CIFAR-100, the "python version" pickles exactly as distributed.

Layouts (root may be the extracted folder or the folder that holds it):
    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
                          batches: {b'data': uint8 (N, 3072), b'labels': [int]}; meta: {b'label_names': [...]}
    cifar-100-python/     train, test, meta
                          splits: {b'data', b'fine_labels', b'coarse_labels'};
                          meta: {b'fine_label_names', b'coarse_label_names'}
Rows of b'data' are 1024 red, then 1024 green, then 1024 blue values of a 32x32 image (row-major); they are
held in memory as one uint8 NHWC array.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data.base import DatasetError

# num_classes -> the official file names and pickle keys
LAYOUTS: dict[int, dict[str, Any]] = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": {"fine": b"labels"},
        "names": {"fine": b"label_names"},
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": {"fine": b"fine_labels", "coarse": b"coarse_labels"},
        "names": {"fine": b"fine_label_names", "coarse": b"coarse_label_names"},
    },
}
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


def unpickle(path: Path) -> dict:
    """Load one CIFAR pickle; any failure becomes a one-line `DatasetError` naming the file.

    `pickle.load` can execute code from the file. The official CIFAR files are Python-2 pickles of numpy
    arrays, so a real unpickler (with `encoding="bytes"`) is what the format needs; only point this at
    dataset files you trust.
    """
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError as err:
        raise DatasetError(f"missing CIFAR file {path}; re-extract the CIFAR python archive there") from err
    except Exception as err:  # a corrupt pickle can raise almost any exception type
        raise DatasetError(
            f"corrupt CIFAR file {path} ({type(err).__name__}: {err}); re-extract the CIFAR python archive"
        ) from err
    if not isinstance(obj, dict):
        raise DatasetError(
            f"CIFAR file {path} holds a {type(obj).__name__}, not a dict; is this a CIFAR pickle?"
        )
    return obj


def _require(d: dict, key: bytes, path: Path) -> Any:
    if key not in d:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise DatasetError(
            f"CIFAR file {path} has no key {key!r} (keys: {keys}); is it the python version of this dataset?"
        )
    return d[key]


def resolve_cifar_dir(root: str | os.PathLike, num_classes: int) -> Path:
    """The folder that holds the pickles: `root` itself or `root/<official folder name>`."""
    if num_classes not in LAYOUTS:
        raise DatasetError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    layout = LAYOUTS[num_classes]
    root = Path(root).expanduser()
    for cand in (root, root / layout["folder"]):
        if (cand / layout["meta"]).is_file():
            return cand
    files = ", ".join(layout["train"] + layout["test"] + [layout["meta"]])
    raise DatasetError(
        f"CIFAR-{num_classes} not found at {root}: expected {root}/{layout['folder']}/{{{files}}} "
        f"(the extracted python version); set the dataset root to that folder or its parent"
    )


def load_cifar(
    root: str | os.PathLike, num_classes: int, split: str, label_type: str = "fine"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one split: images uint8 (N, 32, 32, 3), labels int64 (N,), class names."""
    if split not in SPLIT_ALIASES:
        raise DatasetError(f"unknown CIFAR split '{split}'; use one of {sorted(SPLIT_ALIASES)}")
    folder = resolve_cifar_dir(root, num_classes)
    layout = LAYOUTS[num_classes]
    if label_type not in layout["labels"]:
        raise DatasetError(
            f"CIFAR-{num_classes} label type '{label_type}' unknown; use {list(layout['labels'])}"
        )
    label_key, names_key = layout["labels"][label_type], layout["names"][label_type]

    meta_path = folder / layout["meta"]
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _require(unpickle(meta_path), names_key, meta_path)
    ]

    images, labels = [], []
    for fname in layout[SPLIT_ALIASES[split]]:
        path = folder / fname
        batch = unpickle(path)
        data = np.asarray(_require(batch, b"data", path))
        lab = np.asarray(_require(batch, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise DatasetError(
                f"CIFAR file {path}: expected b'data' uint8 (N, 3072) and N labels, got {data.dtype} "
                f"{tuple(data.shape)} and {len(lab)} labels; re-extract the archive"
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= len(names)):
            raise DatasetError(
                f"CIFAR file {path}: labels span [{lab.min()}, {lab.max()}] but {meta_path.name} names "
                f"{len(names)} classes; the files come from different datasets"
            )
        images.append(data)
        labels.append(lab)
    data = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.concatenate(labels), names


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 held in memory; items are `(transform(PIL image), label)`.

    Args:
        root: the extracted folder (`cifar-10-batches-py` / `cifar-100-python`) or its parent.
        num_classes: 10 or 100.
        split: "train" or "test" ("val" is accepted as the test split: CIFAR has no other held-out set).
        transform: applied to the RGB PIL image (None: the PIL image is returned).
        label_type: "fine" or, for CIFAR-100, "coarse" (the 20 superclasses).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_classes: int = 100,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        label_type: str = "fine",
    ) -> None:
        self.data, self.targets, self.classes = load_cifar(root, num_classes, split, label_type)
        self.num_classes = num_classes
        self.split = SPLIT_ALIASES[split]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        return f"CIFAR{self.num_classes}({self.split}, {len(self)} images)"


def CIFAR10(root: str | os.PathLike, split: str = "train", transform: Callable | None = None) -> CIFAR:
    return CIFAR(root, 10, split, transform)


def CIFAR100(
    root: str | os.PathLike, split: str = "train", transform: Callable | None = None, label_type: str = "fine"
) -> CIFAR:
    return CIFAR(root, 100, split, transform, label_type)
