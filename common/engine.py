"""The small shared classification loop.

`Trainer` trains any *method*: an `nn.Module` with
`forward_train(images, targets) -> (logits, {"loss_name": tensor, ...})`. The losses are summed as
given (the method weights them). Optional hooks on the method:

* `on_epoch_start(epoch, num_epochs)` and `on_step_start(step, total_steps)`: schedules that are
  part of the method (a temperature, an epoch-dependent loss weight);
* `extra_state()` / `load_extra_state(state)`: state outside `state_dict()` that changes the maths;
* `eval_model()`: the network to evaluate (a distiller returns its student).

The loop gives AMP (bf16, or fp16 with a scaler), channels_last, gradient accumulation (global
batch -> per-device batch), DDP, gradient clipping, EMA, timm optimizers and per-step timm LR
schedules with warmup, atomic checkpoints with exact resume (model, optimizer, scheduler, scaler,
EMA, RNG states, epoch, step and sampler position), and a save-and-exit on SIGTERM.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from common.checkpoint import (
    Checkpointer,
    StopSignal,
    capture_rng_state,
    claim_resumed,
    find_resume,
    load_checkpoint,
    restore_rng_state,
)
from common.config import LoggerConfig, OptimConfig, ScheduleConfig, TrainerConfig, check_choice
from common.dist import DistEnv, ResumableSampler, batch_plan, reduce_metrics, scale_lr
from common.errors import UserError
from common.logging import RunLogger, progress
from common.metrics import topk_accuracy

Losses = dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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

    def eval_model(self) -> nn.Module:
        return self.model


class _TrainStep(nn.Module):
    """Routes DDP's forward to the method's `forward_train`."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        return self.method.forward_train(images, targets)


class EpochSeeded(Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index) inside DataLoader workers.

    Random augmentations then do not depend on which worker reads a sample, so a run resumed
    mid-epoch sees the same augmented images as an uninterrupted one. In the main process
    (workers=0) the global RNG, which the checkpoint restores, drives augmentation instead.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None:
            s = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**31
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
        return self.dataset[index]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    check_choice("trainer.amp", amp, ("auto", "bf16", "fp16", "off"))
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_channels_last(flag: str, device: torch.device) -> bool:
    check_choice("trainer.channels_last", flag, ("auto", "on", "off"))
    return flag == "on" or (flag == "auto" and device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(x: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device, channels_last) for v in x)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device, channels_last) for k, v in x.items()}
    return x


