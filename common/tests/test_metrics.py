"""Metrics against values worked out by hand on small explicit arrays."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import (
    AverageMeter,
    ConfusionMatrix,
    action_wise_mean,
    auc_3d,
    confusion_matrix,
    miou_from_confusion,
    mpjpe,
    p_mpjpe,
    pck_3d,
    per_axis_error,
    procrustes_align,
    topk_accuracy,
)
from common.testing import golden_files

F64 = torch.float64


# ----------------------------------------------------------------------------------------- top-k
def test_topk_accuracy_hand_computed():
    # target ranks: sample 0 -> 1st, sample 1 -> 3rd, sample 2 -> 2nd, sample 3 -> 4th (last)
    logits = torch.tensor(
        [[0.1, 0.5, 0.3, 0.2], [0.9, 0.05, 0.03, 0.02], [0.2, 0.3, 0.4, 0.1], [0.4, 0.1, 0.2, 0.3]]
    )
    targets = torch.tensor([1, 2, 1, 1])
    assert topk_accuracy(logits, targets, ks=(1, 2, 3, 4)) == [25.0, 50.0, 75.0, 100.0]
    # k beyond the number of classes counts every class
    assert topk_accuracy(logits, targets, ks=(1, 5)) == [25.0, 100.0]
    # one-hot / soft targets are read through their argmax
    soft = torch.nn.functional.one_hot(targets, 4).float() * 0.9 + 0.025
    assert topk_accuracy(logits, soft, ks=(1, 2)) == [25.0, 50.0]


# ----------------------------------------------------------------------------------------- mIoU
# valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0) (2,2); the 255 and -1 pixels are ignored
TARGET = torch.tensor([[0, 0, 1, 1], [2, 255, 2, -1]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 3]])


def test_confusion_matrix_and_miou_hand_computed():
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU: class 0 = 1/(2+2-1) = 1/3, class 1 = 2/(3+2-2) = 2/3, class 2 = 1/(1+2-1) = 1/2
    miou, iou = miou_from_confusion(cm)
    assert iou.tolist() == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert miou == pytest.approx(50.0)


def test_miou_absent_class_conventions():
    cm = confusion_matrix(PRED, TARGET, num_classes=4)  # class 3 only predicted at an ignored pixel
    miou, iou = miou_from_confusion(cm)
    assert math.isnan(iou[3]) and miou == pytest.approx(50.0)  # nan-safe: absent class left out
    miou0, _ = miou_from_confusion(cm, absent_as_zero=True)
    assert miou0 == pytest.approx(150.0 / 4)  # CIRKD convention: absent class counts as 0


def test_confusion_matrix_rejects_out_of_range_target():
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=3)


def test_confusion_matrix_meter_logits_and_sync():
    meter = ConfusionMatrix(num_classes=3)
    logits = torch.nn.functional.one_hot(PRED.clamp(max=2), 3).permute(2, 0, 1).unsqueeze(0).float()
    meter.update(logits, TARGET.unsqueeze(0))
    out = meter.compute()
    assert out["mIoU"] == pytest.approx(50.0)
    assert out["aAcc"] == pytest.approx(400 / 6)  # 4 of 6 valid pixels right
    assert out["mAcc"] == pytest.approx(200 / 3)  # per-class recall 1/2, 1, 1/2
    meter.sync(lambda t: t.mul_(2))  # two identical ranks: counts double, ratios stay
    assert meter.mat.sum() == 12 and meter.compute()["mIoU"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------- 3D pose
def test_mpjpe_hand_computed():
    gt = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]])
    pred = torch.zeros_like(gt)
    # pose 0: distances 5 and 1 -> 3; pose 1: 0 and 3 -> 1.5
    assert mpjpe(pred, gt, reduction="none").tolist() == [3.0, 1.5]
    assert float(mpjpe(pred, gt)) == 2.25
    assert float(mpjpe(gt, gt)) == 0.0


def _rot_z(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=F64)


def test_p_mpjpe_similarity_copy_is_zero():
    gt = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], dtype=F64)
    pred = 2.5 * gt @ _rot_z(90) + torch.tensor([10.0, -5.0, 3.0], dtype=F64)
    assert float(mpjpe(pred, gt)) > 1.0
    assert float(p_mpjpe(pred, gt)) == pytest.approx(0.0, abs=1e-9)


def test_p_mpjpe_octahedron_hand_computed():
    # pred = gt with the z joints pushed to +-2; by symmetry R = I, t = 0 and the best scale is
    # tr(P^T G) / |P|^2 = (2 + 2 + 4) / 12 = 2/3, which leaves every joint 1/3 away from its target.
    e = torch.eye(3, dtype=F64)
    gt = torch.cat([e, -e])
    pred = gt * torch.tensor([1.0, 1.0, 2.0], dtype=F64)
    assert float(p_mpjpe(pred, gt)) == pytest.approx(1 / 3)
    # the same after moving the prediction by a rotation, scale and translation
    moved = 0.3 * pred @ _rot_z(37) + torch.tensor([100.0, 0.0, -20.0], dtype=F64)
    assert float(p_mpjpe(moved, gt)) == pytest.approx(1 / 3)


def test_p_mpjpe_does_not_undo_a_reflection():
    # regular tetrahedron and its mirror image (x -> -x): with a reflection the fit would be exact; the
    # best proper rotation gives M = P^T G = diag(-4, 4, 4), trace(S D) = 4, scale 4/12, and a total
    # squared error of s^2 |P|^2 - 2 s trace(SD) + |G|^2 = 4/3 - 8/3 + 12 = 32/3.
    gt = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64)
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0], dtype=F64)
    aligned = procrustes_align(mirrored, gt)
    assert float(((aligned - gt) ** 2).sum()) == pytest.approx(32 / 3)
    assert float(p_mpjpe(mirrored, gt)) > 1.0


def test_p_mpjpe_is_optimal_over_rotations_and_batched():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(8, 17, 3, generator=g, dtype=F64) * 100
    pred = gt + torch.randn(8, 17, 3, generator=g, dtype=F64) * 30
    aligned = procrustes_align(pred, gt)
    ours = ((aligned - gt) ** 2).sum(dim=(-1, -2))
    # batched equals pose by pose
    for i in range(8):
        assert torch.allclose(procrustes_align(pred[i], gt[i]), aligned[i])
    # no random proper rotation (with its optimal scale and translation) beats it
    q, _ = torch.linalg.qr(torch.randn(500, 3, 3, generator=g, dtype=F64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]  # det +1
    p = (pred - pred.mean(-2, keepdim=True))[0]
    c = (gt - gt.mean(-2, keepdim=True))[0]
    pr = p @ q  # (500, 17, 3)
    s = (pr * c).sum(dim=(-1, -2)) / (p * p).sum()
    best_random = ((s[:, None, None] * pr - c) ** 2).sum(dim=(-1, -2)).min()
    assert float(ours[0]) <= float(best_random) + 1e-9
    # aligning never increases the sum of squared errors
    assert bool((ours <= ((pred - gt) ** 2).sum(dim=(-1, -2))).all())


def test_pck_and_auc_hand_computed():
    gt = torch.zeros(1, 5, 3)
    # joint errors 0, 50, 149.9, 150, 200 mm along different axes
    pred = torch.tensor([[[0, 0, 0], [50, 0, 0], [0, 149.9, 0], [0, 0, -150], [120, 160, 0]]])
    assert float(pck_3d(pred, gt)) == pytest.approx(60.0)  # strictly below 150: 3 of 5
    assert float(pck_3d(pred, gt, threshold=100)) == pytest.approx(40.0)
    # thresholds 0, 5, ..., 150 (31): joints are below 30, 20, 1, 0, 0 of them -> 51 / (31 * 5)
    assert float(auc_3d(pred, gt)) == pytest.approx(100 * 51 / 155)
    assert float(auc_3d(gt, gt)) == pytest.approx(100 * 30 / 31)  # zero error misses only t = 0


def test_per_axis_error_hand_computed():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[1.0, -2.0, 3.0], [-3.0, 0.0, 1.0]]])
    assert per_axis_error(pred, gt).tolist() == [2.0, 1.0, 2.0]


def test_action_wise_mean_differs_from_frame_mean():
    errors = torch.tensor([1.0, 2.0, 3.0, 10.0])
    overall, per_action = action_wise_mean(errors, ["Walk", "Walk", "Walk", "Sit"])
    assert per_action == {"Sit": 10.0, "Walk": 2.0}
    assert overall == 6.0 and float(errors.mean()) == 4.0
    overall_ids, _ = action_wise_mean(errors, torch.tensor([0, 0, 0, 1]))
    assert overall_ids == 6.0


def test_pose_shape_errors():
    with pytest.raises(ValueError, match="J, 3"):
        mpjpe(torch.zeros(2, 17, 2), torch.zeros(2, 17, 2))


def _pose_blocks(d: dict) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(pred, gt, official metric block) triples of a GridConv fixture, found by its keys."""
    blocks = []
    if "metric_check_pred_m" in d:
        blocks.append((d["metric_check_pred_m"], d["metric_check_gt_m"], d["metrics_check"]))
    if "pred_pose_m" in d:
        blocks.append((d["pred_pose_m"], d["gt_pose_m"], d["metrics_model"]))
    elif "metrics_model" in d:  # the learnable-SGT network outputs joints directly (T = 1 output)
        blocks.append((d["outputs_eval"]["T=1.0"], d["target_pose3d_rel_m"], d["metrics_model"]))
    return blocks


