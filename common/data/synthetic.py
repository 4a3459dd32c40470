"""Small, learnable synthetic datasets written in the real on-disk formats, so tests and smoke runs go
through the real readers.

Every image is a noisy sinusoidal grating. Its class fixes the grating's orientation and its colour pair
(foreground hue, complementary background): with `a = ceil(sqrt(K))` orientations spread over 180 degrees
and `ceil(K / a)` hues spread over the colour wheel, class c gets orientation `c % a` and hue `c // a`.
Phase, spatial frequency, brightness and small orientation/hue jitter vary per image and Gaussian noise is
added, so a network must learn orientation and colour rather than memorise pixels; a small CNN separates
the classes within a few epochs. Everything is drawn from `numpy.random.default_rng(seed)`.

A writer records its arguments in a marker file and returns at once when a matching dataset is already
there; it rewrites a synthetic dataset written with other arguments and refuses to touch a folder that
holds anything else.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.data.base import MARKER_NAME, DatasetError, main_process_first, read_marker, write_marker
from common.data.cifar import LAYOUTS

FORMAT_VERSION = 1
_CHUNK = 1024  # images generated at once (bounds memory at large sizes)


def _hsv_to_rgb(h: np.ndarray, s: float | np.ndarray, v: float | np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, h in [0, 1) (any shape), result (..., 3) in [0, 1]."""
    h, s, v = np.broadcast_arrays(np.asarray(h, np.float32), np.float32(s), np.float32(v))
    k = (np.array([5.0, 3.0, 1.0], np.float32) + h[..., None] * 6.0) % 6.0
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def class_images(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator,
                 orientations: int | None = None) -> np.ndarray:
    """Images of the given labels, uint8 RGB (N, size, size, 3); see the module docstring for the design.

    ``orientations`` overrides the number of orientations ``a`` (default ``ceil(sqrt(K))``); with 2 (vertical and
    horizontal gratings) a horizontal flip never turns one class into another.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_orient = orientations or math.ceil(math.sqrt(num_classes))
    n_hue = math.ceil(num_classes / n_orient)
    theta = (labels % n_orient + rng.uniform(-0.2, 0.2, n)) * (math.pi / n_orient)
    hue = ((labels // n_orient + rng.uniform(-0.15, 0.15, n)) / n_hue) % 1.0
    cycles = rng.uniform(2.5, 4.0, n)  # grating periods across the image
    phase = rng.uniform(0.0, 2 * math.pi, n)
    gain = rng.uniform(0.75, 1.0, n).astype(np.float32)

    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((n, size, size, 3), np.uint8)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        m = len(labels[sl])
        proj = (np.cos(theta[sl])[:, None, None] * xx + np.sin(theta[sl])[:, None, None] * yy).astype(
            np.float32
        )
        wave = 0.5 + 0.5 * np.sin(
            2 * math.pi * cycles[sl, None, None].astype(np.float32) * proj
            + phase[sl, None, None].astype(np.float32)
        )
        fg = _hsv_to_rgb(hue[sl], 0.85, gain[sl])[:, None, None, :]
        bg = _hsv_to_rgb((hue[sl] + 0.5) % 1.0, 0.35, 0.25 * gain[sl])[:, None, None, :]
        img = wave[..., None] * fg + (1.0 - wave[..., None]) * bg
        img += rng.normal(0.0, 0.08, (m, size, size, 3)).astype(np.float32)
        out[sl] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _prepare(folder: Path, record: dict[str, Any], owned: list[Path]) -> bool:
    """True when `folder` already holds this exact dataset; otherwise clear our old output and say False."""
    marker = read_marker(folder)
    if marker == record:
        return True
    if marker is None and folder.is_dir() and any(folder.iterdir()):
        raise DatasetError(
            f"{folder} exists and holds data that no synthetic writer made; choose an empty or new folder"
        )
    (folder / MARKER_NAME).unlink(missing_ok=True)  # first, so a crash mid-rewrite is never taken as done
    for path in owned:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return False


def class_name(c: int) -> str:
    return f"class_{c:03d}"


@main_process_first
def write_synthetic_imagefolder(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 32,
    val_per_class: int = 8,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write `<root>/{train,val}/<class>/<class>_<i>.JPEG` (OpenCV, quality 95); return `root`."""
    root = Path(root).expanduser()
    record = {
        "format": "imagefolder",
        "version": FORMAT_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    if _prepare(root, record, [root / "train", root / "val"]):
        return root
    params = [int(cv2.IMWRITE_JPEG_QUALITY), 95]
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rng = np.random.default_rng([seed, split_id])
        labels = np.repeat(np.arange(num_classes), per_class)
        images = class_images(labels, num_classes, image_size, rng)[..., ::-1]  # RGB -> BGR for OpenCV
        for c in range(num_classes):
            (root / split / class_name(c)).mkdir(parents=True, exist_ok=True)
        counters = np.zeros(num_classes, np.int64)
        for img, c in zip(images, labels):
            name = class_name(int(c))
            path = root / split / name / f"{name}_{counters[c]:05d}.JPEG"
            counters[c] += 1
            ok, buf = cv2.imencode(".jpg", img, params)
            if not ok:
                raise DatasetError(f"OpenCV could not encode a JPEG for {path}")
            path.write_bytes(buf.tobytes())
    write_marker(root, record)
    return root


@main_process_first
def write_synthetic_cifar(
    root: str | os.PathLike,
    num_classes: int = 100,
    train_per_class: int = 50,
    test_per_class: int = 10,
    seed: int = 0,
) -> Path:
    """Write the official CIFAR-10/100 python pickles under `root`; return the dataset folder.

    Keys, dtypes and file names are those of the real archives (protocol-2 pickles with byte-string keys);
    CIFAR-10's training set is spread over five batches. CIFAR-100 coarse labels are `fine // 5`.
    """
    if num_classes not in LAYOUTS:
        raise DatasetError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    layout = LAYOUTS[num_classes]
    folder = Path(root).expanduser() / layout["folder"]
    record = {
        "format": f"cifar{num_classes}",
        "version": FORMAT_VERSION,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    owned = [folder / f for f in layout["train"] + layout["test"] + [layout["meta"]]]
    if _prepare(folder, record, owned):
        return folder
    names = [class_name(c).encode() for c in range(num_classes)]

    def dump(obj: dict, fname: str) -> None:
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        rng = np.random.default_rng([seed, split_id])
        labels = _balanced_labels(num_classes, per_class, rng)
        data = class_images(labels, num_classes, 32, rng).transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        files = layout[split]
        for part, idx in enumerate(np.array_split(np.arange(len(labels)), len(files))):
            fname = files[part]
            batch: dict[bytes, Any] = {
                b"batch_label": f"synthetic {split} batch {part + 1} of {len(files)}".encode(),
                b"data": np.ascontiguousarray(data[idx]),
                b"filenames": [f"synthetic_{split}_{i:06d}.png".encode() for i in idx],
            }
            if num_classes == 10:
                batch[b"labels"] = labels[idx].tolist()
            else:
                batch[b"fine_labels"] = labels[idx].tolist()
                batch[b"coarse_labels"] = (labels[idx] // 5).tolist()
            dump(batch, fname)
    if num_classes == 10:
        meta = {
            b"label_names": names,
            b"num_cases_per_batch": -(-num_classes * train_per_class // 5),
            b"num_vis": 3072,
        }
    else:
        meta = {
            b"fine_label_names": names,
            b"coarse_label_names": [f"superclass_{c:02d}".encode() for c in range(20)],
        }
    dump(meta, layout["meta"])
    write_marker(folder, record)
    return folder
