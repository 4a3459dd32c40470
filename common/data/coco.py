"""MS-COCO as a multi-label classification dataset, and a synthetic writer of the same on-disk format.

Layout (the official COCO release): ``<root>/annotations/instances_<split><year>.json`` and the images under
``<root>/<split><year>/<file_name>`` (e.g. ``train2014/COCO_train2014_000000000009.jpg``). An image's target
is the multi-hot vector of the categories of its instance annotations; classes are the JSON's categories in
category-id order (the 80 COCO classes, ids 1..90 with gaps, map to 0..79). Images without any annotation
are dropped by default (the usual multi-label protocol). The JSON is parsed once; labels are one dense
uint8 matrix and file names one numpy byte-string array, shared by DataLoader workers without copies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.base import DatasetError, main_process_first, write_marker
from common.data.imagefolder import load_rgb
from common.data.synthetic import FORMAT_VERSION, _prepare, class_images

LAYOUT = "<root>/annotations/instances_<split><year>.json + <root>/<split><year>/<file_name>"
SPEC = "spec noah.md d.5"


def annotation_path(root: str | os.PathLike, split: str, year: str = "2014") -> Path:
    return Path(root).expanduser() / "annotations" / f"instances_{split}{year}.json"


def read_coco_labels(ann_file: str | os.PathLike, keep_unlabelled: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """(file names (bytes), multi-hot labels uint8 (N, K), class names, category ids) from an instances JSON."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file {ann_file} not found; expected layout {LAYOUT} ({SPEC})")
    try:
        data = json.loads(ann_file.read_text())
        images, anns, cats = data["images"], data["annotations"], data["categories"]
        cat_ids = sorted(int(c["id"]) for c in cats)
        names_by_id = {int(c["id"]): str(c["name"]) for c in cats}
        image_ids = np.array([int(im["id"]) for im in images], np.int64)
        files = np.array([os.fsencode(im["file_name"]) for im in images], dtype=np.bytes_)
        ann_image = np.array([int(a["image_id"]) for a in anns], np.int64)
        ann_cat = np.array([int(a["category_id"]) for a in anns], np.int64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"{ann_file} is not a COCO instances file ({type(err).__name__}: {err}); it needs 'images', "
            f"'annotations' and 'categories' ({SPEC})"
        ) from None
    if not cat_ids or not len(image_ids):
        raise DatasetError(f"{ann_file} lists no categories or no images; expected a COCO instances file ({SPEC})")
    order = np.argsort(image_ids)
    row = np.searchsorted(image_ids[order], ann_image)
    col = np.searchsorted(np.array(cat_ids), ann_cat)
    bad = (row >= len(image_ids)) | (col >= len(cat_ids))
    bad |= image_ids[order][np.minimum(row, len(image_ids) - 1)] != ann_image
    bad |= np.array(cat_ids)[np.minimum(col, len(cat_ids) - 1)] != ann_cat
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{ann_file}: annotation {i} refers to image {ann_image[i]} / category {ann_cat[i]} "
                           "that the file does not list")
    labels = np.zeros((len(image_ids), len(cat_ids)), np.uint8)
    labels[order[row], col] = 1
    if not keep_unlabelled:
        keep = labels.any(1)
        files, labels = files[keep], labels[keep]
    return files, labels, [names_by_id[i] for i in cat_ids], cat_ids


