"""Train one table row: ``python -m noah.train experiment=<row> [profile=smoke] [data.root=...]``.

Single process by default; ``torchrun --nproc_per_node=N -m noah.train ...`` for DDP (the global batch stays
the row's; per-device batch and gradient accumulation are derived). CPU works too (``trainer.device=cpu``).
A run resumes from its last checkpoint with ``trainer.resume=auto`` (the default) in the same
``hydra.run.dir``. The loop is common's ``Trainer``; this file only builds the row's model, data, task, the
official parameter groups and the recipe switches (repeated augmentation, the EMA policy).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.data.distributed_sampler import RepeatAugSampler
from torch import nn
from torch.utils.data import Dataset

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
from common.data import COCOMultiLabel, ImageFolder, build_transforms, write_synthetic_coco, write_synthetic_imagefolder
from common.dist import cleanup, init_distributed
from common.engine import Hook, RunInfo, Trainer
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier, EvalContext, MultiLabelTask, Task
from noah.models import create_model
from noah.multilabel import MultiLabelClassifier

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "noah"
DATASETS = ("imagenet", "synthetic", "coco", "synthetic_coco")


@dataclass
class ModelConfig:
    name: str
    drop_path: float = 0.0  # stochastic depth (DeiT/PVT linear over depth, Mixer/gMLP uniform)
    drop: float = 0.0  # dropout inside Mixer/gMLP MLPs (spec d.4)
    pre_logits: bool | None = None  # DeiT: null = official rule (Linear(D, 192) + tanh when D < 192)
    pretrained: str | None = None  # a local checkpoint to start from (MS-COCO: ImageNet weights)


@dataclass
class DataConfig:
    name: str
    root: str | None
    num_classes: int = 1000
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    train_aug: dict[str, Any] = field(default_factory=dict)
    eval_aug: dict[str, Any] = field(default_factory=dict)
    train_per_class: int = 48  # synthetic ImageNet folders
    val_per_class: int = 16
    year: str = "2014"  # COCO
    keep_unlabelled: bool = False
    train_images: int = 384  # synthetic COCO
    val_images: int = 128
    max_objects: int = 3
    object_size: float = 1 / 3  # synthetic COCO: object side / image side


@dataclass
class MethodConfig:
    head: str = "noah"  # noah | baseline
    head_num: int | None = None  # N (null: the paper's per-family value, spec b.7)
    key_ratio: float | None = None  # r
    head_dropout: float | None = None  # on NOAH's values only
    head_split: bool = True
    kv_split: bool = True
    loss: str = "ce"  # ce (ImageNet) | bce | asl (multi-label)


@dataclass
class RecipeConfig:
    repeated_aug: int = 0  # copies of each image, on different ranks in one step (DeiT/PVT RASampler: 3); 0 = off
    ema_evaluate: bool = False  # evaluate the EMA and report/select it (MLPs) or keep it only (DeiT)

    def __post_init__(self) -> None:
        if self.repeated_aug < 0 or self.repeated_aug == 1:
            raise UserError(f"config recipe.repeated_aug={self.repeated_aug}: 0 (off) or the number of copies >= 2")


# --------------------------------------------------------------------------------------------------
# Model, data, parameter groups
# --------------------------------------------------------------------------------------------------


def build_model(model_cfg: ModelConfig, data: DataConfig, method: MethodConfig) -> nn.Module:
    """The row's host with its baseline or NOAH head (``noah.models.create_model``); bad N / r: one line."""
    check_choice("method.head", method.head, ("noah", "baseline"))
    try:
        return create_model(model_cfg.name, head=method.head, num_classes=data.num_classes,
                            head_num=method.head_num, key_ratio=method.key_ratio, head_dropout=method.head_dropout,
                            head_split=method.head_split, kv_split=method.kv_split, pre_logits=model_cfg.pre_logits,
                            img_size=data.image_size, drop_path=model_cfg.drop_path, drop=model_cfg.drop)
    except ValueError as err:
        raise UserError(f"config model/method: {err}") from None


