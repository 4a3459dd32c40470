"""ImageNet-style class folders: `<root>/{train,val}/<class>/<image>`.

The file list is built once at construction with `os.scandir` (no per-file `stat`), classes are the sorted
sub-folder names, and the list is held as one numpy byte-string array so DataLoader workers share it
without copy-on-read growth. Layout problems are reported at start-up; an unreadable image when it is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data.base import DatasetError

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
LAYOUT = "root/{train,val}/<class>/<image>"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class-folder names of one split; raises `DatasetError` when there are none."""
    split_dir = Path(split_dir)
    with os.scandir(split_dir) as it:
        entries = list(it)
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        hint = (
            f" ({loose} images lie directly in it: sort them into one folder per class, "
            "e.g. with the usual ImageNet val preparation script)"
            if loose
            else ""
        )
        raise DatasetError(f"no class folders in {split_dir}{hint}; expected layout {LAYOUT}")
    return classes


def scan_split(split_dir: str | os.PathLike, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Relative image paths (`<class>/<file>`, byte strings) and int64 labels, each class's files sorted."""
    split_dir = Path(split_dir)
    files: list[bytes] = []
    labels: list[np.ndarray] = []
    for label, name in enumerate(classes):
        with os.scandir(split_dir / name) as it:
            names = sorted(e.name for e in it if _is_image(e.name) and not e.is_dir())
        if not names:
            raise DatasetError(
                f"class folder {split_dir / name} has no images ({'/'.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        files.extend(os.fsencode(f"{name}/{n}") for n in names)
        labels.append(np.full(len(names), label, dtype=np.int64))
    return np.array(files, dtype=np.bytes_), np.concatenate(labels)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image; a missing or corrupt file raises `DatasetError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path} ({err}); replace or delete the file") from err


class ImageFolder(Dataset):
    """One split of an ImageNet-style class-folder dataset; items are `(transform(image), label)`.

    Args:
        root: the folder holding `train/` and `val/`.
        split: "train" or "val".
        transform: applied to the RGB PIL image (None: the PIL image is returned).
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: Callable[[Any], Any] | None = None
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split '{split}' for an image-folder dataset; use one of {SPLITS}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist; expected layout {LAYOUT}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DatasetError(
                f"{split_dir} does not exist (folders present: {present or 'none'}); expected layout {LAYOUT}"
            )
        self.split = split
        self.split_dir = split_dir
        self.classes = find_classes(split_dir)
        self._check_other_split()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.files, self.targets = scan_split(split_dir, self.classes)
        self.transform = transform

    def _check_other_split(self) -> None:
        """Train and val must have the same classes, or label i would mean different things."""
        other = self.root / SPLITS[1 - SPLITS.index(self.split)]
        if not other.is_dir():
            return
        other_classes = find_classes(other)
        if other_classes != self.classes:
            only_here = sorted(set(self.classes) - set(other_classes))[:3]
            only_there = sorted(set(other_classes) - set(self.classes))[:3]
            raise DatasetError(
                f"class folders differ between {self.split_dir} ({len(self.classes)}) and {other} "
                f"({len(other_classes)}): only in {self.split}: {only_here}, only in {other.name}: "
                f"{only_there} (first few); both splits need the same class folders"
            )

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.split_dir / os.fsdecode(self.files[index])

    @property
    def samples(self) -> list[tuple[str, int]]:
        """torchvision-compatible `(path, label)` list (built on demand; not used by `__getitem__`)."""
        return [(str(self.path(i)), int(t)) for i, t in enumerate(self.targets)]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = load_rgb(self.path(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        return f"ImageFolder({self.split_dir}, {len(self)} images, {len(self.classes)} classes)"
