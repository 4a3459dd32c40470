"""Evaluation metrics, batched torch: top-k accuracy, confusion-matrix mIoU, 3D pose errors, running meters.

Pose metrics take `(..., J, 3)` joint positions in any unit (results are in the same unit) and compute in
float64; `reduction="none"` keeps one value per pose so that callers can average per action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AverageMeter",
    "ConfusionMatrix",
    "action_wise_mean",
    "auc_3d",
    "average_precision",
    "confusion_matrix",
    "mean_average_precision",
    "mean_class_accuracy",
    "miou_from_confusion",
    "mpjpe",
    "p_mpjpe",
    "pck_3d",
    "per_axis_error",
    "procrustes_align",
    "topk_accuracy",
]


# --------------------------------------------------------------------------------------- classification
@torch.no_grad()
def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percentage of samples whose target is among the k highest logits, for each k.

    `targets` are class indices (N,) or soft / one-hot targets (N, C) (their argmax is the class). A k
    larger than the number of classes counts as all classes (100 %).
    """
    if targets.ndim == 2:
        targets = targets.argmax(dim=1)
    if logits.shape[0] == 0:
        return [float("nan")] * len(ks)
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top.eq(targets.reshape(-1, 1))  # at most one True per row
    cum = hit.cumsum(dim=1).sum(dim=0, dtype=torch.float64)  # cum[k-1] = samples correct within top-k
    return [float(cum[min(k, maxk) - 1]) * 100.0 / logits.shape[0] for k in ks]


@torch.no_grad()
def mean_class_accuracy(hits_per_class: Tensor, count_per_class: Tensor) -> float:
    """Mean over classes of per-class top-1 accuracy (%), from per-class hit and sample counts (K,).

    Classes without a sample are left out (action-recognition convention: the mean of per-class recalls).
    """
    present = count_per_class > 0
    if not bool(present.any()):
        return float("nan")
    return float((hits_per_class[present].double() / count_per_class[present].double()).mean()) * 100.0


