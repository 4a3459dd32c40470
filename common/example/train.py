"""The smallest complete job on the shared pieces: compose, validate, train, evaluate, report.

    python -m common.example.train                                  # synthetic class folders
    python -m common.example.train experiment=mnist_cnn data.root=/path/to/mnist
    python -m common.example.train profile=smoke trainer.resume=auto

Papers follow the same shape in `<paper>/train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
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
from common.data import MNIST, ImageFolder, build_transforms, split_indices, write_synthetic_imagefolder
from common.dist import cleanup, init_distributed
from common.engine import RunInfo, Trainer
from common.tasks import ClassificationTask, Classifier

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    name: str
    root: str
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    n_train: int = 8000


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    width: int = 32


def small_cnn(in_chans: int, num_classes: int, width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU stages and a linear head."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    return nn.Sequential(*stage(in_chans, width), *stage(width, 2 * width), *stage(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def build_data(cfg: DataConfig) -> tuple[Any, Any]:
    check_choice("data.name", cfg.name, ("synthetic", "mnist"))
    if cfg.name == "mnist":
        tf = build_transforms("mnist", train=False)
        train_idx, val_idx = split_indices(10_000, cfg.n_train, seed=0)
        return (MNIST.from_root(cfg.root, "test", tf, indices=train_idx),
                MNIST.from_root(cfg.root, "test", tf, indices=val_idx))
    write_synthetic_imagefolder(cfg.root, cfg.num_classes, train_per_class=64, val_per_class=16,
                                image_size=cfg.image_size, seed=0)
    train_tf = build_transforms("imagenet", train=True, image_size=cfg.image_size, scale=(0.5, 1.0))
    val_tf = build_transforms("imagenet", train=False, image_size=cfg.image_size, crop_pct=1.0)
    return ImageFolder(cfg.root, "train", train_tf), ImageFolder(cfg.root, "val", val_tf)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one configuration; returns the final metrics (also in result.json)."""
    data = validate(cfg.data, DataConfig, "data.")
    model_cfg = validate(cfg.model, ModelConfig, "model.")
    trainer_cfg = validate(cfg.trainer, TrainerConfig, "trainer.")
    optim = validate(cfg.optim, OptimConfig, "optim.")
    schedule = validate(cfg.schedule, ScheduleConfig, "schedule.")
    logger_cfg = validate(cfg.logger, LoggerConfig, "logger.")

    env = init_distributed(trainer_cfg.device)
    out = run_dir(cfg, cfg.paper, cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    torch.manual_seed(trainer_cfg.seed)
    train_set, val_set = build_data(data)
    model = small_cnn(data.channels, data.num_classes, model_cfg.width)
    task = ClassificationTask(trainer_cfg.mixup, trainer_cfg.cutmix, trainer_cfg.label_smoothing, data.num_classes)
    info = RunInfo(cfg.paper, cfg.name, cfg.row, data.name, synthetic=data.name == "synthetic", profile=cfg.profile)
    trainer = Trainer(Classifier(model, trainer_cfg.label_smoothing), train_set, val_set, trainer_cfg, optim,
                      schedule, out, env, task=task, model=model, logger_cfg=logger_cfg, run_info=info)
    metrics = trainer.fit()
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
