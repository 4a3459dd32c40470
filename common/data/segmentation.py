"""Semantic-segmentation datasets in their real on-disk layouts, and synthetic writers of the same layouts.

Readers give `(image, label)`: the image as OpenCV reads it (BGR uint8, H x W x 3) and the label as int64 train
ids with -1 for every void value (Af-DCD spec f.2). A paper's own transform turns the pair into tensors.

* cityscapes (19 classes, labelIds -> trainIds, other ids void): leftImg8bit/<split>/<city>/*_leftImg8bit.png and
  gtFine/<split>/<city>/*_gtFine_labelIds.png; lists <split>.lst (tab-separated image, label paths);
* voc (21, void 255): JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (train, grey) and
  SegmentationClass/<id>.png (val, palette indices); id lists train_aug.txt, val.txt (or ImageSets/Segmentation/);
* camvid (11, void 11): {train,val,test}/*.png and {train,val,test}annot/*.png;
  lists camvid_{train,val,test,trainval}_list.txt (image label);
* ade20k (150 = value - 1, void 0): images/{training,validation}/*.jpg, annotations/.../*.png, directory listing;
* coco_stuff_164k (182, or 171 with the mmseg map; void 255): images/{train2017,val2017}/<id>.jpg,
  annotations/{train2017,val2017}/<id>.png; id lists coco_stuff_164k_{train,val}.txt.

A list that is absent is derived from the folders and its length checked against the split size of the spec
(Af-DCD spec d), so an incomplete download stops at start-up with one line; datasets written by the synthetic
writers (marker file) skip that check. A label value outside the class set is a `DatasetError` naming the PNG
and the value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data.base import DatasetError, main_process_first, read_marker, write_marker

__all__ = [
    "SEGMENTATION_DATASETS",
    "SegmentationDataset",
    "label_lut",
    "majority_class_miou",
    "write_synthetic_segmentation",
]

SPEC = "Af-DCD spec f.2"
INVALID = -2  # LUT entry for a raw value outside the class set

# Cityscapes labelIds -> trainIds (the standard table; every other id is void)
_CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# COCO-Stuff-164K stuffthingmaps values never used (unannotated COCO thing ids); the 171-class map drops them
_COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


@dataclass(frozen=True)
class Layout:
    """One dataset's folder/list conventions (see the module table)."""

    name: str
    num_classes: int
    splits: dict[str, str]  # our split name -> the dataset's own split name
    sizes: dict[str, int]  # our split name -> number of images (spec d / f.2)
    description: str


LAYOUTS = {
    "cityscapes": Layout("cityscapes", 19, {"train": "train", "val": "val", "test": "test"},
                         {"train": 2975, "val": 500, "test": 1525},
                         "root/leftImg8bit/<split>/<city>/*_leftImg8bit.png + root/gtFine/<split>/<city>/"
                         "*_gtFine_labelIds.png, lists root/<split>.lst"),
    "voc": Layout("voc", 21, {"train": "train_aug", "val": "val"}, {"train": 10582, "val": 1449},
                  "root/JPEGImages/<id>.jpg + root/SegmentationClassAug/<id>.png (train) and "
                  "root/SegmentationClass/<id>.png (val), lists root/{train_aug,val}.txt"),
    "camvid": Layout("camvid", 11, {"train": "train", "val": "val", "test": "test", "trainval": "trainval"},
                     {"train": 367, "val": 101, "test": 233, "trainval": 468},
                     "root/{train,val,test}/*.png + root/{train,val,test}annot/*.png, lists "
                     "root/camvid_<split>_list.txt"),
    "ade20k": Layout("ade20k", 150, {"train": "training", "val": "validation"}, {"train": 20210, "val": 2000},
                     "root/images/{training,validation}/*.jpg + root/annotations/{training,validation}/*.png"),
    "coco_stuff_164k": Layout("coco_stuff_164k", 182, {"train": "train2017", "val": "val2017"},
                              {"train": 118287, "val": 5000},
                              "root/images/{train2017,val2017}/<id>.jpg + root/annotations/{train2017,val2017}/"
                              "<id>.png, lists root/coco_stuff_164k_{train,val}.txt"),
}
SEGMENTATION_DATASETS = tuple(LAYOUTS)