# --------------------------------------------------------------------------------------- segmentation
def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target equals `ignore_index` or is negative (the -1 convention) are skipped; any other
    target outside [0, C) is an error, as is a prediction outside [0, C).
    """
    pred, target = pred.reshape(-1), target.reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} elements, target {target.numel()}")
    keep = (target != ignore_index) & (target >= 0)
    pred, target = pred[keep].long(), target[keep].long()
    if target.numel():
        bad_t = (target >= num_classes).any()
        bad_p = ((pred < 0) | (pred >= num_classes)).any()
        if bad_t or bad_p:
            what = "target" if bad_t else "pred"
            raise ValueError(f"{what} holds values outside [0, {num_classes}) that are not ignore_index")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou_from_confusion(cm: Tensor, absent_as_zero: bool = False) -> tuple[float, Tensor]:
    """(mIoU in %, per-class IoU in % (float64)) from a confusion matrix with GT rows.

    IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and predictions has no IoU (nan)
    and is left out of the mean (mmseg's convention); `absent_as_zero=True` counts it as 0 and averages
    over all classes (CIRKD / Af-DCD's `SegmentationMetric`).
    """
    cm = cm.to(torch.float64)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan"))) * 100.0
    if absent_as_zero:
        return float(iou.nan_to_num(0.0).mean()), iou
    return (float(iou.nanmean()) if (union > 0).any() else float("nan")), iou


class ConfusionMatrix:
    """Accumulates a confusion matrix over a split; `compute()` gives mIoU, pixel and mean class accuracy."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """`pred`: class indices, or logits (N, C, ...) which are arg-maxed over dim 1."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        self.mat += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def sync(self, reduce_fn: Callable[[Tensor], Tensor | None]) -> None:
        """Sum the matrix over processes; `reduce_fn` all-reduces (sum) a tensor in place or returns it."""
        out = reduce_fn(self.mat)
        if out is not None:
            self.mat = out

    def compute(self, absent_as_zero: bool = False) -> dict[str, Any]:
        miou, iou = miou_from_confusion(self.mat, absent_as_zero)
        cm = self.mat.to(torch.float64)
        total, per_gt = cm.sum(), cm.sum(1)
        acc = torch.where(
            per_gt > 0, cm.diagonal() / per_gt.clamp_min(1), torch.full_like(per_gt, float("nan"))
        )
        return {
            "mIoU": miou,
            "aAcc": float(cm.diagonal().sum() / total * 100.0) if total > 0 else float("nan"),
            "mAcc": float(acc.nanmean() * 100.0) if (per_gt > 0).any() else float("nan"),
            "IoU": iou.tolist(),
        }


# --------------------------------------------------------------------------------------- 3D pose
def _reduce(err: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return err.mean()
    if reduction == "none":
        return err
    raise ValueError(f"reduction must be 'mean' or 'none', not '{reduction}'")


def _check_pose(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != gt.shape or pred.ndim < 2 or pred.shape[-1] != 3:
        raise ValueError(f"poses must both be (..., J, 3); got {tuple(pred.shape)} and {tuple(gt.shape)}")
    return pred.to(torch.float64), gt.to(torch.float64)


def mpjpe(pred: Tensor, gt: Tensor, reduction: str = "mean") -> Tensor:
    """Mean per-joint position error: mean over joints of the Euclidean distance (Protocol #1).

    Returns a scalar (`reduction="mean"`, the mean over all poses) or one value per pose (`"none"`).
    """
    pred, gt = _check_pose(pred, gt)
    return _reduce(torch.linalg.vector_norm(pred - gt, dim=-1).mean(dim=-1), reduction)


def procrustes_align(pred: Tensor, gt: Tensor) -> Tensor:
    """`pred` moved by the similarity transform (rotation, isotropic scale, translation) that best fits `gt`
    in the least-squares sense (Umeyama / orthogonal Procrustes), each pose on its own.

    With centred poses P, G (J, 3), M = P^T G = U S V^T; the best proper rotation is R = U D V^T with
    D = diag(1, 1, sign det(U V^T)) (a reflection is never used), the scale is trace(S D) / |P|^2, and the
    aligned pose is s P R + mean(G).
    """
    pred, gt = _check_pose(pred, gt)
    mu_p, mu_g = pred.mean(dim=-2, keepdim=True), gt.mean(dim=-2, keepdim=True)
    p, g = pred - mu_p, gt - mu_g
    u, s, vh = torch.linalg.svd(p.transpose(-1, -2) @ g)
    d = torch.ones_like(s)
    d[..., -1] = torch.sign(torch.linalg.det(u @ vh))
    d[..., -1] = torch.where(d[..., -1] == 0, torch.ones_like(d[..., -1]), d[..., -1])
    rot = u @ (d.unsqueeze(-1) * vh)
    scale = (s * d).sum(dim=-1) / (p * p).sum(dim=(-1, -2)).clamp_min(torch.finfo(torch.float64).tiny)
    return scale[..., None, None] * (p @ rot) + mu_g


def p_mpjpe(pred: Tensor, gt: Tensor, reduction: str = "mean") -> Tensor:
    """MPJPE after rigid Procrustes alignment with scale of each predicted pose to its ground truth
    (Protocol #2)."""
    return mpjpe(procrustes_align(pred, gt), gt.to(torch.float64), reduction)


def pck_3d(pred: Tensor, gt: Tensor, threshold: float = 150.0, reduction: str = "mean") -> Tensor:
    """3D-PCK in %: share of joints whose Euclidean error is below `threshold` (MPI-INF-3DHP: 150 mm).

    Choose the joint subset before calling (e.g. the 14 or 16 evaluation joints of a protocol).
    """
    pred, gt = _check_pose(pred, gt)
    dist = torch.linalg.vector_norm(pred - gt, dim=-1)
    return _reduce((dist < threshold).to(torch.float64).mean(dim=-1) * 100.0, reduction)


def auc_3d(
    pred: Tensor, gt: Tensor, thresholds: Sequence[float] | Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Area under the 3D-PCK curve in %: mean of `pck_3d` over `thresholds` (default 0, 5, ..., 150 mm,
    the 31 thresholds of the MPI-INF-3DHP convention)."""
    pred, gt = _check_pose(pred, gt)
    if thresholds is None:
        thresholds = torch.arange(0.0, 150.0 + 1e-9, 5.0, dtype=torch.float64)
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=pred.device)
    dist = torch.linalg.vector_norm(pred - gt, dim=-1)  # (..., J)
    below = (dist.unsqueeze(-1) < thr).to(torch.float64)  # (..., J, T)
    return _reduce(below.mean(dim=(-1, -2)) * 100.0, reduction)


def per_axis_error(pred: Tensor, gt: Tensor, reduction: str = "mean") -> Tensor:
    """Mean absolute error along x, y and z separately: (3,) with `reduction="mean"`, else (..., 3)."""
    pred, gt = _check_pose(pred, gt)
    err = (pred - gt).abs().mean(dim=-2)  # (..., 3)
    if reduction == "mean":
        return err.reshape(-1, 3).mean(dim=0)
    return _reduce(err, reduction)


def action_wise_mean(errors: Tensor, actions: Sequence[Any] | Tensor) -> tuple[float, dict[Any, float]]:
    """(mean of the per-action means, {action: mean}) of per-sample `errors`.

    Every action weighs the same regardless of its number of frames (Human3.6M's protocol).
    """
    errors = torch.as_tensor(errors, dtype=torch.float64).reshape(-1)
    if isinstance(actions, Tensor):
        keys = actions.reshape(-1).tolist()
    else:
        keys = list(actions)
    if len(keys) != errors.numel():
        raise ValueError(f"{errors.numel()} errors but {len(keys)} action labels")
    uniq = sorted(set(keys), key=str)
    index = {a: i for i, a in enumerate(uniq)}
    ids = torch.tensor([index[a] for a in keys], dtype=torch.long, device=errors.device)
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=errors.device).index_add_(0, ids, errors)
    counts = torch.bincount(ids, minlength=len(uniq)).to(torch.float64)
    means = sums / counts
    return float(means.mean()) if uniq else float("nan"), dict(zip(uniq, means.tolist()))


# --------------------------------------------------------------------------------------- meters
class AverageMeter:
    """Running sum / count / average of a scalar (e.g. a loss weighted by batch size)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0.0

    def update(self, val: float | Tensor, n: float = 1) -> None:
        """Add `val` as the mean of `n` samples."""
        val = float(val.detach()) if isinstance(val, Tensor) else float(val)
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def sync(self, reduce_fn: Callable[[Tensor], Tensor | None], device: torch.device | str = "cpu") -> None:
        """Combine meters across processes: `reduce_fn` sums a float64 tensor [sum, count] over all
        processes, in place or by returning the result (e.g. `torch.distributed.all_reduce`)."""
        t = torch.tensor([self.sum, self.count], dtype=torch.float64, device=device)
        out = reduce_fn(t)
        t = t if out is None or not isinstance(out, Tensor) else out
        self.sum, self.count = float(t[0]), float(t[1])

    def __repr__(self) -> str:
        return f"AverageMeter({self.name!r}, avg={self.avg:.6g}, count={self.count:g})"


# ---------------------------------------------------------------------------------------- multi-label
@torch.no_grad()
def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision (K,) in [0, 1] from scores and 0/1 targets, both (N, K).

    AP = sum over the positives of the precision at their score threshold, / number of positives (the
    non-interpolated AP of scikit-learn's ``average_precision_score``: tied scores form one threshold).
    A class without positives has AP nan. Sorts once per class on the scores' device, no loop over samples.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"scores and targets must both be (N, K), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    n = scores.shape[0]
    s, order = scores.double().sort(dim=0, descending=True)
    y = targets.double().gather(0, order)
    precision = y.cumsum(0) / torch.arange(1, n + 1, device=s.device, dtype=torch.float64)[:, None]
    # with ties, every member of a group of equal scores takes the precision at the group's last row
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[:-1] != s[1:]
    rows = torch.arange(n, device=s.device)[:, None].expand_as(s)
    end = torch.where(last, rows, torch.full_like(rows, n - 1)).flip(0).cummin(0).values.flip(0)
    positives = y.sum(0)
    return (y * precision.gather(0, end)).sum(0) / positives.where(positives > 0, torch.nan)


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """mAP in % over the classes that have positives (the MS-COCO multi-label metric)."""
    return float(average_precision(scores, targets).nanmean()) * 100.0