@pytest.mark.parametrize("path", golden_files("gridconv", "*_small.pt"))
def test_pose_metrics_golden_vs_official_evaluate_actionwise(path):
    """Action-wise MPJPE / P-MPJPE / per-axis errors equal the official GridConv evaluation's values."""
    d = torch.load(path, weights_only=True)
    blocks = _pose_blocks(d)
    assert blocks, f"{path.name} has no metric block"
    for pred_m, gt_m, official in blocks:
        pred, gt = pred_m.to(F64) * 1000, gt_m.to(F64) * 1000
        for name, aligned in (("mpjpe", pred), ("pmpjpe", procrustes_align(pred, gt))):
            ref = official[name]
            overall, per_action = action_wise_mean(mpjpe(aligned, gt, reduction="none"), d["actions"])
            assert overall == pytest.approx(ref["mean_over_actions_mm"], abs=1e-6)
            assert per_action == pytest.approx(ref["per_action_mm"], abs=1e-6)
            axis = per_axis_error(aligned, gt, reduction="none")
            per_axis = [action_wise_mean(axis[:, k], d["actions"])[0] for k in range(3)]
            assert per_axis == pytest.approx(ref["per_axis_abs_mm"], abs=1e-6)
        overall_p, _ = action_wise_mean(p_mpjpe(pred, gt, reduction="none"), d["actions"])
        assert overall_p == pytest.approx(official["pmpjpe"]["mean_over_actions_mm"], abs=1e-6)


# ----------------------------------------------------------------------------------------- meter
def test_average_meter_and_sync():
    m = AverageMeter("loss")
    assert math.isnan(m.avg)
    m.update(2.0, n=3)
    m.update(torch.tensor(4.0), n=1)
    assert (m.sum, m.count, m.avg) == (10.0, 4.0, 2.5)
    m.sync(lambda t: t.mul_(2))  # in-place all-reduce over two identical ranks
    assert (m.sum, m.count) == (20.0, 8.0) and m.avg == 2.5
    m.reset()
    m.update(2.0, n=4)
    m.sync(lambda t: t + torch.tensor([6.0, 2.0], dtype=F64))  # returning all-reduce; other rank 6 / 2
    assert (m.sum, m.count) == (14.0, 6.0)
