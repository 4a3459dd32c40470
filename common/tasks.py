"""Task objects: what a kind of work (classification, regression ...) adds to the generic loop.

A task turns a batch into named losses and a loader into metrics, and names the metric that selects
the best epoch. The loop (`common.engine.Trainer`) does everything else. The contract, `Task`:

    primary: str                 metric that selects best.pt (a key of `evaluate`'s result)
    higher_is_better: bool       its direction (accuracy: True; an error in mm: False)
    losses(method, batch)        -> {"loss_name": scalar tensor}; the loop sums them (the method weights them)
    inputs(batch)                -> what the evaluated network takes (precise BN feeds it training batches)
    evaluate(model, loader, ctx) -> {"metric": float} over the whole (sharded) loader, synced once

`batch` is what the DataLoader yields, already on the device. The *method* is the trained `nn.Module`
with `forward_train(inputs, targets) -> (outputs, {"loss_name": tensor})` (mdistiller's shape); the
segmentation and skeleton papers add their own task next to these two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.dist import DistEnv, all_reduce_sum
from common.errors import UserError
from common.logging import progress

Losses = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EvalContext:
    """How the loop evaluates: the process group's device, AMP dtype and memory format."""

    env: DistEnv
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    show_progress: bool = False


class Task(Protocol):
    """See the module docstring."""

    primary: str
    higher_is_better: bool

    def losses(self, method: nn.Module, batch: Any) -> Losses: ...

    def inputs(self, batch: Any) -> Any: ...

    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]: ...


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors (in lists, tuples, dicts) to `device`; 4-D ones channels_last when asked."""
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, channels_last) for v in x)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Plain supervised training of a network with cross-entropy (the baseline "method")."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        logits = self.model(images)
        # Soft targets (mixup/cutmix) already carry the smoothing.
        smoothing = 0.0 if targets.dtype.is_floating_point else self.label_smoothing
        return logits, {"loss_ce": F.cross_entropy(logits, targets, label_smoothing=smoothing)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, show_progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole (sharded) set.

    The sums stay on the device; one all-reduce and one host copy at the end.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # top1, top5, loss, count
    for images, targets in progress(loader, total=len(loader), desc="eval", enabled=show_progress and env.is_main):
        images = to_device(images, env.device, channels_last)
        targets = targets.to(env.device, non_blocking=True)
        with autocast(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == targets[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits, targets, reduction="sum"),
                             torch.tensor(targets.shape[0], device=env.device)]).double()
    model.train(was_training)
    top1, top5, loss, count = all_reduce_sum(sums).tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan")}
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


class ClassificationTask:
    """Images and integer labels; optional mixup/cutmix (timm) on the training batch; top-1 selects."""

    primary = "top1"
    higher_is_better = True

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0,
                 num_classes: int | None = None) -> None:
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            if num_classes is None:
                raise UserError("mixup/cutmix need the number of classes; set data.num_classes")
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def losses(self, method: nn.Module, batch: Any) -> Losses:
        images, targets = batch
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise UserError(f"mixup/cutmix need an even per-device batch, got {images.shape[0]}; "
                                "change trainer.global_batch or trainer.max_device_batch")
            images, targets = self.mixup(images, targets)
        return method.forward_train(images, targets)[1]

    def inputs(self, batch: Any) -> Any:
        return batch[0]

    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]:
        return evaluate(model, loader, ctx.env, ctx.amp_dtype, ctx.channels_last, ctx.show_progress)


# --------------------------------------------------------------------------------------------------
# Regression (pose lifting and the like)
# --------------------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], dict[str, float]]


class RegressionTask:
    """Inputs and target tensors; the method's `forward_train` gives the losses (e.g. an L2 on joints).

    Evaluation predicts the whole loader, gathers predictions, targets and sample indices from every
    rank, and hands them to `score(pred, target, index, dataset) -> metrics`, in dataset order (the
    index lets a paper look up per-sample labels such as the action, for action-wise means). The
    primary metric is an error by default (lower is better).
    """

    def __init__(self, score: Scorer, primary: str = "mpjpe", higher_is_better: bool = False) -> None:
        self.score = score
        self.primary = primary
        self.higher_is_better = higher_is_better

    def losses(self, method: nn.Module, batch: Any) -> Losses:
        inputs, targets = batch
        return method.forward_train(inputs, targets)[1]

    def inputs(self, batch: Any) -> Any:
        return batch[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]:
        was_training = model.training
        model.eval()
        preds, targets = [], []
        for inputs, target in loader:
            with autocast(ctx.env.device, ctx.amp_dtype):
                preds.append(model(to_device(inputs, ctx.env.device)).float())
            targets.append(target)
        model.train(was_training)
        index = torch.tensor(list(iter(loader.sampler)), dtype=torch.long)  # type: ignore[arg-type]
        pred = torch.cat(preds).cpu() if preds else torch.zeros(0)
        target = torch.cat(targets).cpu() if targets else torch.zeros(0)
        if ctx.env.distributed:
            import torch.distributed as dist

            parts: list[Any] = [None] * ctx.env.world_size
            dist.all_gather_object(parts, (pred, target, index))
            pred, target, index = (torch.cat([p[i] for p in parts]) for i in range(3))
        if index.numel() == 0:
            return {}
        order = index.argsort()
        return self.score(pred[order], target[order], index[order], loader.dataset)


# --------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------


def collate_segmentation(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, Any]:
    """Evaluation batches of whole images: stacked when all have one size, else lists (one image each)."""
    images, labels = zip(*batch)
    if all(i.shape == images[0].shape for i in images) and all(t.shape == labels[0].shape for t in labels):
        return torch.stack(images), torch.stack(labels)
    return list(images), list(labels)


class SegmentationTask:
    """Images and label maps (void = any negative value or `ignore_index`); mIoU over the whole split selects.

    Losses come from the method's `forward_train(images, labels)` (cross-entropy with the ignore value is the
    method's). Evaluation scores whole images at full resolution: the network's logits, bilinearly upsampled
    to the label size, averaged over `scales` (the image resized by each factor) and, with `flip`, the
    mirrored image, then arg-maxed. The confusion matrix is summed over the split and over ranks, each image
    counted once; `absent_as_zero` averages the IoU over all classes, a class absent from labels and
    predictions counting 0 (the official mIoU of the segmentation distillation code bases), else over the
    classes present.
    """

    primary = "mIoU"
    higher_is_better = True
    collate = staticmethod(collate_segmentation)

    def __init__(self, num_classes: int, ignore_index: int = -1, scales: Sequence[float] = (1.0,),
                 flip: bool = False, align_corners: bool = True, absent_as_zero: bool = True) -> None:
        if not scales or min(scales) <= 0:
            raise UserError(f"evaluation scales {list(scales)}: give one or more positive factors")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.scales, self.flip = tuple(scales), flip
        self.align_corners, self.absent_as_zero = align_corners, absent_as_zero

    def losses(self, method: nn.Module, batch: Any) -> Losses:
        images, labels = batch
        return method.forward_train(images, labels)[1]

    def inputs(self, batch: Any) -> Any:
        return batch[0]

    def predict(self, model: nn.Module, images: torch.Tensor, size: tuple[int, int],
                ctx: EvalContext | None = None) -> torch.Tensor:
        """(B, C, *size) float32 logits summed over scales (and flips), at the label resolution."""
        device = ctx.env.device if ctx is not None else images.device
        amp = ctx.amp_dtype if ctx is not None else None
        total = None
        for s in self.scales:
            x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear",
                                                      align_corners=self.align_corners)
            views = [x, x.flip(-1)] if self.flip else [x]
            for i, v in enumerate(views):
                with autocast(device, amp):
                    out = model(v)
                out = F.interpolate(out.float(), size, mode="bilinear", align_corners=self.align_corners)
                out = out.flip(-1) if i else out
                total = out if total is None else total + out
        assert total is not None
        return total

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]:
        from common.metrics import ConfusionMatrix

        was_training = model.training
        model.eval()
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, ctx.env.device)
        for images, labels in progress(loader, total=len(loader), desc="eval",
                                       enabled=ctx.show_progress and ctx.env.is_main):
            pairs = zip(images, labels) if isinstance(images, list) else [(images, labels)]
            for img, lab in pairs:
                if img.dim() == 3:
                    img, lab = img[None], lab[None]
                img = to_device(img, ctx.env.device, ctx.channels_last)
                lab = lab.to(ctx.env.device, non_blocking=True)
                cm.update(self.predict(model, img, tuple(lab.shape[-2:]), ctx).argmax(1), lab)
        model.train(was_training)
        cm.sync(all_reduce_sum)
        out = cm.compute(self.absent_as_zero)
        return {"mIoU": out["mIoU"], "pixAcc": out["aAcc"], "mAcc": out["mAcc"]}


# --------------------------------------------------------------------------------------------------
# Multi-label classification (MS-COCO style: one sigmoid per class, mAP)
# --------------------------------------------------------------------------------------------------


class MultiLabelTask:
    """Images and multi-hot targets `(B, K)`; the method's `forward_train` gives the losses (BCE, ASL ...).

    Evaluation scores the whole loader, gathers scores and targets from every rank (AP does not
    decompose over shards) and reports `mAP` (%, over classes with positives; selects the best epoch),
    the mean binary cross-entropy `loss`, and `prevalence` (%): the mean fraction of positive labels, the
    expected mAP of random scores, the reference a smoke run's mAP is judged against.
    """

    primary = "mAP"
    higher_is_better = True

    def losses(self, method: nn.Module, batch: Any) -> Losses:
        images, targets = batch
        return method.forward_train(images, targets)[1]

    def inputs(self, batch: Any) -> Any:
        return batch[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]:
        from common.metrics import mean_average_precision

        was_training = model.training
        model.eval()
        scores, targets = [], []
        for images, target in progress(loader, total=len(loader), desc="eval",
                                       enabled=ctx.show_progress and ctx.env.is_main):
            with autocast(ctx.env.device, ctx.amp_dtype):
                scores.append(model(to_device(images, ctx.env.device, ctx.channels_last)).float().cpu())
            targets.append(target.float().cpu())
        model.train(was_training)
        score = torch.cat(scores) if scores else torch.zeros(0)
        target = torch.cat(targets) if targets else torch.zeros(0)
        if ctx.env.distributed:
            import torch.distributed as dist

            parts: list[Any] = [None] * ctx.env.world_size
            dist.all_gather_object(parts, (score, target))
            score, target = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if target.numel() == 0:
            return {"mAP": float("nan"), "loss": float("nan"), "prevalence": float("nan")}
        return {"mAP": mean_average_precision(score, target),
                "loss": F.binary_cross_entropy_with_logits(score, target).item(),
                "prevalence": 100.0 * target.mean().item()}


# --------------------------------------------------------------------------------------------------
# Multi-clip classification (videos, skeleton sequences)
# --------------------------------------------------------------------------------------------------


class MultiClipClassificationTask(ClassificationTask):
    """Clips of a video and one label; the test samples several clips per video and averages them.

    Training is `ClassificationTask`'s (one clip per sample). Evaluation takes inputs of shape
    `(N, *clip_shape)` (one clip) or `(N, clips, *clip_shape)`, where a clip has `clip_dims` dimensions:
    the clips are folded into the batch for one forward, each clip's logits go through a softmax and the
    probabilities are averaged over the clips (mmaction/pyskl `average_clip='prob'`). Metrics (%): top-1,
    top-5, mean class accuracy (per-class recall averaged over the classes present), and the mean negative
    log of the averaged probability of the target (`loss`). Sums stay on the device; one all-reduce.
    """

    def __init__(self, num_classes: int, clip_dims: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.clip_dims = clip_dims

    def probabilities(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """`(N, [clips,] *clip_shape)` -> class probabilities `(N, K)`, averaged over the clips."""
        n = inputs.shape[0]
        clips = inputs.reshape(-1, *inputs.shape[inputs.dim() - self.clip_dims:])
        probs = torch.softmax(model(clips).float(), dim=-1)
        return probs.view(n, clips.shape[0] // n, -1).mean(dim=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, float]:
        from common.metrics import mean_class_accuracy

        was_training = model.training
        model.eval()
        k = self.num_classes
        dev = ctx.env.device
        sums = torch.zeros(4 + 2 * k, dtype=torch.float64, device=dev)  # top1, top5, nll, count, hits/class, n/class
        for inputs, targets in progress(loader, total=len(loader), desc="eval",
                                        enabled=ctx.show_progress and ctx.env.is_main):
            inputs, targets = to_device(inputs, dev), targets.to(dev, non_blocking=True)
            if targets.min() < 0 or targets.max() >= k:
                raise UserError(f"a label outside [0, {k}) in the evaluation set; check data.num_classes")
            with autocast(dev, ctx.amp_dtype):
                probs = self.probabilities(model, inputs)
            top = probs.topk(min(5, k), dim=1).indices == targets[:, None]
            hit1 = top[:, 0].double()
            nll = -probs.gather(1, targets[:, None]).clamp_min(1e-12).log().sum()
            sums[:4] += torch.stack([hit1.sum(), top.any(1).double().sum(), nll.double(),
                                     torch.tensor(float(targets.numel()), device=dev, dtype=torch.float64)])
            sums[4:4 + k] += torch.bincount(targets, weights=hit1, minlength=k)
            sums[4 + k:] += torch.bincount(targets, minlength=k).double()
        model.train(was_training)
        sums = all_reduce_sum(sums)
        top1, top5, nll, count = sums[:4].tolist()
        if count == 0:
            return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"),
                    "mean_class_accuracy": float("nan")}
        return {"loss": nll / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
                "mean_class_accuracy": mean_class_accuracy(sums[4:4 + k], sums[4 + k:])}