def label_lut(name: str, num_classes: int | None = None) -> np.ndarray:
    """(256,) int64: raw label PNG value -> train id, -1 (void) or INVALID (outside the class set)."""
    lut = np.full(256, INVALID, np.int64)
    if name == "cityscapes":
        lut[:34] = -1
        lut[255] = -1
        lut[list(_CITYSCAPES_IDS)] = np.arange(19)
    elif name == "voc":
        lut[:21] = np.arange(21)
        lut[255] = -1
    elif name == "camvid":
        lut[:11] = np.arange(11)
        lut[11] = -1
    elif name == "ade20k":
        lut[0] = -1
        lut[1:151] = np.arange(150)
    elif name == "coco_stuff_164k":
        lut[255] = -1
        if num_classes in (None, 182):
            lut[:182] = np.arange(182)
        elif num_classes == 171:
            used = [v for v in range(182) if v not in _COCO_UNUSED]
            lut[:182] = -1
            lut[used] = np.arange(171)
        else:
            raise DatasetError(f"COCO-Stuff-164K has 182 classes (171 with the mmseg mapping), not {num_classes}")
    else:
        raise DatasetError(f"unknown segmentation dataset '{name}'; valid names: {', '.join(LAYOUTS)}")
    if num_classes is not None:  # a shrunk class set (smoke): train ids beyond it are outside the set, not void
        lut[lut >= num_classes] = INVALID
    return lut


def _is_synthetic(root: Path) -> bool:
    marker = read_marker(root)
    return bool(marker) and str(marker.get("format", "")).startswith("segmentation")


def _read_list(path: Path, columns: int) -> list[list[str]]:
    try:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read list {path} ({err.__class__.__name__}); {SPEC}") from None
    for i, parts in enumerate(lines, 1):
        if len(parts) != columns:
            raise DatasetError(f"list {path} line {i} has {len(parts)} fields, expected {columns} "
                               f"({'image label' if columns == 2 else 'one id'}); {SPEC}")
    if not lines:
        raise DatasetError(f"list {path} is empty; {SPEC}")
    return lines


