"""Train one ScaleKD table row on common's Trainer: a student distilled from a frozen ViT teacher, or alone.

    python -m scalekd.train experiment=swinl_resnet50 data.root=/data/imagenet \
        model.teacher_checkpoint=swin_large_patch4_window7_224_22kto1k-5f0996db.pth
    python -m scalekd.train experiment=baseline_resnet50 data.root=/data/imagenet          # the student alone
    torchrun --nproc_per_node=8 -m scalekd.train experiment=swinl_vit_b16 data.root=... model.teacher_checkpoint=...
    python -m scalekd.reproduce                                 # no root: the smoke runs on synthetic JPEGs

The teacher comes from a local file only (timm, mmcls or one of our runs' best.pt), loaded strictly through
`scalekd.convert.load_official`; a file of another architecture fails naming the first mismatching keys.
Every run prints and records its viewed samples (optimizer steps x global batch, student data only, d.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.config import (
    CLASSIFICATION_OPTIONS,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    as_dict,
    check_choice,
    hydra_main,
    refusing_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.data import ImageFolder, build_transforms, write_synthetic_imagefolder
from common.dist import cleanup, init_distributed
from common.engine import Hook, RunInfo, Trainer, eval_loader
from common.errors import UserError
from common.tasks import ClassificationTask, evaluate

from .convert import load_official
from .distiller import ClassLoss, distiller_from_config
from .models import STUDENTS, TEACHERS, create_student, create_teacher
from .viewed import run_viewed_samples

CONFIG_DIR = Path(__file__).parent / "configs"
DATASETS = ("imagenet", "synthetic_imagenet")


@dataclass
class TrainAugConfig:
    interpolation: str = "bicubic"
    hflip: float = 0.5
    auto_augment: str | None = None  # timm RandAugment string (d.2: M/total -> timm 10*M/total)
    reprob: float = 0.0
    remode: str = "pixel"


@dataclass
class EvalAugConfig:
    resize: int = 256  # short side; crop_pct = crop / resize
    crop: int = 224
    interpolation: str = "bicubic"


@dataclass
class DataConfig:
    name: str = "imagenet"  # imagenet | synthetic_imagenet
    root: str | None = None
    num_classes: int = 1000
    image_size: int = 224
    train_per_class: int = 32  # synthetic_imagenet only
    val_per_class: int = 8
    train: TrainAugConfig = field(default_factory=TrainAugConfig)
    eval: EvalAugConfig = field(default_factory=EvalAugConfig)


@dataclass
class ModelConfig:
    student: str | None = "resnet50d"  # scalekd.models.STUDENTS; null on teacher-evaluation rows
    teacher: str | None = "swin_l"  # scalekd.models.TEACHERS
    teacher_checkpoint: str | None = None
    teacher_key: str | None = None
    image_size: int = 224
    sync_bn: bool = False  # SyncBN in the student under torchrun (b.6)
    student_kwargs: dict[str, Any] | None = None  # builder arguments (smoke: small widths)
    teacher_kwargs: dict[str, Any] | None = None


@dataclass
class StageCfg:
    alpha: list[float] = field(default_factory=lambda: [0.08, 0.06])
    num_heads: int = 8
    softmax_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    self_query: bool = True


@dataclass
class KDCfg:
    temperature: float = 1.0
    alpha: float = 0.5


@dataclass
class ClassLossCfg:
    kind: str = "ce"
    label_smoothing: float = 0.0
    weight: float = 1.0


@dataclass
class ViTTeacherCfg:
    phi_blocks: int = 2
    tail_blocks: int = 0


@dataclass
class MethodConfig:
    name: str = "scalekd"  # scalekd | kd (logit KD only) | ce (the student alone)
    cap_variant: str = "v2"
    s3: StageCfg | None = field(default_factory=StageCfg)
    s4: StageCfg | None = field(default_factory=StageCfg)
    kd: KDCfg | None = field(default_factory=KDCfg)
    class_loss: ClassLossCfg = field(default_factory=ClassLossCfg)
    frequency_view: str = "dct"
    teacher_train_mode: bool = True
    vit_teacher: ViTTeacherCfg = field(default_factory=ViTTeacherCfg)


@dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    logger: LoggerConfig
    no_decay_keys: list[str]
    eval_on_ema: bool


def parse(cfg: DictConfig) -> RunConfig:
    """Validate every group; a wrong key or value is a one-line error naming it."""
    r = validate_groups(
        cfg, RunConfig,
        no_decay_keys=[str(k) for k in cfg.get("no_decay_keys") or []],
        eval_on_ema=bool(cfg.get("eval_on_ema", False)),
    )
    check_choice("data.name", r.data.name, DATASETS)
    check_choice("method.name", r.method.name, ("scalekd", "kd", "ce"))
    check_choice("method.frequency_view", r.method.frequency_view, ("dct", "mean"))
    if r.model.student is not None:
        check_choice("model.student", r.model.student, sorted(STUDENTS))
    if r.model.teacher is not None:
        check_choice("model.teacher", r.model.teacher, sorted(TEACHERS))
    if r.method.name != "ce" and r.model.teacher is None:
        raise UserError(f"config model.teacher: method={r.method.name} needs a teacher (e.g. model.teacher=swin_l)")
    if r.eval_on_ema and not r.trainer.ema_decay:
        raise UserError("config eval_on_ema=true needs trainer.ema_decay (mmengine momentum 1e-4 = decay 0.9999)")
    return r


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def build_data(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """ImageNet class folders (train/, val/) through common's reader with the row's transforms (d.1, d.2)."""
    if cfg.root is None:
        raise UserError("config data.root is not set: pass data.root=<folder holding train/<wnid>/*.JPEG and "
                        "val/<wnid>/*.JPEG> (spec f), or profile=smoke for synthetic data")
    if cfg.name == "synthetic_imagenet":
        write_synthetic_imagefolder(cfg.root, cfg.num_classes, cfg.train_per_class, cfg.val_per_class,
                                    image_size=max(cfg.image_size, 32), seed=0)
    t, e = cfg.train, cfg.eval
    auto_augment, magnitude = _rand_augment(t.auto_augment)
    train_tf = build_transforms("imagenet", True, cfg.image_size, interpolation=t.interpolation, hflip=t.hflip,
                                auto_augment=auto_augment, re_prob=t.reprob, re_mode=t.remode, color_jitter=None)
    if magnitude is not None:
        _set_rand_magnitude(train_tf, magnitude)
    eval_tf = build_transforms("imagenet", False, e.crop, interpolation=e.interpolation, crop_pct=e.crop / e.resize)
    train_set, val_set = ImageFolder(cfg.root, "train", train_tf), ImageFolder(cfg.root, "val", eval_tf)
    if len(train_set.classes) != cfg.num_classes:
        raise UserError(f"{cfg.root}/train has {len(train_set.classes)} class folders but data.num_classes="
                        f"{cfg.num_classes}; point data.root at the right folder or set data.num_classes")
    return train_set, val_set


def _rand_augment(spec: str | None) -> tuple[str | None, float | None]:
    """timm parses RandAugment's `m` as an integer; mmcls' M/total on timm's 0-10 scale is fractional
    (7/8 -> 8.75, d.2). Returns the string with an integer placeholder and the magnitude to set."""
    if not spec or not spec.startswith("rand"):
        return spec, None
    m = re.search(r"-m(\d+(?:\.\d+)?)", spec)
    if m is None or float(m.group(1)).is_integer():
        return spec, None
    return spec.replace(m.group(0), "-m9"), float(m.group(1))


def _set_rand_magnitude(transform: Any, magnitude: float) -> None:
    """Set every RandAugment op's magnitude (timm `AugmentOp.magnitude`, a float internally)."""
    from timm.data.auto_augment import RandAugment

    found = [op for t in getattr(transform, "transforms", []) if isinstance(t, RandAugment) for op in t.ops]
    if not found:
        raise UserError("data.train.auto_augment: no RandAugment in the training transform to set the magnitude")
    for op in found:
        op.magnitude = magnitude


