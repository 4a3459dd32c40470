"""Train one step of one pste_bnn row on common's Trainer (spec d.1, d.2).

    python -m pste_bnn.train experiment=imagenet_r18_step1 data.root=/data/imagenet method.teacher=/w/resnet34.pth
    python -m pste_bnn.train experiment=imagenet_r18_sparks_tau5 data.root=/data/imagenet \
        method.teacher=/w/resnet34.pth method.init_checkpoint=outputs/pste_bnn/imagenet_r18_step1/<run>/best.pt
    python -m pste_bnn.train experiment=cifar10_resnet18_step1 profile=smoke          # synthetic data, CPU
    torchrun --nproc_per_node=4 -m pste_bnn.train experiment=imagenet_r18_step1 data.root=...

Step 1 trains real weights with binary activations; step 2 (bnn / snn / fixed / sparks) starts from step 1's
checkpoint (`method.init_checkpoint`, required). The loop is common's; this file adds the hooks of the recipe:
the official epoch-start linear lr decay per parameter group, the Sparks t / gamma schedule before every
step (state in the model's buffers, Gumbel noise seeded by (noise_seed, step): rank-identical and exact on
resume), per-layer selected ids and changes logged every epoch (`selection.jsonl`), and the size / BOPs
accounting plus the deployable export at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from common.checkpoint import atomic_save
from common.config import (
    CLASSIFICATION_OPTIONS,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    as_dict,
    hydra_main,
    refusing_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.dist import DistEnv, cleanup, init_distributed, scale_lr
from common.engine import Hook, Progress, RunInfo, Trainer
from common.errors import UserError
from common.tasks import ClassificationTask

from .accounting import accounting
from .config import MethodConfig, ModelConfig, build_method
from .config import check as check_method
from .data import DataConfig, build_data
from .data import check as check_data
from .method import SubBitDistiller, param_groups
from .sparks import HardBinaryConv

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "pste_bnn"


@dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    logger: LoggerConfig


def parse(cfg: DictConfig) -> RunConfig:
    """Validate every group; a wrong key or value is one line naming it."""
    run = validate_groups(cfg, RunConfig)
    check_data(run.data)
    check_method(run.model, run.method)
    if run.schedule.name != "constant" or run.schedule.warmup_epochs:
        raise UserError(f"config schedule.name={run.schedule.name}: pste_bnn's lr follows the official epoch-start "
                        "linear decay (spec d.1, schedule=official_linear); leave schedule.name=constant")
    if run.model.num_classes != run.data.num_classes:
        raise UserError(f"config model.num_classes={run.model.num_classes} but data.num_classes="
                        f"{run.data.num_classes}; make them equal")
    return run


def optimizer_groups(method: SubBitDistiller, run: RunConfig) -> list[dict[str, Any]]:
    """The official Adam groups of the student (d.1) plus the Sparks X group; each remembers its base lr."""
    lr = scale_lr(run.optim.lr, run.trainer.global_batch, run.optim.base_batch, str(run.optim.lr_scaling))
    groups = param_groups(method.student, lr, run.optim.weight_decay, run.method.selection.lr_x_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


class EpochStartLinearDecay(Hook):
    """lr_g = base_lr_g (1 - (e + 1) / E) for epoch e: LambdaLR(1 - e/E) stepped at each epoch's start (d.1)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_start(self, progress: Progress) -> None:
        factor = 1.0 - (progress.epoch + 1) / progress.epochs
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


class SelectionHooks(Hook):
    """Sparks step 2: the global t / gamma schedule before every step; ids and changes per epoch (b.8, d.2)."""

    def __init__(self, method: SubBitDistiller, out: Path, env: DistEnv) -> None:
        self.method, self.out, self.env = method, out, env
        self.schedule = getattr(method.student, "selection_schedule", None)

    def on_step_start(self, progress: Progress) -> None:
        self.method.on_step_start(progress.step, progress.total_steps)

    def on_epoch_start(self, progress: Progress) -> None:
        self._log(progress.epoch, progress.step)

    def _log(self, epoch: int, step: int) -> dict[str, Any]:
        log = self.method.selection_log()
        if self.env.is_main and log:
            changed = [v["changed"] for v in log.values() if v["changed"] is not None]
            with open(self.out / "selection.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "step": step, "changed_total": sum(changed) if changed else None,
                                    "layers": log}) + "\n")
        return log

    def log_values(self) -> dict[str, float]:
        if self.schedule is None:
            return {}
        return {"sel_t": self.schedule.temperature, "sel_gamma": self.schedule.noise_factor}

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        log = self._log(-1, -1)
        extra["selected_ids"] = {k: v["ids"] for k, v in log.items()}