def _listing(folder: Path, suffix: str) -> list[str]:
    """Sorted stems of the `suffix` files directly in `folder` (empty when it does not exist)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(e.name[: -len(suffix)] for e in it if e.name.endswith(suffix) and e.is_file())


class SegmentationDataset(Dataset):
    """(BGR uint8 image, int64 train-id label with -1 void) pairs of one split of a dataset in its real layout.

    `list_path` overrides the list file; `num_classes` selects 171 for COCO-Stuff; `transform(image, label)`
    returns what a DataLoader should see.
    """

    def __init__(self, name: str, root: str | os.PathLike, split: str,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 list_path: str | os.PathLike | None = None, num_classes: int | None = None) -> None:
        if name not in LAYOUTS:
            raise DatasetError(f"unknown segmentation dataset '{name}'; valid names: {', '.join(LAYOUTS)}")
        self.layout = layout = LAYOUTS[name]
        if split not in layout.splits:
            raise DatasetError(f"{name} has splits {', '.join(layout.splits)}, not '{split}'")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{name} root {self.root} does not exist; expected {layout.description} ({SPEC})")
        self.name, self.split, self.transform = name, split, transform
        self.num_classes = num_classes or layout.num_classes
        self.lut = label_lut(name, self.num_classes)
        self.files = self._files(Path(list_path).expanduser() if list_path else None)
        missing = [p for pair in self.files for p in pair if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} listed file(s) of {name} {split} are missing, first {missing[0]}; "
                               f"expected {layout.description} ({SPEC})")

    # ------------------------------------------------------------------------------------ file lists
    def _files(self, list_path: Path | None) -> list[tuple[Path, Path]]:
        r, own = self.root, self.layout.splits[self.split]
        name = self.name
        if name == "cityscapes":
            path = list_path or r / f"{own}.lst"
            if path.is_file():
                return [(r / a, r / b) for a, b in _read_list(path, 2)]
            stems = [f"{city}/{s}" for city in _listing_dirs(r / "leftImg8bit" / own)
                     for s in _listing(r / "leftImg8bit" / own / city, "_leftImg8bit.png")]
            pairs = [(r / "leftImg8bit" / own / f"{s}_leftImg8bit.png", r / "gtFine" / own / f"{s}_gtFine_labelIds.png")
                     for s in stems]
            return self._derived(pairs, path)
        if name == "voc":
            label_dir = "SegmentationClassAug" if self.split == "train" else "SegmentationClass"
            path = list_path or next((p for p in (r / f"{own}.txt", r / "ImageSets" / "Segmentation" / f"{own}.txt")
                                      if p.is_file()), r / f"{own}.txt")
            if path.is_file():
                ids = [a for (a,) in _read_list(path, 1)]
                return [(r / "JPEGImages" / f"{i}.jpg", r / label_dir / f"{i}.png") for i in ids]
            if self.split == "val":
                raise DatasetError(f"VOC val list missing: put val.txt in {r} or {r}/ImageSets/Segmentation ({SPEC})")
            exclude = {p.stem for p, _ in SegmentationDataset("voc", r, "val").files}  # train_aug = aug - val
            ids = [s for s in _listing(r / "SegmentationClassAug", ".png") if s not in exclude]
            return self._derived([(r / "JPEGImages" / f"{i}.jpg", r / label_dir / f"{i}.png") for i in ids], path)
        if name == "camvid":
            path = list_path or r / f"camvid_{own}_list.txt"
            if path.is_file():
                return [(r / a, r / b) for a, b in _read_list(path, 2)]
            splits = ("train", "val") if own == "trainval" else (own,)
            pairs = [(r / s / f"{i}.png", r / f"{s}annot" / f"{i}.png")
                     for s in splits for i in _listing(r / s, ".png")]
            return self._derived(pairs, path)
        if name == "ade20k":
            if list_path:
                raise DatasetError("ADE20K is read by directory listing (images/<split>), it takes no list file")
            pairs = [(r / "images" / own / f"{i}.jpg", r / "annotations" / own / f"{i}.png")
                     for i in _listing(r / "images" / own, ".jpg")]
            return self._derived(pairs, r / "images" / own)
        path = list_path or r / f"coco_stuff_164k_{self.split}.txt"
        if path.is_file():
            ids = [a for (a,) in _read_list(path, 1)]
        else:
            ids = _listing(r / "images" / own, ".jpg")
        pairs = [(r / "images" / own / f"{i}.jpg", r / "annotations" / own / f"{i}.png") for i in ids]
        return pairs if path.is_file() else self._derived(pairs, path)

    def _derived(self, pairs: list[tuple[Path, Path]], wanted: Path) -> list[tuple[Path, Path]]:
        """A list derived from the folders: non-empty, and of the spec's size unless the data are synthetic."""
        expected = self.layout.sizes[self.split]
        if not pairs:
            raise DatasetError(f"{self.name} {self.split}: no list at {wanted} and no images found to derive one; "
                               f"expected {self.layout.description} ({SPEC})")
        if len(pairs) != expected and not _is_synthetic(self.root):
            raise DatasetError(f"{self.name} {self.split}: found {len(pairs)} images in {self.root}, the split has "
                               f"{expected} (spec d); complete the dataset or pass its list file explicitly")
        return pairs

    # ------------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.files)

    def read_label(self, path: Path) -> np.ndarray:
        """Train ids (int64, -1 void); a value outside the class set raises naming the PNG and the value."""
        if self.name == "voc" and self.split != "train":
            try:  # palette PNG: the values are palette indices (official VOCDataValSet reads with PIL)
                raw = np.asarray(Image.open(path))
            except OSError:
                raw = None
        else:
            raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if raw is None or raw.ndim != 2:
            raise DatasetError(f"cannot read label PNG {path} as a single-channel image; {SPEC}")
        label = self.lut[raw]
        if (label == INVALID).any():
            bad = int(raw[label == INVALID][0])
            raise DatasetError(f"label {path} holds value {bad}, outside the {self.num_classes} classes of "
                               f"{self.name} and not its void value ({SPEC})")
        return label

    def read_image(self, path: Path) -> np.ndarray:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot read image {path} (missing or corrupt)")
        return image

    def __getitem__(self, index: int) -> Any:
        img_path, label_path = self.files[index]
        image, label = self.read_image(img_path), self.read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"image {img_path} is {image.shape[:2]} but its label {label_path} is {label.shape}")
        return self.transform(image, label) if self.transform else (image, label)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name}, {self.split}, {len(self)} images, root={self.root})"


