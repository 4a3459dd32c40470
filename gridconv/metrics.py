"""Human3.6M and MPI-INF-3DHP evaluation protocols as the GridConv paper reports them, on top of
``common.metrics``.

* Protocol #1 (MPJPE) and #2 (P-MPJPE: after the per-frame similarity alignment), in millimetres over
  all 17 joints (the predicted pelvis included), averaged per action and then over actions
  (unweighted), plus per-axis mean absolute errors averaged the same way - as the official
  ``evaluate_actionwise`` in ``src/lifting.py``.
* MPI-INF-3DHP: 3D-PCK at 150 mm and AUC over 0, 5, ..., 150 mm (PoseAug's protocol), per scene and
  over all frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.metrics import action_wise_mean, auc_3d, mpjpe, pck_3d, per_axis_error, procrustes_align


def evaluate_actionwise(pred_mm: torch.Tensor, gt_mm: torch.Tensor, actions: Sequence[str],
                        procrustes: bool = False) -> dict:
    """Action-wise MPJPE (or P-MPJPE with ``procrustes``): mean per action, then the unweighted mean.

    Returns ``mean_mm``, ``per_action_mm`` (sorted by action) and ``per_axis_mm`` (x, y, z).
    """
    if procrustes:
        pred_mm = procrustes_align(pred_mm, gt_mm)
    mean, per_action = action_wise_mean(mpjpe(pred_mm, gt_mm, reduction="none"), actions)
    axis = per_axis_error(pred_mm, gt_mm, reduction="none")
    per_axis = [action_wise_mean(axis[:, i], actions)[0] for i in range(3)]
    return {"mean_mm": mean, "per_action_mm": per_action, "per_axis_mm": per_axis}


def protocol_metrics(pred_m: torch.Tensor, gt_m: torch.Tensor, actions: Sequence[str]) -> dict[str, float]:
    """The numbers a Human3.6M run reports (predictions and targets in metres, root-relative)."""
    pred_mm, gt_mm = pred_m.double() * 1000, gt_m.double() * 1000
    p1 = evaluate_actionwise(pred_mm, gt_mm, actions)
    p2 = evaluate_actionwise(pred_mm, gt_mm, actions, procrustes=True)
    out = {"mpjpe": p1["mean_mm"], "pmpjpe": p2["mean_mm"]}
    out |= {f"err_{axis}": v for axis, v in zip("xyz", p1["per_axis_mm"])}
    out |= {f"mpjpe/{a}": v for a, v in p1["per_action_mm"].items()}
    return out


def pck_auc(pred_mm: torch.Tensor, gt_mm: torch.Tensor,
            scenes: Sequence[str] | None = None) -> dict[str, float]:
    """3D-PCK (%) at 150 mm, AUC (%) and MPJPE over all frames, and per scene when ``scenes`` is given."""
    out = {"pck": pck_3d(pred_mm, gt_mm).item(), "auc": auc_3d(pred_mm, gt_mm).item(),
           "mpjpe": mpjpe(pred_mm, gt_mm).item()}
    for scene in sorted(set(scenes or ())):
        mask = torch.tensor([s == scene for s in scenes])
        out[f"pck/{scene}"] = pck_3d(pred_mm[mask], gt_mm[mask]).item()
        out[f"auc/{scene}"] = auc_3d(pred_mm[mask], gt_mm[mask]).item()
    return out