# --------------------------------------------------------------------------------------------------
# Models and methods
# --------------------------------------------------------------------------------------------------


def _named_no_decay(module: nn.Module, keys: list[str]) -> set[str]:
    """Parameter names containing ".<key>" for a key of `keys` (mmcls paramwise custom_keys, d.2)."""
    return {n for n, _ in module.named_parameters() if any(f".{k}" in f".{n}" for k in keys)}


class StudentAlone(nn.Module):
    """A student trained alone under its recipe (Table 3's baselines): the head loss only."""

    def __init__(self, student: nn.Module, class_loss: ClassLoss, no_decay_keys: list[str]) -> None:
        super().__init__()
        self.student, self.class_loss, self.no_decay_keys = student, class_loss, no_decay_keys

    def forward_train(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"loss_cls": self.class_loss(logits, targets)}

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory excludes from weight decay."""
        return _named_no_decay(self, self.no_decay_keys)


def build_student(r: RunConfig) -> nn.Module:
    assert r.model.student is not None
    return create_student(r.model.student, num_classes=r.data.num_classes, **(r.model.student_kwargs or {}))


def build_teacher(r: RunConfig, checkpoint: str | None = None) -> nn.Module:
    """The frozen teacher from a local file (timm, mmcls or ours), loaded strictly; nothing is downloaded."""
    assert r.model.teacher is not None
    path = checkpoint or r.model.teacher_checkpoint
    if path is None:
        raise UserError(f"config model.teacher_checkpoint is not set: pass the {r.model.teacher} weights "
                        "(an mmcls .pth, a timm file, or best.pt of a run), e.g. model.teacher_checkpoint="
                        "swin_large_patch4_window7_224_22kto1k-5f0996db.pth")
    teacher = create_teacher(r.model.teacher, num_classes=r.data.num_classes, **(r.model.teacher_kwargs or {}))
    load_official(path, teacher, key=r.model.teacher_key)
    return teacher.eval().requires_grad_(False)


def build_method(r: RunConfig, teacher: nn.Module | None) -> nn.Module:
    """ScaleKD (4 CAPs, both views, TPP, KD), logit KD alone, or the student alone, by `method.name`."""
    student = build_student(r)
    m = r.method
    if m.name == "ce":
        return StudentAlone(student, ClassLoss(**as_dict(m.class_loss)), r.no_decay_keys)
    assert teacher is not None
    method = as_dict(m)
    if m.name == "kd":  # logit KD only: no CAP stage
        method.update(s3=None, s4=None)
        if m.kd is None:
            raise UserError("config method.kd: method=kd needs method.kd.temperature and method.kd.alpha")
    model = distiller_from_config(method, student, teacher, image_size=r.model.image_size)
    model.no_decay_keys = r.no_decay_keys
    return model


# --------------------------------------------------------------------------------------------------
# Hooks: viewed samples and evaluate_on_ema
# --------------------------------------------------------------------------------------------------


class ViewedSamples(Hook):
    """Records optimizer steps x global batch (student data only, d.5) in result.json's `extra`."""

    def __init__(self, global_batch: int, is_main: bool) -> None:
        self.global_batch, self.is_main = global_batch, is_main

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        steps = int(metrics.get("steps", 0))
        extra["viewed_samples"] = run_viewed_samples(steps, self.global_batch)
        extra["viewed_samples_formula"] = f"{steps} optimizer steps x global batch {self.global_batch}"
        if self.is_main:
            print(f"viewed samples: {extra['viewed_samples']:,} ({extra['viewed_samples_formula']}; "
                  "student data only, the teacher's pre-training not counted)")


