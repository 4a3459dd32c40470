"""Train a lifting network on Human3.6M (or synthetic poses) and evaluate it with the official protocol.

    python -m gridconv.train experiment=gt_dgridconv_learnable data.root=/data/h36m
    python -m gridconv.train experiment=gt_dgridconv_handcrafted profile=smoke      # synthetic, CPU minutes
    torchrun --nproc_per_node=4 -m gridconv.train experiment=... data.root=...        # same global batch 200

Regression, not classification: the loop is small and lives here, on common's pieces (checkpoint,
logging, dist, config, report). Every epoch: the kernel-attention temperature follows the official
schedule per iteration, the learning rate the stepped decay, then the held-out split (checkpoint
selection), and the test split are evaluated; ``last.pt`` is saved atomically (and on SIGTERM) and
``resume=auto`` continues mid-epoch exactly.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.checkpoint import (
    Checkpointer,
    StopSignal,
    capture_rng_state,
    claim_resumed,
    find_resume,
    load_checkpoint,
    restore_rng_state,
)
from common.config import LoggerConfig, check_choice, hydra_main, run_dir, save_resolved, validate
from common.dist import ResumableSampler, all_reduce_mean, batch_plan, cleanup, init_distributed
from common.errors import UserError
from common.logging import RunLogger
from common.metrics import AverageMeter
from common.report import write_result

from .data import PoseSet, hold_out, read_h36m
from .gridconv import annealed_temperature
from .metrics import pck_auc, protocol_metrics
from .models import ARCHS, build_model

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "gridconv"


# ----------------------------------------------------------------------------------------------------
# Config schemas (validated at start-up: an unknown key or a wrong type is one line naming the key)
# ----------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: str = "dgridconv"
    hidden_size: int = 256
    num_blocks: int = 2
    grid_shape: list[int] = field(default_factory=lambda: [5, 5])
    padding_mode: list[str] = field(default_factory=lambda: ["c", "r"])
    sgt: str = "handcrafted"
    sgt_prior: str = "standard"
    sgt_mode: str = "frozen"
    gumbel_tau: float = 1.0
    loss_space: str | None = None
    dropout: float = 0.25


@dataclass
class DataConfig:
    name: str = "h36m"
    root: str | None = None
    input: str = "gt"
    exclude_drift: bool | None = None
    heldout_fraction: float = 0.05
    train_frames: int = 34
    test_frames: int = 13
    noise_px: float = 3.0


@dataclass
class MethodConfig:
    max_temperature: float = 30.0
    anneal_epochs: float = 10.0


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    gamma: float = 0.96
    decay_every: int = 10


@dataclass
class TrainConfig:
    epochs: int = 100
    global_batch: int = 200
    eval_batch: int = 1000
    max_steps: int | None = None
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"
    resume: str = "auto"
    selection: str = "heldout"
    ckpt_every_steps: int = 0
    log_every: int = 100


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainConfig
    logger: LoggerConfig


def validate_config(cfg: DictConfig) -> Config:
    c = Config(model=validate(cfg.model, ModelConfig, "model."), data=validate(cfg.data, DataConfig, "data."),
               method=validate(cfg.method, MethodConfig, "method."),
               optim=validate(cfg.optim, OptimConfig, "optim."),
               schedule=validate(cfg.schedule, ScheduleConfig, "schedule."),
               train=validate(cfg.train, TrainConfig, "train."),
               logger=validate(cfg.logger, LoggerConfig, "logger."))
    check_choice("model.arch", c.model.arch, ARCHS)
    check_choice("model.sgt", c.model.sgt, ("handcrafted", "learnable"))
    check_choice("model.sgt_mode", c.model.sgt_mode, ("frozen", "ste", "gumbel"))
    check_choice("model.loss_space", c.model.loss_space, (None, "grid", "joints"))
    check_choice("data.name", c.data.name, ("h36m", "synthetic", "mpi3dhp"))
    check_choice("optim.name", c.optim.name, ("adam",))
    check_choice("train.selection", c.train.selection, ("heldout", "test", "last"))
    check_choice("train.amp", c.train.amp, ("auto", "bf16", "off"))
    if len(c.model.padding_mode) != 2 or any(m not in ("c", "z", "r") for m in c.model.padding_mode):
        raise UserError(f"config model.padding_mode={c.model.padding_mode}: two of c (circular), z (zeros), "
                        "r (replicate)")
    for key, value in (("train.epochs", c.train.epochs), ("train.global_batch", c.train.global_batch),
                       ("model.hidden_size", c.model.hidden_size)):
        if value <= 0:
            raise UserError(f"config {key}={value}: must be positive")
    if not 0 <= c.data.heldout_fraction < 1:
        raise UserError(f"config data.heldout_fraction={c.data.heldout_fraction}: must be in [0, 1)")
    return c


def model_kwargs(m: ModelConfig) -> dict[str, Any]:
    kwargs = dict(vars(m))
    kwargs["grid_shape"] = tuple(m.grid_shape)
    kwargs["padding_mode"] = tuple(m.padding_mode)
    return kwargs


# ----------------------------------------------------------------------------------------------------
# Data, schedule, evaluation
# ----------------------------------------------------------------------------------------------------
def load_splits(d: DataConfig, seed: int) -> dict[str, PoseSet]:
    """train / heldout / test splits (the held-out sequences come from the training subjects)."""
    if d.name == "mpi3dhp":
        raise UserError("data=mpi3dhp is a test set only: train on Human3.6M and evaluate with gridconv.eval")
    if d.root is None:
        raise UserError("data.root is not set: pass data.root=<Human3.6M folder> (spec section f) or use "
                        "profile=smoke for synthetic data")
    if d.name == "synthetic":
        from .synthetic import write_synthetic_h36m

        root = Path(d.root)
        if not (root / d.input / "test_custom_3d_unnorm.pth.tar").is_file():
            write_synthetic_h36m(root, d.train_frames, d.test_frames, seed=0, noise_px=d.noise_px)
    train = read_h36m(d.root, "train", d.input)
    train, heldout = hold_out(train, d.heldout_fraction, seed=0)
    return {"train": train, "heldout": heldout, "test": read_h36m(d.root, "test", d.input, d.exclude_drift)}


def lr_at_epoch(epoch: int, base_lr: float, gamma: float, decay_every: int) -> float:
    """Official stepped decay: x gamma after epoch e whenever e % decay_every == 0 (e = 0, 10, 20, ...)."""
    return base_lr * gamma ** math.ceil(epoch / decay_every)


def autocast(device: torch.device, amp: str) -> Any:
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(model: nn.Module, poses: PoseSet, batch: int, device: torch.device,
            amp: str = "off") -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(poses), batch):
        with autocast(device, amp):
            out.append(model(poses.pose2d[start:start + batch].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, poses.pose2d.shape[1], 3)


def evaluate(model: nn.Module, poses: PoseSet, batch: int, device: torch.device, amp: str = "off",
             dataset: str = "h36m") -> dict[str, float]:
    """Protocol #1 / #2 (action-wise, mm) and per-axis errors; PCK/AUC per scene for MPI-INF-3DHP."""
    if len(poses) == 0:
        return {}
    pred = predict(model, poses, batch, device, amp)
    if dataset == "mpi3dhp":
        return pck_auc(pred.double() * 1000, poses.pose3d.double() * 1000, poses.actions)
    return protocol_metrics(pred, poses.pose3d, poses.actions)