def build_data(cfg: DataConfig, train: bool = True) -> tuple[Dataset | None, Dataset]:
    """(train set, val set): ImageNet class folders or MS-COCO (spec f, d.5), or synthetic sets written in the
    same on-disk formats."""
    check_choice("data.name", cfg.name, DATASETS)
    if cfg.name == "synthetic":
        write_synthetic_imagefolder(cfg.root, cfg.num_classes, cfg.train_per_class, cfg.val_per_class,
                                    image_size=max(cfg.image_size, 32), seed=0)
    elif cfg.name == "synthetic_coco":
        write_synthetic_coco(cfg.root, cfg.num_classes, cfg.train_images, cfg.val_images, image_size=cfg.image_size,
                             max_objects=cfg.max_objects, seed=0, year=cfg.year, object_size=cfg.object_size)
    elif not cfg.root:
        layout = ("<root>/{train,val}/<wnid>/*.JPEG (spec f)" if cfg.name == "imagenet" else
                  "<root>/annotations/instances_{train,val}2014.json + <root>/{train,val}2014/*.jpg (spec d.5)")
        raise UserError(f"data.root is not set: pass data.root=/path/to/{cfg.name} holding {layout}, "
                        "or profile=smoke for synthetic data")
    aug = {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    try:
        train_tf = build_transforms("imagenet", True, cfg.image_size, **aug, **cfg.train_aug)
        val_tf = build_transforms("imagenet", False, cfg.image_size, **aug, **cfg.eval_aug)
    except TypeError as err:
        raise UserError(f"config data.train_aug/eval_aug: {err}") from None
    if cfg.name in ("coco", "synthetic_coco"):
        val_set: Dataset = COCOMultiLabel(cfg.root, "val", val_tf, cfg.year, cfg.keep_unlabelled)
        found = val_set.num_classes  # type: ignore[attr-defined]
        train_set = COCOMultiLabel(cfg.root, "train", train_tf, cfg.year, cfg.keep_unlabelled) if train else None
        where = f"{cfg.root}/annotations (categories)"
    else:
        val_set = ImageFolder(cfg.root, "val", val_tf)
        found = len(val_set.classes)  # type: ignore[attr-defined]
        train_set = ImageFolder(cfg.root, "train", train_tf) if train else None
        where = f"{cfg.root}/val (class folders)"
    if found != cfg.num_classes:
        raise UserError(f"{where} has {found} classes but data.num_classes={cfg.num_classes}; "
                        "fix data.root or data.num_classes")
    return train_set, val_set


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool) -> list[dict[str, Any]]:
    """Optimizer groups of the official recipes (spec d.1-d.4).

    ``no_decay_1d``: biases, norm parameters and every other tensor with < 2 dims, plus the model's
    ``no_weight_decay()`` names (DeiT ``pos_embed``/``cls_token``, PVT baseline ``cls_token``; NOAH-PVT none),
    get no decay. For the CNN hosts this is exactly the official ``--nowd-bn`` rule (decay only ``weight``
    tensors of >= 2 dims); otherwise everything, NOAH's biases included, is decayed (official default).
    """
    if not no_decay_1d:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Recipe switches
# --------------------------------------------------------------------------------------------------


