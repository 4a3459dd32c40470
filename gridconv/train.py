"""Train a lifting network on Human3.6M (or synthetic poses) and evaluate it with the official protocol.

    python -m gridconv.train experiment=gt_dgridconv_learnable data.root=/data/h36m
    python -m gridconv.train experiment=gt_dgridconv_handcrafted profile=smoke      # synthetic, CPU minutes
    torchrun --nproc_per_node=4 -m gridconv.train experiment=... data.root=...        # same global batch 200

Runs on the common loop (`common.engine.Trainer`) with a regression task: the kernel-attention
temperature follows the official schedule per iteration (a `Hook`; the temperature is a buffer, saved
with the weights), the learning rate the stepped decay (`schedule.milestones`); every epoch the held-out
split (checkpoint selection, `trainer.selection`) and the test split are evaluated; the reported numbers
are the test split scored with the selected weights.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.config import (
    CLASSIFICATION_OPTIONS,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    Selection,
    TrainerConfig,
    check_choice,
    hydra_main,
    refusing_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.dist import cleanup, init_distributed
from common.engine import Hook, Progress, RunInfo, Trainer
from common.errors import UserError
from common.tasks import RegressionTask

from .data import PoseSet, hold_out, read_h36m
from .gridconv import annealed_temperature
from .metrics import pck_auc, protocol_metrics
from .models import ARCHS, build_model

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "gridconv"


# ----------------------------------------------------------------------------------------------------
# The paper's own config schemas (trainer / optim / schedule / logger are common's)
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
class Config:
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    trainer: TrainerConfig
    logger: LoggerConfig


def validate_config(cfg: DictConfig) -> Config:
    c = validate_groups(cfg, Config)
    check_choice("model.arch", c.model.arch, ARCHS)
    check_choice("model.sgt", c.model.sgt, ("handcrafted", "learnable"))
    check_choice("model.sgt_mode", c.model.sgt_mode, ("frozen", "ste", "gumbel"))
    check_choice("model.loss_space", c.model.loss_space, (None, "grid", "joints"))
    check_choice("data.name", c.data.name, ("h36m", "synthetic", "mpi3dhp"))
    check_choice("optim.name", c.optim.name, ("adam",))
    if len(c.model.padding_mode) != 2 or any(m not in ("c", "z", "r") for m in c.model.padding_mode):
        raise UserError(f"config model.padding_mode={c.model.padding_mode}: two of c (circular), z (zeros), "
                        "r (replicate)")
    if c.model.hidden_size <= 0:
        raise UserError(f"config model.hidden_size={c.model.hidden_size}: must be positive")
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


class PoseDataset(Dataset):
    """A `PoseSet` as (2D pose, 3D pose) samples for the common loop."""

    def __init__(self, poses: PoseSet) -> None:
        self.poses = poses

    def __len__(self) -> int:
        return len(self.poses)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.poses.pose2d[i], self.poses.pose3d[i]


def score(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor, dataset: Dataset) -> dict[str, float]:
    """Protocol #1 / #2 (action-wise, mm) and per-axis errors of predictions for `dataset[index]`."""
    actions = dataset.poses.actions  # type: ignore[attr-defined]
    return protocol_metrics(pred, target, [actions[i] for i in index.tolist()])


def lr_at_epoch(epoch: int, base_lr: float, gamma: float, decay_every: int) -> float:
    """Official stepped decay: x gamma after epoch e whenever e % decay_every == 0 (e = 0, 10, 20, ...).

    The reference the `schedule.milestones` of configs/schedule/step_decay.yaml are checked against."""
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


class AnnealTemperature(Hook):
    """The kernel-attention temperature, 30 -> 1 over the first `anneal_epochs`, per iteration (Sec. 4.1)."""

    def __init__(self, model: nn.Module, anneal_epochs: float, max_temperature: float) -> None:
        self.model, self.anneal_epochs, self.max_temperature = model, anneal_epochs, max_temperature

    def on_step_start(self, progress: Progress) -> None:
        self.model.set_temperature(annealed_temperature(progress.epoch, progress.step_in_epoch,
                                                        progress.steps_per_epoch, self.anneal_epochs,
                                                        self.max_temperature))

    def log_values(self) -> dict[str, float]:
        t = self.model.temperature
        return {} if t is None else {"temperature": t}


class ActionWiseRecord(Hook):
    """result.json keeps the summary numbers as metrics and the per-action MPJPE apart."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        extra["per_action_mpjpe"] = {k[6:]: metrics.pop(k) for k in list(metrics) if k.startswith("mpjpe/")}
        extra["test_selected"] = self.selection == Selection.best_test


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    validate_config, CLASSIFICATION_OPTIONS,
    "GridConv's pose regression does not use it")


def run(cfg: DictConfig, out: Path | None = None) -> dict[str, float]:
    """Train and evaluate one configuration; returns the final test metrics (also in result.json)."""
    c = check_config(cfg)
    env = init_distributed(c.trainer.device)
    out = out or run_dir(cfg, PAPER, cfg.name)
    splits = load_splits(c.data, c.trainer.seed)
    if c.trainer.selection == Selection.best_heldout and len(splits["heldout"]) == 0:
        raise UserError("trainer.selection=best_heldout needs data.heldout_fraction > 0 (or use selection=last)")
    if env.is_main:
        save_resolved(cfg, out)
    torch.manual_seed(c.trainer.seed)
    core = build_model(model_kwargs(c.model))
    info = RunInfo(PAPER, str(cfg.name), cfg.get("row"), "human36m", synthetic=c.data.name == "synthetic",
                   profile=str(cfg.get("profile", "full")), data_root=c.data.root)
    heldout = PoseDataset(splits["heldout"]) if len(splits["heldout"]) else None
    trainer = Trainer(core, PoseDataset(splits["train"]), PoseDataset(splits["test"]), c.trainer, c.optim, c.schedule,
                      out, env, task=RegressionTask(score), heldout_set=heldout,
                      hooks=[AnnealTemperature(core, c.method.anneal_epochs, c.method.max_temperature),
                             ActionWiseRecord(c.trainer.selection)],
                      logger_cfg=c.logger, config_dict=OmegaConf.to_container(cfg, resolve=True), run_info=info,
                      checkpoint_meta={"model_config": model_kwargs(c.model)})
    metrics = trainer.fit()
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
