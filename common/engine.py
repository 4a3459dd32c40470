"""The one training loop every paper runs on.

    Trainer(method, train_set, val_set, trainer_cfg, optim_cfg, schedule_cfg, run_dir, env,
            task=ClassificationTask(), model=net, hooks=[...], run_info=RunInfo(...)).fit()

* `method`: the trained `nn.Module`; the *task* (`common.tasks`) turns a batch into its named losses
  (through `method.forward_train`) and a loader into metrics. The losses are summed as given.
* `model`: the network that is evaluated, averaged (EMA) and saved as `best.pt` (default: `method`;
  a distiller passes its student, a classifier wrapper its network).
* `hooks`: `Hook` objects, the explicit callbacks of a method's own schedules (a temperature per
  step, a loss weight per epoch), extra values to log, and additions to the final record.
* `val_set`: the set the paper reports; `heldout_set` (optional): a split of the training data that
  selects the best epoch without looking at the reported set (`trainer.selection`).

The loop gives AMP (bf16, or fp16 with a scaler), channels_last, gradient accumulation (global batch
-> per-device batch), DDP, gradient clipping, EMA, timm optimizers and per-step timm LR schedules with
warmup, loss meters kept on the device and synced only when logged, "precise BN" before evaluations
(`trainer.precise_bn_batches`), atomic checkpoints with exact resume (model, optimizer, scheduler,
scaler, EMA, RNG states, epoch, step and sampler position), a save-and-exit with code 143 on SIGTERM
agreed by every rank, and the run's `result.json` (`common.results.ResultRecord`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from common.config import LoggerConfig, OptimConfig, ScheduleConfig, Selection, TrainerConfig
from common.dist import DistEnv, ResumableSampler, all_reduce_mean, batch_plan, scale_lr
from common.errors import UserError
from common.logging import RunLogger, progress
from common.results import ResultRecord, command_line_overrides, data_kind, recipe_overrides, write_record
from common.tasks import EvalContext, Losses, Task, autocast, to_device

__all__ = ["EpochSeeded", "Hook", "Progress", "RunInfo", "Trainer", "autocast", "build_optimizer",
           "build_scheduler", "eval_loader", "precise_bn", "resolve_amp", "resolve_channels_last", "to_channels_last",
           "seed_everything"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Progress:
    """Where training stands when a hook is called."""

    epoch: int
    epochs: int
    step: int  # optimizer steps done so far (the global step about to run)
    step_in_epoch: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class Hook:
    """Explicit callbacks of a method (subclass and override what you need; the defaults do nothing).

    State a hook sets that changes the maths must live in the model (a buffer, or
    `get_extra_state`/`set_extra_state`) or be recomputed from `Progress`, so that a resumed run
    continues exactly.
    """

    def on_epoch_start(self, progress: Progress) -> None:
        """Before the first step of every epoch (also of a resumed, partly done one)."""

    def on_step_start(self, progress: Progress) -> None:
        """Before every optimizer step (its first micro-batch)."""

    def on_step_end(self, progress: Progress) -> None:
        """Right after every optimizer step (before logging, checkpointing and evaluation)."""

    def log_values(self) -> dict[str, float]:
        """Extra values logged with the training losses and with every evaluation (a temperature)."""
        return {}

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        """After training, before `result.json` is written: add final metrics or record extras in place."""


@dataclass(frozen=True)
class RunInfo:
    """What the result record says about the run besides its metrics."""

    paper: str
    experiment: str
    row: str | None
    dataset: str
    synthetic: bool
    profile: str
    data_root: str | None = None  # the dataset's folder or file: our synthetic writers' marker there -> synthetic


class _TrainStep(nn.Module):
    """Routes DDP's forward to the task's loss computation."""

    def __init__(self, method: nn.Module, task: Task) -> None:
        super().__init__()
        self.method = method
        self.task = task

    def forward(self, batch: Any) -> Losses:
        return self.task.losses(self.method, batch)


class EpochSeeded(Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index) inside DataLoader workers.

    Random augmentations then do not depend on which worker reads a sample, so a run resumed
    mid-epoch sees the same augmented images as an uninterrupted one. In the main process
    (workers=0) the global RNG, which the checkpoint restores, drives augmentation instead.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

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
    """`trainer.amp` -> the autocast dtype (None: full precision)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_channels_last(flag: str, device: torch.device) -> bool:
    return flag == "on" or (flag == "auto" and device.type == "cuda")