class TrainStep(nn.Module):
    """The training objective as a module (so that DDP wraps the call that computes the loss)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pose2d: torch.Tensor, pose3d: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(pose2d, pose3d)[1]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def run(cfg: DictConfig, out: Path | None = None) -> dict[str, float]:
    """Train and evaluate one configuration; returns the final test metrics (also in result.json)."""
    c = validate_config(cfg)
    env = init_distributed(c.train.device)
    out = out or run_dir(cfg, PAPER, cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    seed_everything(c.train.seed + env.rank, c.train.deterministic)
    splits = load_splits(c.data, c.train.seed)
    core = build_model(model_kwargs(c.model)).to(env.device)
    objective: nn.Module = TrainStep(core)
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    optimizer = torch.optim.Adam(core.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay)
    plan = batch_plan(c.train.global_batch, env.world_size)
    train = splits["train"]
    sampler = ResumableSampler(len(train), env.rank, env.world_size, shuffle=True, seed=c.train.seed)
    steps_per_epoch = math.ceil(len(sampler) / plan.per_device)
    logger = RunLogger(out, OmegaConf.to_container(cfg, resolve=True), env.is_main, c.logger.wandb_mode,
                       c.logger.project, name=str(cfg.name))
    ckpt = Checkpointer(out, enabled=env.is_main)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None}
    resume = find_resume(out, c.train.resume)
    recipe = {"seed": c.train.seed, "global_batch": c.train.global_batch}  # epochs may grow: the decay is per epoch
    if resume is not None:
        saved = load_checkpoint(resume)
        for key, value in (saved.get("recipe") or {}).items():
            if recipe.get(key) != value:
                raise UserError(f"{resume} was written with train.{key}={value}, this run has {recipe.get(key)}; "
                                "resume with the same value or set train.resume=none")
        if env.is_main and resume.parent != out:
            claim_resumed(resume.parent, out)
        core.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        restore_rng_state(saved["rng"])
        logger.info(f"resumed from {resume} at epoch {state['epoch']} step {state['step_in_epoch']}")

    def snapshot() -> dict[str, Any]:
        return {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": dict(state),
                "rng": capture_rng_state(), "model_config": model_kwargs(c.model), "recipe": recipe}

    selection_split = {"heldout": "heldout", "test": "test", "last": None}[c.train.selection]
    if selection_split == "heldout" and len(splits["heldout"]) == 0:
        raise UserError("train.selection=heldout needs data.heldout_fraction > 0 (or use selection=last)")
    stopped = False
    with StopSignal() as stop:
        while state["epoch"] < c.train.epochs and not stopped:
            epoch = state["epoch"]
            lr = lr_at_epoch(epoch, c.optim.lr, c.schedule.gamma, c.schedule.decay_every)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sampler.set_position(epoch, state["step_in_epoch"] * plan.per_device)
            order = torch.tensor(list(iter(sampler)), dtype=torch.long)
            loss_meter, t0 = AverageMeter("loss"), time.time()
            objective.train()
            for idx in order.split(plan.per_device):
                if len(idx) < 2:  # BatchNorm needs two samples; only a 1-sample tail batch is dropped
                    continue
                step = state["step_in_epoch"]
                temperature = annealed_temperature(epoch, step, steps_per_epoch, c.method.anneal_epochs,
                                                   c.method.max_temperature)
                core.set_temperature(temperature)
                x, y = train.pose2d[idx].to(env.device), train.pose3d[idx].to(env.device)
                with autocast(env.device, c.train.amp):
                    losses = objective(x, y)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_meter.update(loss.detach(), len(idx))
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                if env.is_main and state["global_step"] % c.train.log_every == 0:
                    logger.log({"epoch": epoch, "step": state["global_step"], "loss": loss_meter.avg,
                                "lr": lr, "temperature": temperature}, step=state["global_step"])
                if c.train.ckpt_every_steps and state["global_step"] % c.train.ckpt_every_steps == 0:
                    ckpt.save(snapshot())
                if stop.requested or (c.train.max_steps and state["global_step"] >= c.train.max_steps):
                    stopped = True
                    break
            if stopped and state["step_in_epoch"] < steps_per_epoch:
                ckpt.save(snapshot())  # mid-epoch: resume=auto continues from this exact step
                reason = "SIGTERM" if stop.requested else f"train.max_steps={c.train.max_steps}"
                logger.info(f"stopped at epoch {epoch} step {state['step_in_epoch']} ({reason}); "
                            f"saved {ckpt.last}")
                break
            # End of epoch: evaluate, select, save.
            train_loss = all_reduce_mean(torch.tensor(loss_meter.avg, device=env.device)).item()
            record = {"epoch": epoch, "lr": lr, "temperature": core.temperature, "train_loss": train_loss,
                      "epoch_time_s": time.time() - t0}
            if env.is_main:
                for split in ("heldout", "test"):
                    metrics = evaluate(core, splits[split], c.train.eval_batch, env.device, c.train.amp)
                    record |= {f"{split}/{k}": v for k, v in metrics.items() if "/" not in k}
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            score = record.get(f"{selection_split}/mpjpe") if selection_split else None
            improved = score is not None and (state["best"] is None or score < state["best"])
            if improved:
                state["best"], state["best_epoch"] = score, epoch
                ckpt.save(snapshot(), "best.pt")
            record |= {"best_epoch": state["best_epoch"], "selection": c.train.selection}
            if env.is_main:
                logger.log(record, step=state["global_step"])
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items()))
            ckpt.save(snapshot())
    if stopped and state["epoch"] < c.train.epochs:
        logger.close()
        cleanup()
        return {}
    # Final numbers: the selected checkpoint (or the last epoch) on the test split.
    if selection_split and (out / "best.pt").is_file():
        core.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    final: dict[str, float] = {}
    if env.is_main:
        final = evaluate(core, splits["test"], c.train.eval_batch, env.device, c.train.amp)
        summary = {k: v for k, v in final.items() if "/" not in k}
        write_result(out, PAPER, str(cfg.name), cfg.get("row"), str(cfg.get("profile", "full")), summary,
                     seed=c.train.seed, selection=c.train.selection, best_epoch=state["best_epoch"],
                     per_action_mpjpe={k[6:]: v for k, v in final.items() if k.startswith("mpjpe/")},
                     test_selected=c.train.selection == "test")
        logger.info(f"result: {out / 'result.json'}  " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    logger.close()
    cleanup()
    return final


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
