"""The official image pipeline (spec d, f.1): BGR, mean subtraction only, random scale / pad / crop / flip.

Readers (`common.data.SegmentationDataset`) give a BGR uint8 image and int64 train ids (-1 void). Training:
subtract the BGR mean [104.008, 116.669, 122.679] (no /255, no std), scale by s in {0.5, 0.6, ..., 2.0}
(image bilinear, label nearest, OpenCV), pad bottom/right to the crop (image 0 = the mean colour, label -1),
random crop, horizontal flip with p = 0.5. Evaluation: mean subtraction only, full resolution. Randomness
comes from torch's generator (seeded per DataLoader worker), so runs are reproducible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from common.data import SegmentationDataset

BGR_MEAN = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)
SCALES = tuple(round(0.5 + i / 10, 1) for i in range(16))  # 0.5 ... 2.0


def normalise(image: np.ndarray) -> np.ndarray:
    """BGR uint8 -> float32 minus the BGR mean (f.1)."""
    return image.astype(np.float32) - BGR_MEAN


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
    """HWC float32 -> CHW tensor; label -> int64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(
        np.ascontiguousarray(label)).long()


@dataclass
class TrainTransform:
    """Random scale (16 values), pad to `crop` (h, w), random crop, hflip (spec d)."""

    crop: tuple[int, int]
    scales: tuple[float, ...] = SCALES
    flip: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        s = self.scales[int(torch.randint(len(self.scales), ()))]
        if s != 1.0:
            image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label.astype(np.int32), None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
        image = normalise(image)
        ch, cw = self.crop
        h, w = label.shape
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=-1)
        h, w = label.shape
        y = int(torch.randint(h - ch + 1, ()))
        x = int(torch.randint(w - cw + 1, ()))
        image, label = image[y: y + ch, x: x + cw], label[y: y + ch, x: x + cw]
        if self.flip and bool(torch.rand(()) < 0.5):
            image, label = image[:, ::-1], label[:, ::-1]
        return to_tensors(image, label)


def eval_transform(image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
    """Whole image at its own resolution, mean subtraction only (spec d)."""
    return to_tensors(normalise(image), label)


def build_dataset(name: str, root: str | os.PathLike, split: str, crop: tuple[int, int] | None = None,
                  num_classes: int | None = None, list_path: str | os.PathLike | None = None) -> SegmentationDataset:
    """A split of a spec-f dataset with the official pipeline: `crop` given = training, else evaluation."""
    transform = TrainTransform(tuple(crop)) if crop is not None else eval_transform  # type: ignore[arg-type]
    return SegmentationDataset(name, root, split, transform, list_path=list_path, num_classes=num_classes)