def eval_loader(dataset: Dataset, batch_size: int, env: DistEnv, workers: int = 2,
                collate_fn: Callable | None = None) -> DataLoader:
    """A loader that shows every sample exactly once over all ranks."""
    sampler = ResumableSampler(len(dataset), env.rank, env.world_size, shuffle=False, pad=False)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=env.device.type == "cuda", collate_fn=collate_fn)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, show_progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole (sharded) set."""
    was_training = model.training
    model.eval()
    sums = {"top1": 0.0, "top5": 0.0, "loss": 0.0}
    count = 0
    for images, targets in progress(loader, total=len(loader), desc="eval", enabled=show_progress and env.is_main):
        images = _to_device(images, env.device, channels_last)
        targets = targets.to(env.device, non_blocking=True)
        with autocast(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        n = targets.shape[0]
        k = min(5, logits.shape[1])
        top1, topk = topk_accuracy(logits, targets, ks=(1, k))
        sums["top1"] += float(top1) * n / 100.0
        sums["top5"] += float(topk) * n / 100.0
        sums["loss"] += F.cross_entropy(logits, targets, reduction="sum").item()
        count += n
    model.train(was_training)
    out = reduce_metrics(sums, count, env.device)
    out["top1"] *= 100.0
    out["top5"] *= 100.0
    return out


def build_optimizer(params_or_model: Any, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """A timm optimizer with the paper's lr scaled to the global batch."""
    from timm.optim import create_optimizer_v2

    lr = scale_lr(cfg.lr, global_batch, cfg.base_batch, cfg.lr_scaling)
    kwargs: dict[str, Any] = {}
    name = cfg.name.lower()
    if name in ("sgd", "momentum", "nesterov"):
        kwargs["nesterov"] = cfg.nesterov
    if "adam" in name or name in ("lamb", "lion"):
        kwargs["betas"] = tuple(cfg.betas)
        kwargs["eps"] = cfg.eps
    try:
        return create_optimizer_v2(params_or_model, opt=name, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, filter_bias_and_bn=cfg.no_decay_1d, **kwargs)
    except (AssertionError, ValueError, KeyError) as err:
        raise UserError(f"config optim.name={cfg.name!r}: {str(err).splitlines()[0]}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                    steps_per_epoch: int) -> Any | None:
    """A timm LR scheduler driven per optimizer step (or per epoch), with warmup; None for constant."""
    from timm.scheduler import create_scheduler_v2

    check_choice("schedule.name", cfg.name, ("cosine", "step", "multistep", "constant"))
    # Milestones mean what torch's MultiStepLR means: the lr drops at the start of epoch m. timm drops
    # when t + 1 >= milestone, one unit early, so each milestone is moved half a unit later.
    half = 0.5 if not cfg.per_step else 0.5 / max(steps_per_epoch, 1)
    milestones = [m + half for m in cfg.milestones] or [30 + half, 60 + half]
    if cfg.name == "constant" and cfg.warmup_epochs == 0:
        return None
    sched, _ = create_scheduler_v2(
        optimizer,
        sched="step" if cfg.name == "constant" else cfg.name,
        num_epochs=epochs,
        decay_epochs=cfg.decay_epochs if cfg.name != "constant" else 10**9,
        decay_milestones=milestones,
        decay_rate=cfg.decay_rate if cfg.name != "constant" else 1.0,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=cfg.warmup_prefix,
        cooldown_epochs=0,
        step_on_epochs=not cfg.per_step,
        updates_per_epoch=steps_per_epoch,
    )
    return sched


def _eval_model(method: nn.Module) -> nn.Module:
    fn = getattr(method, "eval_model", None)
    return fn() if callable(fn) else method


class Trainer:
    """Trains a method on a dataset with the paper's recipe; see the module docstring."""

    def __init__(
        self,
        method: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None,
        trainer: TrainerConfig,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        run_dir: str | Path,
        env: DistEnv | None = None,
        logger: RunLogger | None = None,
        logger_cfg: LoggerConfig | None = None,
        params: Any = None,
        collate_fn: Callable | None = None,
        evaluate_fn: Callable[[nn.Module, DataLoader], dict[str, float]] | None = None,
        num_classes: int | None = None,
        config_dict: Mapping[str, Any] | None = None,
        primary_metric: str = "top1",
        primary_higher_is_better: bool = True,
    ) -> None:
        self.cfg = trainer
        self.env = env or DistEnv()
        self.run_dir = Path(run_dir)
        self.method = method.to(self.env.device)
        self.train_set = train_set
        self.val_set = val_set
        self.collate_fn = collate_fn
        self.primary = primary_metric
        self.primary_higher = primary_higher_is_better
        lcfg = logger_cfg or LoggerConfig()
        self.logger = logger or RunLogger(self.run_dir, config_dict, self.env.is_main, lcfg.wandb_mode,
                                          lcfg.project, name=self.run_dir.name)
        self.amp_dtype = resolve_amp(trainer.amp, self.env.device)
        self.channels_last = resolve_channels_last(trainer.channels_last, self.env.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)

        self.plan = batch_plan(trainer.global_batch, self.env.world_size, trainer.max_device_batch)
        self.sampler = ResumableSampler(len(train_set), self.env.rank, self.env.world_size,  # type: ignore[arg-type]
                                        shuffle=True, seed=trainer.seed)
        micro_per_epoch = len(self.sampler) // self.plan.per_device
        self.steps_per_epoch = micro_per_epoch // self.plan.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training set has {len(train_set)} samples, fewer than one global batch of "  # type: ignore[arg-type]
                f"{trainer.global_batch}; lower trainer.global_batch"
            )
        self.total_steps = self.steps_per_epoch * trainer.epochs

        self.optimizer = build_optimizer(params if params is not None else self.method, optim, trainer.global_batch)
        self.scheduler = build_scheduler(self.optimizer, schedule, trainer.epochs, self.steps_per_epoch)
        self.per_step_schedule = schedule.per_step
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if trainer.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(_eval_model(self.method), decay=trainer.ema_decay)
        self.mixup = None
        if trainer.mixup > 0 or trainer.cutmix > 0:
            if num_classes is None:
                raise UserError("mixup/cutmix need the number of classes; set data.num_classes")
            from timm.data import Mixup

            if self.plan.per_device % 2:
                raise UserError(f"mixup/cutmix need an even per-device batch, got {self.plan.per_device}; "
                                "change trainer.global_batch or trainer.max_device_batch")

            self.mixup = Mixup(mixup_alpha=trainer.mixup, cutmix_alpha=trainer.cutmix,
                               label_smoothing=trainer.label_smoothing, num_classes=num_classes)
        self.evaluate_fn = evaluate_fn

        self.step_module: nn.Module = _TrainStep(self.method)
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.step_module = DDP(self.step_module, device_ids=ids,
                                   find_unused_parameters=trainer.ddp_find_unused_parameters)
        if trainer.compile:
            self.step_module = torch.compile(self.step_module)  # type: ignore[assignment]
        self.checkpointer = Checkpointer(self.run_dir, enabled=self.env.is_main)
        self.epoch = 0
        self.micro = 0  # micro-batches done in the current epoch (a multiple of accum at save points)
        self.global_step = 0
        self.best: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        extra = getattr(self.method, "extra_state", None)
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": self._gather_rng(),
            "epoch": self.epoch,
            "step_in_epoch": self.micro // self.plan.accum_steps,
            "global_step": self.global_step,
            "best": dict(self.best),
            "history": list(self.history),
            "extra": extra() if callable(extra) else None,
            "trainer": asdict(self.cfg),
        }

    def _gather_rng(self) -> Any:
        rng = capture_rng_state()
        if not self.env.distributed:
            return rng
        import torch.distributed as dist

        states: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(states, rng)
        return states

    def _check_compatible(self, state: Mapping[str, Any], path: Path) -> None:
        """A checkpoint continues only the same recipe: refuse one from another global batch, length or seed."""
        saved = state.get("trainer") or {}
        for key in ("global_batch", "epochs", "seed"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise UserError(f"{path} was written with trainer.{key}={saved[key]}, this run has "
                                f"{getattr(self.cfg, key)}; resume with the same value or set trainer.resume=none")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        load_extra = getattr(self.method, "load_extra_state", None)
        if callable(load_extra) and state.get("extra") is not None:
            load_extra(state["extra"])
        rng = state["rng"]
        if isinstance(rng, list):  # one state per rank
            rng = rng[self.env.rank] if len(rng) == self.env.world_size else rng[0]
        restore_rng_state(rng)
        self.epoch = int(state["epoch"])
        # Saved in optimizer steps, so a resume with another world size or accumulation stays exact:
        # every rank's shard is a stride of the epoch order, and a prefix of steps is a prefix of it.
        self.micro = int(state["step_in_epoch"]) * self.plan.accum_steps
        self.global_step = int(state["global_step"])
        self.best = dict(state.get("best") or {})
        self.history = list(state.get("history") or [])

    def save(self, name: str = "last.pt") -> None:
        self.checkpointer.save(self.state_dict(), name)

    # ----------------------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        dataset = EpochSeeded(self.train_set, self.cfg.seed)
        dataset.epoch = epoch
        return DataLoader(
            dataset, batch_size=self.plan.per_device, sampler=self.sampler, num_workers=self.cfg.workers,
            pin_memory=self.env.device.type == "cuda", drop_last=True, collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch),
            persistent_workers=False,
        )

    def _micro_batches(self, epoch: int) -> Iterator[Any]:
        self.sampler.set_position(epoch, self.micro * self.plan.per_device)
        yield from self._loader(epoch)

    def _hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.method, name, None)
        if callable(fn):
            fn(*args)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; the training RNG streams are left exactly as they were."""
        if self.val_set is None:
            return {}
        if self.env.distributed:  # every rank scores the same model: rank 0's BN statistics
            import torch.distributed as dist

            for module in (_eval_model(self.method), self.ema.module if self.ema is not None else None):
                for buf in module.buffers() if module is not None else ():
                    dist.broadcast(buf, 0)
        rng = capture_rng_state()
        try:
            return self._evaluate()
        finally:
            restore_rng_state(rng)

    def _evaluate(self) -> dict[str, float]:
        loader = eval_loader(self.val_set, self.plan.per_device, self.env, self.cfg.workers, self.collate_fn)
        run = self.evaluate_fn or (lambda m, ld: evaluate(m, ld, self.env, self.amp_dtype, self.channels_last))
        metrics = run(_eval_model(self.method), loader)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in run(self.ema.module, loader).items()})
        return metrics

    # ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train (resuming if `trainer.resume` finds a checkpoint) and return the final metrics."""
        cfg = self.cfg
        resume = find_resume(self.run_dir, cfg.resume)
        if resume is not None:
            state = load_checkpoint(resume)  # on CPU: RNG states must stay there
            self._check_compatible(state, resume)
            self.load_state_dict(state)
            if self.env.is_main and resume.parent != self.run_dir:
                claim_resumed(resume.parent, self.run_dir)
            self.logger.info(f"resumed from {resume} at epoch {self.epoch}, step {self.global_step}")
        else:
            seed_everything(cfg.seed + self.env.rank)
        accum = self.plan.accum_steps
        meters: dict[str, float] = {}
        seen = steps_since_log = 0
        t_log = time.time()
        last_metrics: dict[str, float] = dict(self.history[-1]) if self.history else {}
        with StopSignal() as stop:
            while self.epoch < cfg.epochs:
                self._hook("on_epoch_start", self.epoch, cfg.epochs)
                if self.scheduler is not None and not self.per_step_schedule:
                    self.scheduler.step(self.epoch)
                self.method.train()
                bar = progress(range(self.steps_per_epoch - self.micro // accum), desc=f"epoch {self.epoch}",
                               enabled=self.env.is_main, unit="step")
                for batch in self._micro_batches(self.epoch):
                    if self.micro // accum >= self.steps_per_epoch:
                        break
                    first_micro = self.micro % accum == 0
                    if first_micro:
                        self._hook("on_step_start", self.global_step, self.total_steps)
                    images, targets = _to_device(batch, self.env.device, self.channels_last)
                    if self.mixup is not None:
                        images, targets = self.mixup(images, targets)
                    last_micro = (self.micro + 1) % accum == 0
                    sync = contextlib.nullcontext()
                    if self.env.distributed and not last_micro:
                        sync = self.step_module.no_sync()  # type: ignore[operator]
                    with sync:
                        with autocast(self.env.device, self.amp_dtype):
                            _, losses = self.step_module(images, targets)
                        loss = sum(losses.values())
                        if not torch.isfinite(loss):
                            raise UserError(f"the loss became {loss.item()} at step {self.global_step}; "
                                            "lower optim.lr or check the data")
                        self.scaler.scale(loss / accum).backward()
                    for k, v in losses.items():
                        meters[k] = meters.get(k, 0.0) + float(v.detach()) / accum
                    self.micro += 1
                    seen += targets.shape[0]
                    if not last_micro:
                        continue
                    self._optimizer_step()
                    next(bar, None)
                    steps_since_log += 1
                    if self.global_step % cfg.log_every == 0 or self.global_step == self.total_steps:
                        dt = max(time.time() - t_log, 1e-9)
                        record = {k: v / steps_since_log for k, v in meters.items()}
                        record.update(epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"],
                                      samples_per_s=seen * self.env.world_size / dt)
                        self.logger.log(record, step=self.global_step)
                        meters, seen, steps_since_log, t_log = {}, 0, 0, time.time()
                    if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0:
                        self.save()
                    if self._stop_requested(stop):
                        self.save()
                        self.logger.info(f"signal {stop.signum}: saved {self.checkpointer.last}; "
                                         "resume with trainer.resume=auto")
                        raise SystemExit(143)
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                        break
                reached_max = cfg.max_steps is not None and self.global_step >= cfg.max_steps
                if self.micro // accum >= self.steps_per_epoch:  # a finished epoch
                    self.epoch += 1
                    self.micro = 0
                if reached_max or self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    last_metrics = self.evaluate()
                    is_best = self._update_best(last_metrics)
                    self.history.append({"epoch": self.epoch, **last_metrics})
                    self.logger.log({"epoch": self.epoch, **{f"val_{k}": v for k, v in last_metrics.items()}},
                                    step=self.global_step)
                    self.logger.info(f"epoch {self.epoch}/{cfg.epochs} step {self.global_step} " +
                                     " ".join(f"{k}={v:.3f}" for k, v in last_metrics.items()))
                    if is_best:
                        self.checkpointer.save({"model": _eval_model(self.method).state_dict(),
                                                "epoch": self.epoch, "metrics": last_metrics}, "best.pt")
                self.save()
                if reached_max:
                    break
        return self._finish(last_metrics)

    def _update_best(self, metrics: Mapping[str, float]) -> bool:
        """Track the best value of every metric (losses and lower-is-better primaries: the minimum);
        True when the primary metric improved."""
        improved = False
        for k, v in metrics.items():
            lower = "loss" in k or (k == self.primary and not self.primary_higher)
            old = self.best.get(k)
            if old is None or (v < old if lower else v > old):
                self.best[k] = v
                improved |= k == self.primary
        return improved

    def _stop_requested(self, stop: StopSignal) -> bool:
        """SIGTERM seen by any rank stops every rank at the same step (one tiny all-reduce under DDP)."""
        if not self.env.distributed:
            return stop.requested
        import torch.distributed as dist

        flag = torch.tensor([float(stop.requested)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(_eval_model(self.method), step=self.global_step)
        if self.scheduler is not None and self.per_step_schedule:
            self.scheduler.step_update(num_updates=self.global_step)

    def _finish(self, metrics: Mapping[str, float]) -> dict[str, float]:
        self.checkpointer.mark_finished()
        self.logger.close()
        out = dict(metrics)
        out.update({f"best_{k}": v for k, v in self.best.items() if k in metrics})
        out["steps"] = float(self.global_step)
        # 0 when max_steps cut the recipe short: the report keeps such runs out of the paper table
        out["complete"] = float(self.global_step >= self.total_steps)
        return out
