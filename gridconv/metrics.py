"""Human3.6M and MPI-INF-3DHP evaluation protocols as the GridConv paper reports them.

* Protocol #1 (MPJPE) and #2 (P-MPJPE: after the per-frame similarity alignment), in millimetres over
  all 17 joints (the predicted pelvis included), averaged per action and then over actions
  (unweighted), plus per-axis mean absolute errors - as the official ``evaluate_actionwise``.
* MPI-INF-3DHP: 3D-PCK at 150 mm and AUC over thresholds 0, 5, ..., 150 mm (PoseAug's protocol).

Per-frame errors come from ``common.metrics`` when it provides them; the small local versions here
implement the same definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Align ``pred`` (N, J, 3) to ``gt`` with the optimal similarity transform per frame (rotation
    without reflection, isotropic scale, translation), as the official ``get_procrustes_transformation``."""
    mu_gt, mu_pred = gt.mean(1, keepdim=True), pred.mean(1, keepdim=True)
    x0, y0 = gt - mu_gt, pred - mu_pred
    norm_x = x0.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    norm_y = y0.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    u, s, vh = torch.linalg.svd((x0 / norm_x).mT @ (y0 / norm_y))
    v = vh.mT
    sign = torch.sign(torch.linalg.det(v @ u.mT))
    v = torch.cat([v[..., :-1], v[..., -1:] * sign[:, None, None]], -1)
    s = torch.cat([s[..., :-1], s[..., -1:] * sign[:, None]], -1)
    rot = v @ u.mT
    scale = s.sum(-1)[:, None, None] * norm_x / norm_y
    return scale * (y0 @ rot) + mu_gt


def per_frame_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean joint position error of each frame (N,), in the units of the inputs."""
    return (pred - gt).norm(dim=-1).mean(-1)


def evaluate_actionwise(pred_mm: torch.Tensor, gt_mm: torch.Tensor, actions: Sequence[str],
                        procrustes: bool = False) -> dict:
    """Action-wise MPJPE (or P-MPJPE): mean per action, then the unweighted mean over actions.

    Returns ``mean_mm``, ``per_action_mm`` (sorted by action) and ``per_axis_mm`` (x, y, z mean absolute
    errors, averaged the same way).
    """
    pred_mm, gt_mm = pred_mm.double(), gt_mm.double()
    if procrustes:
        pred_mm = procrustes_align(pred_mm, gt_mm)
    frame_err = per_frame_mpjpe(pred_mm, gt_mm)
    axis_err = (pred_mm - gt_mm).abs().mean(1)  # (N, 3)
    names = sorted(set(actions))
    index = torch.tensor([names.index(a) for a in actions])
    counts = torch.bincount(index, minlength=len(names)).double()
    per_action = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, frame_err) / counts
    per_axis = torch.zeros(len(names), 3, dtype=torch.float64).index_add_(0, index, axis_err)
    per_axis = per_axis / counts[:, None]
    return {"mean_mm": per_action.mean().item(),
            "per_action_mm": dict(zip(names, per_action.tolist())),
            "per_axis_mm": per_axis.mean(0).tolist()}


PCK_THRESHOLD_MM = 150.0
AUC_THRESHOLDS_MM = tuple(float(t) for t in range(0, 151, 5))


def pck_auc(pred_mm: torch.Tensor, gt_mm: torch.Tensor, joints: Sequence[int] | None = None) -> dict:
    """3D-PCK (% of joints closer than 150 mm) and AUC (mean PCK over 0, 5, ..., 150 mm), in percent."""
    dist = (pred_mm.double() - gt_mm.double()).norm(dim=-1)
    if joints is not None:
        dist = dist[:, list(joints)]
    pck = (dist < PCK_THRESHOLD_MM).double().mean().item() * 100
    auc = torch.stack([(dist < t).double().mean() for t in AUC_THRESHOLDS_MM]).mean().item() * 100
    return {"pck": pck, "auc": auc, "mpjpe": dist.mean().item()}
