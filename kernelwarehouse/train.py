"""Train one table row: ``python -m kernelwarehouse.train experiment=<row> [profile=smoke] [data.root=...]``.

Single process by default; ``torchrun --nproc_per_node=N -m kernelwarehouse.train ...`` for DDP (the global
batch stays the row's; per-device batch and gradient accumulation are derived). CPU works too
(``trainer.device=cpu``). A run resumes from its last checkpoint with ``trainer.resume=auto`` (the default)
when pointed at the same ``hydra.run.dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.config import (
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    check_choice,
    hydra_main,
    run_dir,
    save_resolved,
    validate,
)
from common.data import ImageFolder, build_transforms, write_synthetic_imagefolder
from common.dist import cleanup, init_distributed
from common.engine import Hook, Progress, RunInfo, Trainer
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier, EvalContext
from kernelwarehouse.models import create_model, param_groups, set_temperature, warehouse_manager
from kernelwarehouse.warehouse import temperature_at

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "kernelwarehouse"


@dataclass
class ModelConfig:
    name: str
    drop_path: float = 0.0
    drop_rate: float = 0.0
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str
    root: str | None
    num_classes: int = 1000
    image_size: int = 224
    train_per_class: int = 48
    val_per_class: int = 16
    train_aug: dict[str, Any] = field(default_factory=dict)
    eval_aug: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    temp_epoch: float = 20.0
    temp_init: float = 1.0
    impl: str = "auto"


class TemperatureSchedule(Hook):
    """The attention temperature schedule (spec §b.9), before every optimizer step.

    ``tau = max(0, T0 (T - it) / T)`` with ``T = temp_epoch x steps/epoch`` in absolute epochs of the run;
    tau lives in the warehouse manager's buffer, so it is checkpointed with the model. Plain baselines
    have no manager and ignore the schedule.
    """

    def __init__(self, model: nn.Module, temp_epoch: float, temp_init: float) -> None:
        self.model, self.temp_epoch, self.temp_init = model, temp_epoch, temp_init

    def on_step_start(self, progress: Progress) -> None:
        set_temperature(self.model, temperature_at(0, progress.step, progress.steps_per_epoch, self.temp_epoch,
                                                   self.temp_init))

    def log_values(self) -> dict[str, float]:
        manager = warehouse_manager(self.model)
        return {} if manager is None else {"tau": float(manager.temperature)}


class KWClassificationTask(ClassificationTask):
    """Validation as in the official engine: the live model at its current tau, an EMA copy at tau = 0."""

    def __init__(self, live: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live = live

    def evaluate(self, model: nn.Module, loader: Any, ctx: EvalContext) -> dict[str, float]:
        if model is not self.live:
            set_temperature(model, 0.0)
        return super().evaluate(model, loader, ctx)


def build_model(model_cfg: ModelConfig, data: DataConfig, method: MethodConfig) -> nn.Module:
    check_choice("method.impl", method.impl, ("auto", "grouped"))
    kwargs: dict[str, Any] = dict(model_cfg.kw)
    if "deit" in model_cfg.name:
        kwargs["img_size"] = data.image_size
    try:
        model = create_model(model_cfg.name, data.num_classes, model_cfg.drop_path, model_cfg.drop_rate, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"config model: {err}") from None
    manager = warehouse_manager(model)
    if manager is not None:
        manager.impl = method.impl
    return model


def build_data(cfg: DataConfig, train: bool = True) -> tuple[Any, Any]:
    """(train set, val set): ImageNet class folders, or synthetic ones written in the same format."""
    check_choice("data.name", cfg.name, ("imagenet", "synthetic"))
    if cfg.name == "synthetic":
        write_synthetic_imagefolder(cfg.root, cfg.num_classes, cfg.train_per_class, cfg.val_per_class,
                                    image_size=max(cfg.image_size, 32), seed=0)
    elif not cfg.root:
        raise UserError("data.root is not set: pass data.root=/path/to/imagenet (holding train/<wnid>/*.JPEG and "
                        "val/<wnid>/*.JPEG, spec section f), or profile=smoke for synthetic data")
    try:
        train_tf = build_transforms("imagenet", True, cfg.image_size, **cfg.train_aug)
        val_tf = build_transforms("imagenet", False, cfg.image_size, **cfg.eval_aug)
    except TypeError as err:
        raise UserError(f"config data.train_aug/eval_aug: {err}") from None
    train_set = ImageFolder(cfg.root, "train", train_tf) if train else None
    val_set = ImageFolder(cfg.root, "val", val_tf)
    if len(val_set.classes) != cfg.num_classes:
        raise UserError(f"{cfg.root}/val has {len(val_set.classes)} class folders but data.num_classes="
                        f"{cfg.num_classes}; fix data.root or data.num_classes")
    return train_set, val_set


def check_groups(cfg: DictConfig) -> None:
    """The paper's own groups typed and checked (one line naming a wrong key or value), before anything is written
    (`hydra_main(check=...)`; the shared groups are checked while composing)."""
    validate(cfg.model, ModelConfig, "model.")
    validate(cfg.data, DataConfig, "data.")
    validate(cfg.method, MethodConfig, "method.")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one configuration; returns the final metrics (also written to result.json)."""
    model_cfg = validate(cfg.model, ModelConfig, "model.")
    data = validate(cfg.data, DataConfig, "data.")
    method = validate(cfg.method, MethodConfig, "method.")
    trainer_cfg = validate(cfg.trainer, TrainerConfig, "trainer.")
    optim = validate(cfg.optim, OptimConfig, "optim.")
    schedule = validate(cfg.schedule, ScheduleConfig, "schedule.")
    logger_cfg = validate(cfg.logger, LoggerConfig, "logger.")
    env = init_distributed(trainer_cfg.device)
    out = run_dir(cfg, PAPER, cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    torch.manual_seed(trainer_cfg.seed)
    train_set, val_set = build_data(data)
    model = build_model(model_cfg, data, method)
    manager = warehouse_manager(model)
    if manager is not None and env.is_main:
        print("warehouses: " + "; ".join(f"{w['name']} {w['shape']} x{w['num_layers']} b={w['budget']:g}"
                                         for w in manager.summary()))
    task = KWClassificationTask(model, trainer_cfg.mixup, trainer_cfg.cutmix, trainer_cfg.label_smoothing,
                                data.num_classes)
    info = RunInfo(PAPER, cfg.name, cfg.row, "imagenet", synthetic=data.name == "synthetic", profile=cfg.profile,
                   data_root=data.root)
    trainer = Trainer(Classifier(model, trainer_cfg.label_smoothing), train_set, val_set, trainer_cfg, optim,
                      schedule, out, env, task=task, model=model,
                      hooks=[TemperatureSchedule(model, method.temp_epoch, method.temp_init)],
                      logger_cfg=logger_cfg, params=param_groups(model, optim.weight_decay),
                      config_dict=OmegaConf.to_container(cfg, resolve=True), run_info=info)
    if manager is not None and manager.norm == "bn" and trainer.plan.per_device < 2:
        raise UserError(f"the per-device batch is {trainer.plan.per_device}: the KW attention BatchNorm needs >= 2 "
                        "samples; raise trainer.max_device_batch / global_batch or use model.kw.norm=ln")
    metrics = trainer.fit()
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR, check=check_groups)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