def _listing_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


# ------------------------------------------------------------------------------------------------ synthetic
def _raw_values(name: str, num_classes: int) -> tuple[np.ndarray, int]:
    """Raw PNG value of each train id 0..num_classes-1, and the raw void value, for `name`'s label files."""
    lut = label_lut(name)
    raw = np.array([int(np.flatnonzero(lut == c)[0]) for c in range(num_classes)])
    void = {"cityscapes": 0, "voc": 255, "camvid": 11, "ade20k": 0, "coco_stuff_164k": 255}[name]
    return raw, void


def scene(num_classes: int, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One learnable scene: BGR uint8 image and train-id label (-1 void).

    Background = class 0 on a random-colour field; 2-4 shapes of classes 1..K-1 (disc, square, triangle, ring
    by class % 4), each a class-specific hue plus noise; Gaussian pixel noise; a thin void border line. Class
    is carried by colour and shape, so a small network learns it (as in spec i).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    label = np.zeros((height, width), np.int64)
    img = np.empty((height, width, 3), np.float32)
    img[:] = rng.uniform(0.0, 1.0, 3) * 0.5
    hues = (np.arange(num_classes) * 0.618034) % 1.0
    for _ in range(int(rng.integers(2, 5))) if num_classes > 1 else ():
        c = int(rng.integers(1, num_classes))
        r = rng.uniform(0.08, 0.22) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        dy, dx = yy - cy, xx - cx
        kind = c % 4
        if kind == 0:
            inside = dy**2 + dx**2 <= r**2
        elif kind == 1:
            inside = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
        elif kind == 2:
            inside = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        else:
            inside = (dy**2 + dx**2 <= r**2) & (dy**2 + dx**2 >= (0.55 * r) ** 2)
        h = (hues[c] + rng.uniform(-0.04, 0.04)) * 6.0
        rgb = np.clip(np.abs((h + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0, 1) * rng.uniform(0.7, 1.0)
        img[inside] = rgb[::-1]  # BGR
        label[inside] = c
    img += rng.normal(0.0, 0.06, img.shape).astype(np.float32)
    label[int(rng.integers(0, height)), :] = -1  # a void line: exercises the ignore value end to end
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), label


def _write_png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.fromarray(array.astype(np.uint8), mode="P")
        pal = (np.arange(256)[:, None] * np.array([37, 91, 151]) % 256).astype(np.uint8)
        im.putpalette(pal.reshape(-1).tolist())
        im.save(path)
    elif not cv2.imwrite(str(path), array):
        raise DatasetError(f"OpenCV could not write {path}")


def _write_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, [int(cv2.IMWRITE_JPEG_QUALITY), 95]):
        raise DatasetError(f"OpenCV could not write {path}")


@main_process_first
def write_synthetic_segmentation(name: str, root: str | os.PathLike, num_classes: int | None = None,
                                 sizes: dict[str, int] | None = None, height: int = 48, width: int = 48,
                                 seed: int = 0, write_lists: bool = True) -> Path:
    """Write a small learnable dataset in `name`'s real layout (images, raw-valued label PNGs, lists); return root.

    `num_classes` (default: the dataset's) shrinks the class set; `sizes` maps our split names to image counts
    (default 32 train / 8 val(/test)). With `write_lists=False` the readers derive the lists from the folders.
    A matching dataset already there is kept; a folder holding anything else is refused.
    """
    layout = LAYOUTS.get(name)
    if layout is None:
        raise DatasetError(f"unknown segmentation dataset '{name}'; valid names: {', '.join(LAYOUTS)}")
    k = num_classes or layout.num_classes
    if not 1 <= k <= layout.num_classes:
        raise DatasetError(f"{name} synthetic data need 1..{layout.num_classes} classes, not {k}")
    splits = [s for s in layout.splits if s != "trainval"]
    sizes = sizes or {s: (32 if s == "train" else 8) for s in splits}
    root = Path(root).expanduser()
    record = {"format": f"segmentation-{name}", "version": 1, "num_classes": k, "sizes": sizes, "height": height,
              "width": width, "seed": seed, "write_lists": write_lists}
    if read_marker(root) == record:
        return root
    if root.is_dir() and any(root.iterdir()) and not _is_synthetic(root):
        raise DatasetError(f"{root} exists and holds data that no synthetic writer made; choose an empty folder")
    raw_of, void = _raw_values(name, k)
    for split_id, (split, n) in enumerate(sizes.items()):
        own = layout.splits[split]
        rng = np.random.default_rng([seed, split_id])
        lines = []
        for i in range(n):
            image, label = scene(k, height, width, rng)
            raw = np.where(label >= 0, raw_of[np.clip(label, 0, None)], void).astype(np.uint8)
            stem = f"{own}_{i:05d}"
            if name == "cityscapes":
                rel_img = f"leftImg8bit/{own}/city{i % 2}/city{i % 2}_{i:06d}_000019_leftImg8bit.png"
                rel_lab = f"gtFine/{own}/city{i % 2}/city{i % 2}_{i:06d}_000019_gtFine_labelIds.png"
                _write_png(root / rel_img, image)
                _write_png(root / rel_lab, raw)
                lines.append(f"{rel_img}\t{rel_lab}")
            elif name == "camvid":
                _write_png(root / own / f"{stem}.png", image)
                _write_png(root / f"{own}annot" / f"{stem}.png", raw)
                lines.append(f"{own}/{stem}.png {own}annot/{stem}.png")
            elif name == "voc":
                _write_jpg(root / "JPEGImages" / f"{stem}.jpg", image)
                if split == "train":
                    _write_png(root / "SegmentationClassAug" / f"{stem}.png", raw)
                else:
                    _write_png(root / "SegmentationClass" / f"{stem}.png", raw, palette=True)
                    _write_png(root / "SegmentationClassAug" / f"{stem}.png", raw)  # SBD aug holds val too
                lines.append(stem)
            else:
                _write_jpg(root / "images" / own / f"{stem}.jpg", image)
                _write_png(root / "annotations" / own / f"{stem}.png", raw)
                lines.append(stem)
        if name == "voc" and split == "val":  # the val list lives where VOC2012 keeps it
            (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
            (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(lines) + "\n")
        elif write_lists and name != "ade20k":
            list_name = {"cityscapes": f"{own}.lst", "voc": f"{own}.txt", "camvid": f"camvid_{own}_list.txt",
                         "coco_stuff_164k": f"coco_stuff_164k_{split}.txt"}[name]
            (root / list_name).write_text("\n".join(lines) + "\n")
    write_marker(root, record)
    return root


def majority_class_miou(dataset: SegmentationDataset) -> float:
    """mIoU (%, absent classes count 0, mean over all classes) of predicting the most frequent class everywhere."""
    counts = np.zeros(dataset.num_classes, np.int64)
    for _, label_path in dataset.files:
        label = dataset.read_label(label_path)
        counts += np.bincount(label[label >= 0], minlength=dataset.num_classes)
    total = counts.sum()
    if total == 0:
        return math.nan
    top = int(counts.argmax())
    return 100.0 * counts[top] / total / dataset.num_classes