class EvaluateOnEma(Hook):
    """mmcls `evaluate_on_ema`: the reported top-1/top-5 are the EMA weights' (raw kept as `raw_*`)."""

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        for k in ("top1", "top5", "loss"):
            if f"ema_{k}" in metrics and k in metrics:
                metrics[f"raw_{k}"], metrics[k] = metrics[k], metrics[f"ema_{k}"]
        extra["reported_weights"] = "ema"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _info(cfg: DictConfig, r: RunConfig) -> RunInfo:
    return RunInfo("scalekd", str(cfg.name), cfg.get("row"), "imagenet",
                   synthetic=r.data.name.startswith("synthetic"), profile=str(cfg.get("profile", "full")),
                   data_root=r.data.root)


# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    parse, CLASSIFICATION_OPTIONS,
    "ScaleKD's losses are set under method (e.g. method.class_loss.label_smoothing); "
    "the trainer's do not reach them")


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    """Train one row; returns the final metrics (also in result.json) and the run directory."""
    r = check_config(cfg)
    if r.model.student is None:
        raise UserError(f"experiment {cfg.name} evaluates a released teacher; run python -m scalekd.eval "
                        f"experiment={cfg.name} checkpoint=<teacher file> data.root=...")
    env = init_distributed(r.trainer.device)
    out = run_dir(cfg, "scalekd", str(cfg.name))
    torch.manual_seed(r.trainer.seed)
    train_set, val_set = build_data(r.data)
    teacher = build_teacher(r) if r.method.name != "ce" else None  # before anything is written
    if env.is_main:
        save_resolved(cfg, out)
    extra: dict[str, Any] = {}
    if teacher is not None:
        teacher = teacher.to(env.device)
        loader = eval_loader(val_set, r.trainer.global_batch, env, r.trainer.workers)
        extra["teacher_top1"] = evaluate(teacher, loader, env)["top1"]  # check the teacher before distilling
        if env.is_main:
            print(f"teacher {r.model.teacher}: top1 {extra['teacher_top1']:.2f}")
    method = build_method(r, teacher)
    student = method.student  # evaluated, EMA-averaged, saved as best.pt: the student alone
    if r.model.sync_bn and env.distributed:
        method.student = student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if hasattr(method, "taps"):
            method.taps.model = student
    hooks: list[Hook] = [ViewedSamples(r.trainer.global_batch, env.is_main)]
    if r.eval_on_ema:
        hooks.append(EvaluateOnEma())
    trainer = Trainer(method, train_set, val_set, r.trainer, r.optim, r.schedule, out, env,
                      task=ClassificationTask(num_classes=r.data.num_classes), model=student, hooks=hooks,
                      logger_cfg=r.logger, config_dict=as_dict(cfg), run_info=_info(cfg, r))
    trainer.record_extra.update(extra, method=r.method.name, student=r.model.student, teacher=r.model.teacher,
                                global_batch=r.trainer.global_batch)
    metrics = trainer.fit()
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