class RepeatedAugSampler(RepeatAugSampler):
    """DeiT's repeated augmentation (RASampler, spec d.2): timm's ``RepeatAugSampler`` with the loop's resume.

    Each epoch draws a permutation (seeded by the epoch, as DeiT's), repeats every image ``repeats`` times in a
    row and deals the list round-robin over the ranks, so the copies of one image sit at the same position of
    consecutive ranks' shards, i.e. in the same step on different GPUs (with one process they share a batch).
    Each rank keeps ``floor(N // 256 * 256 / world_size)`` samples: an epoch has about N samples, N / repeats
    distinct images. ``set_position(epoch, start)`` skips what a resumed run already consumed
    (``common.dist.ResumableSampler``'s interface, which the Trainer calls).
    """

    def __init__(self, length: int, rank: int, world_size: int, repeats: int = 3) -> None:
        super().__init__(range(length), num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


class EmaPolicy:
    """The row's task under the official EMA policy (spec d.2, d.4, k.7).

    ``ema_evaluate=False`` (DeiT): the EMA is updated and saved but never evaluated. ``True`` (timm's MLP
    trainer): the EMA is evaluated, selects the best epoch (``ema_<primary>``) and is what the record reports
    (``ReportEma``); the live model's numbers stay beside it as ``live_<metric>``.
    """

    def __init__(self, task: Task, live: nn.Module, ema_evaluate: bool) -> None:
        self.task, self.live, self.ema_evaluate = task, live, ema_evaluate
        self.primary = f"ema_{task.primary}" if ema_evaluate else task.primary
        self.higher_is_better = task.higher_is_better

    def losses(self, method: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return self.task.losses(method, batch)

    def inputs(self, batch: Any) -> Any:
        return self.task.inputs(batch)

    def evaluate(self, model: nn.Module, loader: Any, ctx: EvalContext) -> dict[str, float]:
        if model is not self.live and not self.ema_evaluate:
            return {}
        return self.task.evaluate(model, loader, ctx)


class ReportEma(Hook):
    """With ``recipe.ema_evaluate``: the record's metrics are the EMA's (``top1`` = ``ema_top1``), the live
    model's kept as ``live_*``."""

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        for key in [k for k in metrics if k.startswith("ema_")]:
            base = key[len("ema_"):]
            if base in metrics:
                metrics[f"live_{base}"] = metrics[base]
            metrics[base] = metrics.pop(key)
        extra["reported_weights"] = "ema"


def build_task(method: MethodConfig, trainer: TrainerConfig, data: DataConfig) -> tuple[Task, nn.Module]:
    """(task, training wrapper factory) for the row's loss: CE with mixup/cutmix, or multi-label BCE/ASL."""
    check_choice("method.loss", method.loss, ("ce", "bce", "asl"))
    multilabel = data.name in ("coco", "synthetic_coco")
    if multilabel != (method.loss != "ce"):
        raise UserError(f"config method.loss={method.loss!r} does not fit data.name={data.name!r}: "
                        "ce for ImageNet, bce or asl for MS-COCO")
    if multilabel:
        if trainer.mixup or trainer.cutmix:
            raise UserError("config trainer.mixup/cutmix: not defined for multi-label targets; set them to 0")
        return MultiLabelTask(), MultiLabelClassifier  # type: ignore[return-value]
    task = ClassificationTask(trainer.mixup, trainer.cutmix, trainer.label_smoothing, data.num_classes)
    return task, Classifier  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------


def check_groups(cfg: DictConfig) -> None:
    """The paper's own groups typed and checked (one line naming a wrong key or value), before anything is written
    (`hydra_main(check=...)`; the shared groups are checked while composing)."""
    validate(cfg.model, ModelConfig, "model.")
    validate(cfg.data, DataConfig, "data.")
    validate(cfg.method, MethodConfig, "method.")
    validate(cfg.recipe, RecipeConfig, "recipe.")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one configuration; returns the final metrics (also written to result.json)."""
    model_cfg = validate(cfg.model, ModelConfig, "model.")
    data = validate(cfg.data, DataConfig, "data.")
    method = validate(cfg.method, MethodConfig, "method.")
    recipe = validate(cfg.recipe, RecipeConfig, "recipe.")
    trainer_cfg = validate(cfg.trainer, TrainerConfig, "trainer.")
    optim = validate(cfg.optim, OptimConfig, "optim.")
    schedule = validate(cfg.schedule, ScheduleConfig, "schedule.")
    logger_cfg = validate(cfg.logger, LoggerConfig, "logger.")
    if recipe.ema_evaluate and not trainer_cfg.ema_decay:
        raise UserError("config recipe.ema_evaluate=true needs an EMA: set trainer.ema_decay (e.g. 0.99992)")
    task, wrapper = build_task(method, trainer_cfg, data)
    model = build_model(model_cfg, data, method)
    if model_cfg.pretrained:
        from noah.convert import load_weights

        load_weights(model, model_cfg.pretrained, finetune=True)
    env = init_distributed(trainer_cfg.device)
    out = run_dir(cfg, PAPER, cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    torch.manual_seed(trainer_cfg.seed)
    train_set, val_set = build_data(data)
    hooks: list[Hook] = []
    sampler = (RepeatedAugSampler(len(train_set), env.rank, env.world_size, recipe.repeated_aug)  # type: ignore[arg-type]
               if recipe.repeated_aug else None)
    if recipe.ema_evaluate:
        hooks.append(ReportEma())
    method_module = (wrapper(model, trainer_cfg.label_smoothing) if method.loss == "ce"  # type: ignore[operator]
                     else wrapper(model, method.loss))  # type: ignore[operator]
    dataset = "coco" if data.name.endswith("coco") else "imagenet"
    info = RunInfo(PAPER, cfg.name, cfg.row, dataset, synthetic=data.name.startswith("synthetic"), profile=cfg.profile,
                   data_root=data.root)
    trainer = Trainer(method_module, train_set, val_set, trainer_cfg, optim, schedule, out, env,
                      task=EmaPolicy(task, model, recipe.ema_evaluate), model=model, hooks=hooks,
                      logger_cfg=logger_cfg, params=param_groups(model, optim.weight_decay, optim.no_decay_1d),
                      config_dict=OmegaConf.to_container(cfg, resolve=True), run_info=info,
                      train_sampler=sampler)
    metrics = trainer.fit()
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR, check=check_groups)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
