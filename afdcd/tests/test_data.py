"""The BGR mean-only pipeline (spec d, f.1) on the real readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from afdcd.data import BGR_MEAN, SCALES, TrainTransform, build_dataset, eval_transform
from common.data import write_synthetic_segmentation


def test_scales_are_the_sixteen_official_values():
    assert len(SCALES) == 16 and SCALES[0] == 0.5 and SCALES[-1] == 2.0


def test_eval_is_mean_subtraction_only():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    label = np.zeros((5, 7), np.int64)
    x, y = eval_transform(image, label)
    assert x.shape == (3, 5, 7) and y.dtype == torch.int64
    assert torch.allclose(x, torch.from_numpy(image.astype(np.float32) - BGR_MEAN).permute(2, 0, 1))


def test_train_pads_with_mean_and_ignore_then_crops():
    image = np.full((10, 12, 3), 200, np.uint8)
    label = np.ones((10, 12), np.int64)
    x, y = TrainTransform((16, 16), scales=(1.0,), flip=False)(image, label)
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    assert (y == -1).sum() == 16 * 16 - 10 * 12 and (x[:, y == -1] == 0).all()
    assert torch.allclose(x[:, 0, 0], torch.from_numpy(200 - BGR_MEAN))


def test_train_is_seeded_and_flips_image_and_label_together():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = np.tile(np.arange(30), (20, 1))
    t = TrainTransform((8, 8))
    torch.manual_seed(0)
    a = [t(image, label) for _ in range(8)]
    torch.manual_seed(0)
    b = [t(image, label) for _ in range(8)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    flipped = [y for _, y in a if (y[:, 1:] <= y[:, :-1]).all() and (y[:, 1:] < y[:, :-1]).any()]
    assert flipped, "no flipped crop in 8 draws (p = 0.5)"


def test_build_dataset_on_synthetic_cityscapes(tmp_path: Path):
    root = write_synthetic_segmentation("cityscapes", tmp_path / "c", num_classes=4, sizes={"train": 2, "val": 1})
    x, y = build_dataset("cityscapes", root, "train", crop=(32, 40))[0]
    assert x.shape == (3, 32, 40) and y.shape == (32, 40)
    x, y = build_dataset("cityscapes", root, "val")[0]
    assert x.shape == (3, 48, 48)
