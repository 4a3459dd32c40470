"""NYUv2 (13-class semantic segmentation) in the layout Fast-Datafree reads (SSD-KD spec f, d.3), and a synthetic
writer of the same layout.

    <root>/NYUv2/image/{train,test}/*.png     RGB images
    <root>/NYUv2/seg13/{train,test}/*.png     labels 0..12, 255 = void, same file names as the images
    <root>/NYUv2/splits.mat                   trainNdxs (795) / testNdxs (654), 1-based

`root` may be the folder holding `NYUv2/` or `NYUv2/` itself. Images and labels are paired by sorted file name
(as the official reader does); an unpaired file, a split whose size disagrees with splits.mat, or a label value
outside {0..12, 255} is a one-line `DatasetError`. `NYUv2Transform` is the official pipeline in tensor ops: resize
to 256 (bilinear; labels nearest), training crops 128 + horizontal flip, normalise with mean = std = 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from common.data.base import DatasetError, main_process_first, read_marker, write_marker

SPEC = "SSD-KD spec f"
NUM_CLASSES = 13
IGNORE_INDEX = 255
SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}


def resolve_nyuv2_dir(root: str | os.PathLike) -> Path:
    """The `NYUv2` folder: `root/NYUv2` or `root` itself."""
    root = Path(root).expanduser()
    for cand in (root / "NYUv2", root):
        if (cand / "image").is_dir() and (cand / "seg13").is_dir():
            return cand
    raise DatasetError(f"NYUv2 not found at {root}: expected {root}/NYUv2/{{image,seg13}}/{{train,test}}/*.png and "
                       f"splits.mat ({SPEC}); set the dataset root to the folder holding NYUv2/")


def _split_size(folder: Path, split: str) -> int | None:
    path = folder / "splits.mat"
    if not path.is_file():
        raise DatasetError(f"NYUv2 split file {path} is missing ({SPEC}): copy splits.mat from the NYUv2 toolkit")
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as err:  # scipy raises several types for a torn file
        raise DatasetError(f"NYUv2 split file {path} is unreadable ({type(err).__name__}); re-download it") from None
    if SPLIT_KEYS[split] not in mat:
        raise DatasetError(f"NYUv2 split file {path} has no '{SPLIT_KEYS[split]}' ({SPEC})")
    return int(np.asarray(mat[SPLIT_KEYS[split]]).size)


class NYUv2(Dataset):
    """NYUv2 13-class split: items are (image uint8 H x W x 3 RGB, label int64 H x W with 255 void) before
    `transform(image, label)`."""

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None):
        if split not in SPLIT_KEYS:
            raise DatasetError(f"NYUv2 split must be 'train' or 'test', got {split!r}")
        self.root = resolve_nyuv2_dir(root)
        self.split, self.transform = split, transform
        img_dir, lbl_dir = self.root / "image" / split, self.root / "seg13" / split
        for d in (img_dir, lbl_dir):
            if not d.is_dir():
                raise DatasetError(f"NYUv2 folder {d} is missing ({SPEC})")
        names = sorted(p.name for p in img_dir.glob("*.png"))
        if not names:
            raise DatasetError(f"NYUv2 folder {img_dir} holds no PNG images ({SPEC})")
        missing = [n for n in names if not (lbl_dir / n).is_file()]
        if missing:
            raise DatasetError(f"NYUv2 label {lbl_dir / missing[0]} is missing ({len(missing)} images unpaired); "
                               "labels must share the image file names")
        expected = _split_size(self.root, split)
        if read_marker(self.root) is None and expected != len(names):
            raise DatasetError(f"NYUv2 {split} has {len(names)} images in {img_dir}, splits.mat lists {expected}; "
                               "the download is incomplete")
        self.images = [img_dir / n for n in names]
        self.labels = [lbl_dir / n for n in names]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = np.array(Image.open(self.images[index]).convert("RGB"))
        label = np.asarray(Image.open(self.labels[index])).astype(np.int64)
        bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(f"NYUv2 label {self.labels[index]} holds value {int(label[bad][0])}; "
                               f"expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX} (void)")
        if self.transform is not None:
            return self.transform(image, label)
        return image, label


class NYUv2Transform:
    """Fast-Datafree's NYUv2 pipeline (spec d.3) on tensors: resize shorter side to `resize` (bilinear / nearest),
    training: random `crop` + horizontal flip; then (x - 0.5) / 0.5. Returns (float 3 x H x W, int64 H x W)."""

    def __init__(self, train: bool, resize: int = 256, crop: int = 128, mean: float = 0.5, std: float = 0.5):
        self.train, self.resize, self.crop, self.mean, self.std = train, resize, crop, mean, std

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
        y = torch.from_numpy(np.ascontiguousarray(label))
        h, w = y.shape
        s = self.resize / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if self.train:
            top = int(torch.randint(0, size[0] - self.crop + 1, ()))
            left = int(torch.randint(0, size[1] - self.crop + 1, ()))
            x, y = x[:, top:top + self.crop, left:left + self.crop], y[top:top + self.crop, left:left + self.crop]
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y


@main_process_first
def write_synthetic_nyuv2(root: str | os.PathLike, n_train: int = 16, n_test: int = 8, size: tuple[int, int] = (48, 64),
                          seed: int = 0) -> Path:
    """A small learnable NYUv2 in the official layout under `root/NYUv2`: each image is split into vertical bands
    whose class sets the band's colour (plus noise); a few void pixels (255). Deterministic under `seed`."""
    folder = Path(root).expanduser() / "NYUv2"
    record = {"writer": "write_synthetic_nyuv2", "n_train": n_train, "n_test": n_test, "size": list(size), "seed": seed}
    if read_marker(folder) == record:
        return folder
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (NUM_CLASSES, 3))
    h, w = size
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / "image" / split).mkdir(parents=True, exist_ok=True)
        (folder / "seg13" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bands = rng.integers(2, 5)
            edges = np.sort(rng.choice(np.arange(1, w), bands - 1, replace=False))
            classes = rng.integers(0, NUM_CLASSES, bands)
            label = np.zeros((h, w), dtype=np.uint8)
            for b, (lo, hi) in enumerate(zip([0, *edges], [*edges, w])):
                label[:, lo:hi] = classes[b]
            label[rng.random((h, w)) < 0.02] = IGNORE_INDEX
            image = palette[np.where(label == IGNORE_INDEX, 0, label)] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "image" / split / f"{i:05d}.png")
            Image.fromarray(label).save(folder / "seg13" / split / f"{i:05d}.png")
    from scipy.io import savemat

    savemat(str(folder / "splits.mat"), {"trainNdxs": np.arange(1, n_train + 1)[:, None],
                                         "testNdxs": np.arange(n_train + 1, n_train + n_test + 1)[:, None]})
    write_marker(folder, record)
    return folder