def to_channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D parameter and buffer of ``module`` in channels_last memory, in place; other ranks untouched.

    ``Module.to(memory_format=torch.channels_last)`` raises on any 5-D tensor (a Conv3d weight, KernelWarehouse's
    warehouses), so a model holding one could not train or evaluate with channels_last (the GPU default).
    """
    return module._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


def eval_loader(dataset: Dataset, batch_size: int, env: DistEnv, workers: int = 2,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """A loader that shows every sample exactly once over all ranks (`collate_fn`: e.g. images of several sizes)."""
    sampler = ResumableSampler(len(dataset), env.rank, env.world_size, shuffle=False, pad=False)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=env.device.type == "cuda", collate_fn=collate_fn)


def build_optimizer(params_or_model: Any, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """A timm optimizer with the paper's lr scaled to the global batch."""
    from timm.optim import create_optimizer_v2

    lr = scale_lr(cfg.lr, global_batch, cfg.base_batch, str(cfg.lr_scaling))
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
                    steps_per_epoch: int, total_steps: int | None = None) -> Any | None:
    """A timm LR scheduler driven per optimizer step (or per epoch), with warmup; None for constant.

    `total_steps` (an iteration budget, per-step schedules): the decay spans exactly that many steps
    instead of `epochs * steps_per_epoch` (poly: step i of I uses lr * (1 - i / I)^power).
    """
    from timm.scheduler import create_scheduler_v2

    name = str(cfg.name)
    if total_steps is not None and cfg.per_step:  # count in steps: one "epoch" of one update each
        scale = float(steps_per_epoch)
        cfg = dataclasses.replace(cfg, warmup_epochs=cfg.warmup_epochs * scale, decay_epochs=cfg.decay_epochs * scale,
                                  milestones=[round(m * scale) for m in cfg.milestones])
        epochs, steps_per_epoch = total_steps, 1
    # Milestones mean what torch's MultiStepLR means: the lr drops at the start of epoch m. timm drops
    # when t + 1 >= milestone, one unit early, so each milestone is moved half a unit later.
    half = 0.5 if not cfg.per_step else 0.5 / max(steps_per_epoch, 1)
    milestones = [m + half for m in cfg.milestones] or [30 + half, 60 + half]
    if name == "constant" and cfg.warmup_epochs == 0:
        return None
    sched, _ = create_scheduler_v2(
        optimizer,
        sched="step" if name == "constant" else name,
        num_epochs=epochs,
        decay_epochs=cfg.decay_epochs if name != "constant" else 10**9,
        decay_milestones=milestones,
        decay_rate=cfg.power if name == "poly" else cfg.decay_rate if name != "constant" else 1.0,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=cfg.warmup_prefix,
        cooldown_epochs=0,
        step_on_epochs=not cfg.per_step,
        updates_per_epoch=steps_per_epoch,
    )
    return sched


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterator[Any], num_batches: int, env: DistEnv,
               amp_dtype: torch.dtype | None = None) -> int:
    """Recompute every BatchNorm's running statistics at the model's current state ("precise BN").

    The statistics are reset and re-estimated from `num_batches` batches of model inputs as an exact
    cumulative average (momentum None), in train mode, then averaged over ranks. Returns the number of
    batches used. Running statistics lag behind weights (or a temperature) that move every step; this
    removes the lag before an evaluation.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    try:
        for inputs in batches:
            if used >= num_batches:
                break
            with autocast(env.device, amp_dtype):
                model(inputs)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if env.distributed:
        for m in norms:
            m.running_mean.copy_(all_reduce_mean(m.running_mean))
            m.running_var.copy_(all_reduce_mean(m.running_var))
    return used


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
        *,
        task: Task,
        model: nn.Module | None = None,
        heldout_set: Dataset | None = None,
        hooks: Sequence[Hook] = (),
        params: Any = None,
        clip_params: Iterable[nn.Parameter] | None = None,
        logger: RunLogger | None = None,
        logger_cfg: LoggerConfig | None = None,
        config_dict: Mapping[str, Any] | None = None,
        run_info: RunInfo | None = None,
        checkpoint_meta: Mapping[str, Any] | None = None,
        train_sampler: ResumableSampler | None = None,
    ) -> None:
        self.cfg = trainer
        self.env = env or DistEnv()
        self.run_dir = Path(run_dir)
        self.method = method.to(self.env.device)
        self.model = model if model is not None else self.method
        self.task = task
        self.hooks = list(hooks)
        self.train_set = train_set
        self.val_set = val_set
        self.heldout_set = heldout_set
        self.run_info = run_info
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.record_extra: dict[str, Any] = {}  # anything the paper adds to result.json's `extra`
        if trainer.selection == Selection.best_heldout and heldout_set is None:
            raise UserError("trainer.selection=best_heldout needs a held-out split of the training data "
                            "(or use trainer.selection=last)")
        # best.pt follows the held-out split when there is one, unless the run selects on the test set
        on_heldout = heldout_set is not None and trainer.selection != Selection.best_test
        self.select_key = f"heldout/{task.primary}" if on_heldout else task.primary
        lcfg = logger_cfg or LoggerConfig()
        self.logger = logger or RunLogger(self.run_dir, config_dict, self.env.is_main, str(lcfg.wandb_mode),
                                          lcfg.project, name=self.run_dir.name)
        self.amp_dtype = resolve_amp(trainer.amp, self.env.device)
        self.channels_last = resolve_channels_last(trainer.channels_last, self.env.device)
        if self.channels_last:
            to_channels_last(self.method)

        self.plan = batch_plan(trainer.global_batch, self.env.world_size, trainer.max_device_batch)
        # A paper's own training sampler (e.g. repeated augmentation) keeps ResumableSampler's interface:
        # this rank's indices, __len__ and set_position(epoch, start) for exact resume.
        self.sampler = train_sampler or ResumableSampler(len(train_set), self.env.rank,  # type: ignore[arg-type]
                                                         self.env.world_size, shuffle=True, seed=trainer.seed)
        micro_per_epoch = len(self.sampler) // self.plan.per_device
        self.steps_per_epoch = micro_per_epoch // self.plan.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training set has {len(train_set)} samples, fewer than one global batch of "  # type: ignore[arg-type]
                f"{trainer.global_batch}; lower trainer.global_batch"
            )
        # An iteration budget fixes the number of steps; the epochs follow (the last one may be partial).
        self.epochs = (math.ceil(trainer.iterations / self.steps_per_epoch) if trainer.iterations is not None
                       else trainer.epochs)
        self.total_steps = trainer.iterations or self.steps_per_epoch * self.epochs

        self.optimizer = build_optimizer(params if params is not None else self.method, optim, trainer.global_batch)
        # trainer.clip_grad clips these parameters only (a method that clips one part, e.g. a loss module)
        self.clip_params = list(clip_params) if clip_params is not None else None
        self.scheduler = build_scheduler(self.optimizer, schedule, self.epochs, self.steps_per_epoch,
                                         trainer.iterations)
        self.per_step_schedule = schedule.per_step
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if trainer.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=trainer.ema_decay)

        self.step_module: nn.Module = _TrainStep(self.method, task)
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
        self.best_epoch: int | None = None
        self.history: list[dict[str, float]] = []
        self._meters: dict[str, torch.Tensor] = {}  # summed losses since the last log, on the device
        self._meter_steps = 0

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.checkpoint_meta,
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
            "best_epoch": self.best_epoch,
            "history": list(self.history),
            "trainer": {"global_batch": self.cfg.global_batch, "seed": self.cfg.seed, "epochs": self.epochs},
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
        """A checkpoint continues only the same recipe: refuse one from another global batch or seed.

        (`epochs` may change: a run can be extended or cut.)"""
        saved = state.get("trainer") or {}
        for key in ("global_batch", "seed"):
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
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history") or [])

    def save(self, name: str = "last.pt") -> None:
        self._check_finite()
        self.checkpointer.save(self.state_dict(), name)

    # ----------------------------------------------------------------------------------------------
    def _progress(self) -> Progress:
        return Progress(self.epoch, self.epochs, self.global_step, self.micro // self.plan.accum_steps,
                        self.steps_per_epoch)

    def _loader(self, epoch: int, sampler: ResumableSampler, seed: int) -> DataLoader:
        return DataLoader(
            EpochSeeded(self.train_set, seed, epoch), batch_size=self.plan.per_device, sampler=sampler,
            num_workers=self.cfg.workers, pin_memory=self.env.device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(seed * 7919 + epoch), persistent_workers=False,
        )

    def _micro_batches(self, epoch: int) -> Iterator[Any]:
        self.sampler.set_position(epoch, self.micro * self.plan.per_device)
        yield from self._loader(epoch, self.sampler, self.cfg.seed)

    def _log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for hook in self.hooks:
            out.update(hook.log_values())
        return out

    def _flush_meters(self) -> dict[str, float]:
        """The mean loss per step since the last flush: one device-to-host copy."""
        if not self._meters:
            return {}
        names = list(self._meters)
        values = torch.stack([self._meters[k] for k in names]).float().cpu().tolist()
        steps = max(self._meter_steps, 1)
        self._meters, self._meter_steps = {}, 0
        out = {k: v / steps for k, v in zip(names, values)}
        bad = [k for k, v in out.items() if not np.isfinite(v)]
        if bad:
            raise UserError(f"the loss {bad[0]} became {out[bad[0]]} before step {self.global_step}; "
                            "lower optim.lr or check the data")
        return out

    def _check_finite(self) -> None:
        """Never save weights a non-finite loss has touched (one sync, at save points only)."""
        if self._meters and not bool(torch.isfinite(torch.stack(list(self._meters.values()))).all()):
            self._flush_meters()  # raises, naming the loss

    def _eval_batches(self) -> Iterator[Any]:
        """Training batches (their own order and augmentation draw) as model inputs, for precise BN."""
        sampler = ResumableSampler(len(self.train_set), self.env.rank, self.env.world_size,  # type: ignore[arg-type]
                                   shuffle=True, seed=self.cfg.seed + 7_777_777)
        sampler.set_position(self.epoch, 0)
        for batch in self._loader(self.epoch, sampler, self.cfg.seed + 7_777_777):
            yield self.task.inputs(to_device(batch, self.env.device, self.channels_last))

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out split (`heldout/...`) and on the evaluation set; the training RNG
        streams are left exactly as they were."""
        if self.val_set is None and self.heldout_set is None:
            return {}
        rng = capture_rng_state()
        try:
            if self.cfg.precise_bn_batches:
                precise_bn(self.model, self._eval_batches(), self.cfg.precise_bn_batches, self.env, self.amp_dtype)
            if self.env.distributed:  # every rank scores the same model: rank 0's BN statistics
                import torch.distributed as dist

                for module in (self.model, self.ema.module if self.ema is not None else None):
                    for buf in module.buffers() if module is not None else ():
                        dist.broadcast(buf, 0)
            metrics: dict[str, float] = {}
            if self.heldout_set is not None:
                metrics.update({f"heldout/{k}": v for k, v in self._score(self.heldout_set).items()})
            if self.val_set is not None:
                metrics.update(self._score(self.val_set))
            return metrics
        finally:
            restore_rng_state(rng)

    def _score(self, dataset: Dataset) -> dict[str, float]:
        loader = eval_loader(dataset, self.cfg.eval_batch or self.plan.per_device, self.env, self.cfg.workers,
                             getattr(self.task, "collate", None))
        ctx = EvalContext(self.env, self.amp_dtype, self.channels_last)
        metrics = self.task.evaluate(self.model, loader, ctx)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, loader, ctx).items()})
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
            seed_everything(cfg.seed + self.env.rank, cfg.deterministic)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        accum = self.plan.accum_steps
        micro_since_log = 0
        t_log = time.time()
        last_metrics: dict[str, float] = dict(self.history[-1]) if self.history else {}
        last_metrics.pop("epoch", None)
        stopped = budget_done = False
        evaluated_at = -1  # the step of the last evaluation
        with StopSignal() as stop:
            while self.epoch < self.epochs:
                for hook in self.hooks:
                    hook.on_epoch_start(self._progress())
                if self.scheduler is not None and not self.per_step_schedule:
                    self.scheduler.step(self.epoch)
                self.method.train()
                bar = progress(range(self.steps_per_epoch - self.micro // accum), desc=f"epoch {self.epoch}",
                               enabled=self.env.is_main, unit="step")
                for batch in self._micro_batches(self.epoch):
                    if self.micro // accum >= self.steps_per_epoch:
                        break
                    if self.micro % accum == 0:
                        for hook in self.hooks:
                            hook.on_step_start(self._progress())
                    batch = to_device(batch, self.env.device, self.channels_last)
                    last_micro = (self.micro + 1) % accum == 0
                    sync = contextlib.nullcontext()
                    if self.env.distributed and not last_micro:
                        sync = self.step_module.no_sync()  # type: ignore[operator]
                    with sync:
                        with autocast(self.env.device, self.amp_dtype):
                            losses = self.step_module(batch)
                        loss = sum(losses.values())
                        self.scaler.scale(loss / accum).backward()  # type: ignore[union-attr]
                    for k, v in losses.items():  # summed on the device; synced only when logged
                        v = v.detach().float() / accum
                        self._meters[k] = self._meters[k] + v if k in self._meters else v
                    self.micro += 1
                    micro_since_log += 1
                    if not last_micro:
                        continue
                    self._optimizer_step()
                    for hook in self.hooks:
                        hook.on_step_end(self._progress())
                    self._meter_steps += 1
                    next(bar, None)
                    if self.global_step % cfg.log_every == 0 or self.global_step == self.total_steps:
                        dt = max(time.time() - t_log, 1e-9)
                        record: dict[str, Any] = self._flush_meters()
                        record.update(epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"],
                                      samples_per_s=micro_since_log * self.plan.per_device * self.env.world_size / dt,
                                      **self._log_values())
                        self.logger.log(record, step=self.global_step)
                        micro_since_log, t_log = 0, time.time()
                    if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0:
                        self.save()
                    if self._stop_requested(stop):
                        self.save()
                        self.logger.info(f"signal {stop.signum or 'SIGTERM'}: saved {self.checkpointer.last}; "
                                         "resume with trainer.resume=auto")
                        self.logger.close()
                        raise SystemExit(143)
                    budget_done = self.global_step >= self.total_steps
                    if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0 and not budget_done:
                        last_metrics, evaluated_at = self._evaluate_and_select(), self.global_step
                        self.method.train()
                    if budget_done:
                        break
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                        stopped = True
                        break
                if self.micro // accum >= self.steps_per_epoch:  # a finished epoch
                    self.epoch += 1
                    self.micro = 0
                final = stopped or budget_done or self.epoch == self.epochs
                if cfg.eval_every_steps:
                    due = final and evaluated_at != self.global_step
                else:
                    due = final or self.epoch % cfg.eval_every == 0
                if due:
                    last_metrics = self._evaluate_and_select()
                self.save()
                if stopped or budget_done:
                    break
        return self._finish(last_metrics, complete=not stopped and self.global_step >= self.total_steps)

    def _evaluate_and_select(self) -> dict[str, float]:
        metrics = self.evaluate()
        if not metrics:
            return metrics
        is_best = self._update_best(metrics)
        self.history.append({"epoch": self.epoch, **metrics})
        logged = {f"val/{k}" if "/" not in k else k: v for k, v in metrics.items()}
        self.logger.log({"epoch": self.epoch, **logged, **self._log_values()}, step=self.global_step)
        self.logger.info(f"epoch {self.epoch}/{self.epochs} step {self.global_step} " +
                         " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.count("/") <= 1))
        if is_best:
            self.best_epoch = self.epoch
            self.checkpointer.save({**self.checkpoint_meta, "model": self.model.state_dict(), "epoch": self.epoch,
                                    "metrics": metrics}, "best.pt")
        return metrics

    def _lower_is_better(self, key: str) -> bool:
        return "loss" in key or not self.task.higher_is_better

    def _update_best(self, metrics: Mapping[str, float]) -> bool:
        """Track the best value of every metric; True when the selecting metric improved."""
        improved = False
        for k, v in metrics.items():
            old = self.best.get(k)
            if old is None or (v < old if self._lower_is_better(k) else v > old):
                self.best[k] = v
                improved |= k == self.select_key
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
            params = self.clip_params
            if params is None:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        if self.scheduler is not None and self.per_step_schedule:
            self.scheduler.step_update(num_updates=self.global_step)

    # ----------------------------------------------------------------------------------------------
    def _selected_metrics(self, last: Mapping[str, float]) -> dict[str, float]:
        """The reported metrics under `trainer.selection`: the last evaluation, or the evaluation set
        scored with the weights of the selected epoch (best.pt)."""
        if self.cfg.selection == Selection.last or self.val_set is None:
            return {k: v for k, v in last.items() if not k.startswith("heldout/")}
        from common.dist import barrier

        barrier()  # rank 0 wrote best.pt
        best = self.run_dir / "best.pt"
        if not best.is_file():
            return {k: v for k, v in last.items() if not k.startswith("heldout/")}
        self.model.load_state_dict(load_checkpoint(best)["model"])
        return self._score(self.val_set)

    def _finish(self, last: Mapping[str, float], complete: bool) -> dict[str, float]:
        out = self._selected_metrics(last)
        if self.cfg.selection == Selection.last:  # the best epoch beside the last one (selected weights: itself)
            out.update({f"best_{k}": v for k, v in self.best.items() if k in out})
        out["steps"] = float(self.global_step)
        extra: dict[str, Any] = dict(self.record_extra)
        overrides = command_line_overrides()
        if overrides:
            extra["overrides"] = overrides
            changed = recipe_overrides(overrides)
            if changed:  # not the experiment's recipe: never counted as a reproduction
                extra["recipe_overrides"] = changed
        if self.best_epoch is not None:
            extra["best_epoch"] = self.best_epoch
        for hook in self.hooks:
            hook.on_fit_end(out, extra)
        self.checkpointer.mark_finished()
        if self.run_info is not None and self.env.is_main:
            info = self.run_info
            synthetic = info.synthetic or data_kind(info.dataset, info.data_root) == "synthetic"
            record = ResultRecord(paper=info.paper, experiment=info.experiment, row=info.row, kind="trained",
                                  metrics=out, dataset=info.dataset, data="synthetic" if synthetic else "real",
                                  checkpoint="ours", complete=complete, selection=str(self.cfg.selection),  # type: ignore[arg-type]
                                  profile=info.profile, seed=self.cfg.seed,  # type: ignore[arg-type]
                                  checkpoint_path=str(self.run_dir / "last.pt"), extra=extra)
            path = write_record(self.run_dir, record)
            self.logger.info(f"result: {path}  " + " ".join(f"{k}={v:.3f}" for k, v in out.items() if "/" not in k))
        self.logger.close()
        return out