class SNNRandomPerStep(Hook):
    """SNN step 2: Python's `random` (the official draws of replacement codewords, b.10) reseeded from
    (seed, step) before every step, so every DDP rank replaces duplicates by the same codewords (each rank's
    global stream is seeded seed + rank) and a resumed run draws what an uninterrupted one did."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_step_start(self, progress: Progress) -> None:
        import random

        random.seed(self.seed * 1_000_003 + progress.step)


class AccountAndExport(Hook):
    """After training: size / BOPs of the trained row (b.12) into the record; step 2 writes `export.pt` (b.9)."""

    def __init__(self, method: SubBitDistiller, run: RunConfig, out: Path, env: DistEnv,
                 trainer: Trainer | None = None) -> None:
        self.method, self.run, self.out, self.env, self.trainer = method, run, out, env, trainer

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        if self.trainer is not None and self.trainer.history:  # the reported epoch is the best; the last beside it
            extra["last_epoch_metrics"] = dict(self.trainer.history[-1])
        student, quantizer = self.method.student, self.run.method.quantizer
        tau = 9 if quantizer in ("real", "bnn") else self.run.method.tau
        size = self.run.data.image_size
        counts = accounting(student, tau, size)
        extra["accounting"] = {"tau": tau, "image_size": size, **counts}
        extra["step"] = self.run.method.step
        if quantizer != "real" and self.env.is_main:
            was = student.training
            student.eval()
            layers = {name: conv.export() for name, conv in student.named_modules() if isinstance(conv, HardBinaryConv)}
            student.train(was)
            atomic_save({"layers": layers, "tau": tau, "model": self.run.model.name}, self.out / "export.pt")


def step1_metrics(path: str) -> dict[str, float]:
    """The evaluation metrics stored in our step-1 `best.pt` (empty for an official file)."""
    from common.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(path)
    except UserError:
        return {}
    return {k: float(v) for k, v in (state.get("metrics") or {}).items()} if isinstance(state, dict) else {}


# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    parse, CLASSIFICATION_OPTIONS,
    "the PSTE training steps do not use it")


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    """Train one step of one row; returns the final metrics (also in result.json) and the run directory."""
    r = check_config(cfg)
    env = init_distributed(r.trainer.device)
    out = run_dir(cfg, PAPER, cfg.name)
    torch.manual_seed(r.trainer.seed)  # the random sub-codebooks (snn, fixed) of the model built below
    import random

    random.seed(r.trainer.seed)  # the SNN patterns draw from Python's `random`, as the official code
    train_set, val_set = build_data(r.data)
    method = build_method(cfg)  # step 2: loads method.init_checkpoint (required) and seeds the selection
    if env.is_main:
        save_resolved(cfg, out)
    synthetic = r.data.name.startswith("synthetic")
    info = RunInfo(PAPER, cfg.name, cfg.row, "cifar10" if synthetic else r.data.name, synthetic=synthetic,
                   profile=str(cfg.profile), data_root=r.data.root)
    t = r.trainer
    trainer = Trainer(method, train_set, val_set, t, r.optim, r.schedule, out, env,
                      task=ClassificationTask(num_classes=r.data.num_classes), model=method.student,
                      params=optimizer_groups(method, r), logger_cfg=r.logger, config_dict=as_dict(cfg),
                      run_info=info, checkpoint_meta={"recipe": {"model": r.model.name, "quantizer": r.method.quantizer,
                                                                 "tau": r.method.tau, "step": r.method.step}})
    trainer.hooks += [EpochStartLinearDecay(trainer), SelectionHooks(method, out, env),
                      AccountAndExport(method, r, out, env, trainer)]
    if r.method.quantizer == "snn":
        trainer.hooks.append(SNNRandomPerStep(r.trainer.seed))
    if r.method.step == 2:  # step 2 records where it started and that step's accuracy (d.1)
        trainer.record_extra["step1_checkpoint"] = r.method.init_checkpoint
        trainer.record_extra["step1_metrics"] = step1_metrics(str(r.method.init_checkpoint))
    metrics = trainer.fit()
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
