"""The segmentation task: whole-image scoring, multi-scale + flip averaging of logits, each image once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.dist import DistEnv
from common.engine import eval_loader
from common.errors import UserError
from common.tasks import EvalContext, SegmentationTask, collate_segmentation


class Stride2(nn.Module):
    """A fixed network: class scores from colour channels at stride 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)


def _images():
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in ((8, 12), (10, 6), (8, 12)):
        img = torch.randn(3, h, w, generator=g)
        lab = img.argmax(0)
        lab[0, :] = -1  # void
        out.append((img, lab))
    return out


def test_collate_stacks_one_size_and_lists_several() -> None:
    data = _images()
    images, labels = collate_segmentation([data[0], data[2]])
    assert images.shape == (2, 3, 8, 12) and labels.shape == (2, 8, 12)
    images, labels = collate_segmentation(data)
    assert isinstance(images, list) and len(images) == 3


def test_whole_image_miou_counts_each_image_once() -> None:
    data = _images()
    task = SegmentationTask(3)
    ctx = EvalContext(DistEnv())
    got = task.evaluate(Stride2(), eval_loader(data, 2, DistEnv(), 0, task.collate), ctx)
    cm = torch.zeros(3, 3, dtype=torch.int64)
    for img, lab in data:  # the same by hand, one image at a time
        pred = F.interpolate(F.avg_pool2d(img[None], 2), lab.shape, mode="bilinear", align_corners=True)[0].argmax(0)
        keep = lab >= 0
        cm += torch.bincount(lab[keep] * 3 + pred[keep], minlength=9).reshape(3, 3)
    tp = cm.diagonal().double()
    iou = tp / (cm.sum(0) + cm.sum(1) - cm.diagonal()).double()
    assert got["mIoU"] == pytest.approx(100 * iou.mean().item())


def test_multiscale_flip_averages_upsampled_logits() -> None:
    img = torch.randn(1, 3, 8, 12)
    task = SegmentationTask(3, scales=(0.5, 1.0), flip=True)
    got = task.predict(Stride2(), img, (8, 12))
    want = 0
    for s in (0.5, 1.0):
        x = img if s == 1.0 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=True)
        for flip in (False, True):
            v = x.flip(-1) if flip else x
            out = F.interpolate(F.avg_pool2d(v, 2), (8, 12), mode="bilinear", align_corners=True)
            want = want + (out.flip(-1) if flip else out)
    torch.testing.assert_close(got, want)


def test_bad_scales_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="scales"):
        SegmentationTask(3, scales=(0.0,))