class COCOMultiLabel(Dataset):
    """One split of MS-COCO as multi-label classification; items are ``(transform(image), multi-hot float)``.

    Args:
        root: the COCO folder holding ``annotations/`` and ``<split><year>/``.
        split: "train" or "val".
        transform: applied to the RGB PIL image.
        year: "2014" (the usual multi-label protocol) or "2017".
        keep_unlabelled: keep images that have no annotation (all-zero targets).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable[[Any], Any] | None = None,
                 year: str = "2014", keep_unlabelled: bool = False) -> None:
        root = Path(root).expanduser()
        if split not in ("train", "val"):
            raise DatasetError(f"COCO split must be 'train' or 'val', got {split!r}")
        if not root.is_dir():
            raise DatasetError(f"COCO root {root} does not exist; expected layout {LAYOUT} ({SPEC})")
        self.image_dir = root / f"{split}{year}"
        if not self.image_dir.is_dir():
            raise DatasetError(f"COCO image folder {self.image_dir} not found; expected layout {LAYOUT} ({SPEC})")
        self.files, self.labels, self.classes, self.category_ids = read_coco_labels(
            annotation_path(root, split, year), keep_unlabelled)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        img = load_rgb(self.image_dir / os.fsdecode(self.files[index]))
        target = torch.from_numpy(self.labels[index].astype(np.float32))
        return (self.transform(img) if self.transform else img), target

    def __repr__(self) -> str:
        return f"COCOMultiLabel({self.image_dir}, {len(self)} images, {self.num_classes} classes)"


def synthetic_category_ids(num_classes: int) -> list[int]:
    """COCO-like category ids with gaps (1, 2, 3, 5, 6, 7, 9, ...), so id order != position is exercised."""
    return [c + 1 + c // 3 for c in range(num_classes)]


@main_process_first
def write_synthetic_coco(root: str | os.PathLike, num_classes: int = 10, train_images: int = 256,
                         val_images: int = 96, image_size: int = 64, max_objects: int = 3,
                         unlabelled_fraction: float = 0.05, seed: int = 0, year: str = "2014",
                         object_size: float = 1 / 3) -> Path:
    """Write a small COCO-format multi-label set (JPEGs + instances JSON) and return ``root``.

    Each image holds 1..``max_objects`` objects of distinct classes on a dark noisy background, each a
    class-specific grating patch (``common.data.synthetic.class_images``) of ``object_size`` times the image side
    at a random position (later objects may cover earlier ones); ``unlabelled_fraction`` of the images hold none.
    A class is a hue and one of two orientations (vertical or horizontal stripes), so the horizontal flip of
    the usual training augmentation keeps every object in its class (oblique gratings would swap classes).
    Mean class prevalence is about ``(1 + max_objects) / 2 / num_classes``.
    """
    if not 1 <= max_objects <= num_classes:
        raise DatasetError(f"max_objects must lie in [1, num_classes={num_classes}], got {max_objects}")
    if not 0 < object_size <= 1:
        raise DatasetError(f"object_size is a fraction of the image side in (0, 1], got {object_size}")
    root = Path(root).expanduser()
    record = {"format": "coco", "version": FORMAT_VERSION, "num_classes": num_classes, "train_images": train_images,
              "val_images": val_images, "image_size": image_size, "max_objects": max_objects,
              "unlabelled_fraction": unlabelled_fraction, "seed": seed, "year": year,
              "object_size": object_size, "orientations": 2}
    splits = (("train", train_images), ("val", val_images))
    owned = [root / "annotations"] + [root / f"{s}{year}" for s, _ in splits]
    if _prepare(root, record, owned):
        return root
    cat_ids = synthetic_category_ids(num_classes)
    categories = [{"id": i, "name": f"class_{c:03d}", "supercategory": "synthetic"} for c, i in enumerate(cat_ids)]
    obj = max(4, round(image_size * object_size))
    params = [int(cv2.IMWRITE_JPEG_QUALITY), 95]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_id, (split, n) in enumerate(splits):
        rng = np.random.default_rng([seed, split_id])
        folder = root / f"{split}{year}"
        folder.mkdir(parents=True, exist_ok=True)
        counts = rng.integers(1, max_objects + 1, n) * (rng.random(n) >= unlabelled_fraction)
        classes = [rng.permutation(num_classes)[:k] for k in counts]
        patches = class_images(np.concatenate(classes).astype(np.int64), num_classes, obj, rng, orientations=2)
        canvas = rng.normal(40.0, 12.0, (n, image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
        images, annotations, p = [], [], 0
        for i in range(n):
            image_id = 1000 * (split_id + 1) + i
            name = f"COCO_{split}{year}_{image_id:012d}.jpg"
            for c in classes[i]:
                x, y = (int(v) for v in rng.integers(0, image_size - obj + 1, 2))
                canvas[i, y:y + obj, x:x + obj] = patches[p]
                p += 1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": cat_ids[int(c)], "bbox": [x, y, obj, obj],
                                    "area": float(obj * obj), "iscrowd": 0})
            ok, buf = cv2.imencode(".jpg", canvas[i][..., ::-1], params)
            if not ok:
                raise DatasetError(f"OpenCV could not encode a JPEG for {folder / name}")
            (folder / name).write_bytes(buf.tobytes())
            images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
        annotation_path(root, split, year).write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    write_marker(root, record)
    return root
