"""Train one NORM table row: a CIFAR teacher (plain CE) or a student distilled with NORM.

    python -m norm.train experiment=cifar100_teacher_resnet32x4 data.root=/data/cifar100
    python -m norm.train experiment=cifar100_resnet32x4_resnet8x4 data.root=/data/cifar100 \
        model.teacher_checkpoint=/ckpt/resnet32x4_vanilla/ckpt_epoch_240.pth
    python -m norm.train experiment=cifar100_resnet56_resnet20 profile=smoke        # CPU, synthetic data
    torchrun --nproc_per_node=8 -m norm.train experiment=imagenet_resnet34_resnet18 data.root=/data/imagenet \
        model.teacher_checkpoint=/ckpt/resnet34-333f7ec4.pth

A NORM run evaluates the teacher first (logged as `teacher_top1`), trains the student with the FT, then
folds the FT into the classifier, checks the folded accuracy and writes `deployed.pt` (the plain student).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from common.checkpoint import atomic_save
from common.config import (
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    as_dict,
    check_choice,
    hydra_main,
    refuse_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.data import CIFAR, MNIST, ImageFolder, build_transforms, split_indices, write_synthetic_cifar
from common.dist import DistEnv, barrier, cleanup, init_distributed
from common.engine import Hook, Progress, RunInfo, Trainer, eval_loader
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier, evaluate

from .convert import load_teacher
from .crd import ContrastiveSampleDataset, CRDLoss
from .distiller import NORMDistiller
from .models import MODEL_NAMES, NORMStudent, create_model, is_foldable
from .norm import NormMultiplier

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    name: str  # cifar100 | imagenet | synthetic_cifar | mnist
    root: str | None = None
    num_classes: int = 100
    image_size: int = 32
    train_per_class: int = 64  # synthetic_cifar only
    test_per_class: int = 16
    hflip: float = 0.5  # CIFAR training flip probability (the official 0.5; 0 in the smoke profile)
    labelled: int | None = None  # mnist only: train on this many of the training digits (a seeded subset)


@dataclass
class ModelConfig:
    student: str  # the network this row trains (the teacher itself for teacher rows)
    teacher: str | None = None
    teacher_checkpoint: str | None = None


@dataclass
class MultiplierConfig:
    milestones: list[int] = field(default_factory=lambda: [10, 20, 180, 210])
    values: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0, 0.5, 0.1])
    reference_epochs: int = 241


@dataclass
class CRDConfig:
    """RepDistiller CRD as the NORM_CRD term (spec b.8); defaults are train_cifar_student.py's flags."""
    weight: float = 2.5       # opt.ceta
    feat_dim: int = 128       # --feat_dim
    nce_k: int = 16384        # --nce_k negatives per anchor
    nce_t: float = 0.07       # --nce_t
    nce_m: float = 0.5        # --nce_m memory momentum
    mode: str = "exact"       # --mode exact | relax


@dataclass
class MethodConfig:
    name: str = "norm"  # norm | ce
    n: int = 8
    residual: bool = True
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    norm_weight: float = 1.0
    kd_temperature: float = 4.0
    logit_scale: float | None = 2.5
    multiplier: MultiplierConfig | None = field(default_factory=MultiplierConfig)
    crd: CRDConfig | None = None  # NORM+CRD rows


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
    """Validate every group; a wrong key or value is a one-line error naming it."""
    run = validate_groups(cfg, RunConfig)
    check_choice("data.name", run.data.name, ("cifar100", "imagenet", "synthetic_cifar", "mnist"))
    check_choice("method.name", run.method.name, ("norm", "ce"))
    check_choice("model.student", run.model.student, MODEL_NAMES)
    if run.method.name == "norm":
        if run.model.teacher is None:
            raise UserError("config model.teacher: NORM needs a teacher network (e.g. model.teacher=resnet32x4)")
        check_choice("model.teacher", run.model.teacher, MODEL_NAMES)
        if run.method.n < 1:
            raise UserError(f"config method.n={run.method.n}: N must be a positive integer")
    if run.method.crd is not None:
        check_choice("method.crd.mode", run.method.crd.mode, ("exact", "relax"))
        if run.method.name != "norm" or run.trainer.mixup or run.trainer.cutmix:
            raise UserError("config method.crd: CRD is a term of method=norm and needs integer labels "
                            "(no trainer.mixup / trainer.cutmix)")
    return run


def build_data(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Train and evaluation sets with the official transforms (spec d.2, d.3); nothing is downloaded."""
    if cfg.name == "mnist":  # the real-data check: the digits common reads (DESIGN s.3), 3-channel
        if cfg.root is None:
            raise UserError("config data.root: set the folder of the MNIST IDX files (e.g. ../shared/data/mnist)")
        train_idx, held_out = split_indices(10_000, 8_000, seed=0)  # t10k file: 8,000 train, 2,000 held out
        if cfg.labelled is not None:
            train_idx = np.sort(np.random.default_rng(1).permutation(train_idx)[: cfg.labelled])
        return (MNIST.from_root(cfg.root, "test", build_transforms("mnist", True, cfg.image_size, padding=2,
                                                                   to_rgb=True), indices=train_idx),
                MNIST.from_root(cfg.root, "test", build_transforms("mnist", False, cfg.image_size, to_rgb=True),
                                indices=held_out))
    if cfg.name == "synthetic_cifar":
        if cfg.root is None:
            raise UserError("config data.root: set a folder for the synthetic CIFAR files")
        write_synthetic_cifar(cfg.root, cfg.num_classes, cfg.train_per_class, cfg.test_per_class, seed=0)
    elif cfg.root is None:
        layout = "cifar-100-python/{train,test,meta}" if cfg.name == "cifar100" else "train/<wnid>/, val/<wnid>/"
        raise UserError(f"config data.root is not set: pass data.root=<folder holding {layout}> (spec f), "
                        "or profile=smoke for synthetic data")
    if cfg.name == "imagenet":
        train_tf = build_transforms("imagenet", True, cfg.image_size, color_jitter=0.0)  # RRC + flip only
        return (ImageFolder(cfg.root, "train", train_tf),
                ImageFolder(cfg.root, "val", build_transforms("imagenet", False, cfg.image_size)))
    train_tf = build_transforms("cifar100", True, cfg.image_size, hflip=cfg.hflip)
    test_tf = build_transforms("cifar100", False, cfg.image_size)
    return (CIFAR(cfg.root, cfg.num_classes, "train", train_tf),  # type: ignore[arg-type]
            CIFAR(cfg.root, cfg.num_classes, "test", test_tf))  # type: ignore[arg-type]


class NORMSchedule(Hook):
    """w(epoch), the official epoch-wise NORM multiplier, set at the start of every epoch."""

    def __init__(self, distiller: NORMDistiller) -> None:
        self.distiller = distiller

    def on_epoch_start(self, progress: Progress) -> None:
        self.distiller.on_epoch_start(progress.epoch, progress.epochs)


class FoldAndDeploy(Hook):
    """After training: fold the FT into the classifier, score the deployed student, write deployed.pt."""

    def __init__(self, student: NORMStudent, val_set: Dataset, run: RunConfig, env: DistEnv, out: Path) -> None:
        self.student, self.val_set, self.run, self.env, self.out = student, val_set, run, env, out

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        deployed = self.student.eval().fold()
        loader = eval_loader(self.val_set, self.run.trainer.global_batch, self.env, self.run.trainer.workers)
        metrics["top1_folded"] = evaluate(deployed, loader, self.env)["top1"]
        extra["params_deployed"] = sum(p.numel() for p in deployed.parameters())
        if self.env.is_main:
            atomic_save(deployed.state_dict(), self.out / "deployed.pt")


def _fit(method: nn.Module, model: nn.Module, run: RunConfig, train_set: Dataset, val_set: Dataset, out: Path,
         env: DistEnv, config_dict: dict[str, Any], hooks: list[Hook] | None = None,
         info: RunInfo | None = None, extra: dict[str, Any] | None = None) -> dict[str, float]:
    params = [p for p in method.parameters() if p.requires_grad]  # the frozen teacher is not optimized
    t = run.trainer
    task = ClassificationTask(t.mixup, t.cutmix, t.label_smoothing, run.data.num_classes)
    trainer = Trainer(method, train_set, val_set, t, run.optim, run.schedule, out, env, task=task, model=model,
                      hooks=hooks or [], logger_cfg=run.logger, params=params, config_dict=config_dict,
                      run_info=info)
    trainer.record_extra.update(extra or {})
    return trainer.fit()


def get_teacher(run: RunConfig, profile: str, train_set: Dataset, val_set: Dataset, out: Path, env: DistEnv,
                config_dict: dict[str, Any]) -> nn.Module:
    """The frozen teacher: from `model.teacher_checkpoint`, or (smoke profile only) trained here first."""
    arch, nc = run.model.teacher, run.data.num_classes
    assert arch is not None
    if run.model.teacher_checkpoint is not None:
        return load_teacher(run.model.teacher_checkpoint, arch, nc)
    if profile != "smoke":
        raise UserError(f"config model.teacher_checkpoint is not set: pass the {arch} teacher (a RepDistiller "
                        f"ckpt_epoch_240.pth, a torchvision .pth, or best.pt of experiment=cifar100_teacher_{arch})")
    teacher_dir = out / "teacher"
    if not (teacher_dir / "FINISHED").is_file():  # smoke: train the teacher with the same data and sizes
        teacher_dir.mkdir(parents=True, exist_ok=True)
        net = create_model(arch, nc)
        _fit(Classifier(net), net, run, train_set, val_set, teacher_dir, env, config_dict)
    barrier()  # under torchrun, rank 0 writes best.pt
    return load_teacher(teacher_dir / "best.pt", arch, nc)


def check_config(cfg: DictConfig) -> RunConfig:
    """`parse` and the shared trainer options this paper never reads (refused by name); run before
    Hydra makes the run directory (`hydra_main(check=...)`) and again by `run`."""
    r = parse(cfg)
    if not (r.trainer.mixup or r.trainer.cutmix):  # the smoothing goes into mixup's soft targets only
        refuse_unused_trainer_options(r.trainer, ("label_smoothing",), "NORM's CE and KD terms use hard "
                                      "labels; label smoothing applies only with trainer.mixup / trainer.cutmix")
    return r


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    """Train one row; returns the final metrics (also written to result.json) and the run directory."""
    r = check_config(cfg)
    env = init_distributed(r.trainer.device)
    out = run_dir(cfg, "norm", cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    torch.manual_seed(r.trainer.seed)
    train_set, val_set = build_data(r.data)
    config_dict = as_dict(cfg)
    nc = r.data.num_classes
    extra: dict[str, Any] = {}

    info = RunInfo("norm", cfg.name, cfg.row, "cifar100" if r.data.name == "synthetic_cifar" else r.data.name,
                   synthetic=r.data.name == "synthetic_cifar", profile=cfg.profile, data_root=r.data.root)
    if r.method.name == "ce":
        net = create_model(r.model.student, nc)
        metrics = _fit(Classifier(net), net, r, train_set, val_set, out, env, config_dict, info=info)
        cleanup()
        return metrics, out
    teacher = get_teacher(r, cfg.profile, train_set, val_set, out, env, config_dict).to(env.device)
    loader = eval_loader(val_set, r.trainer.global_batch, env, r.trainer.workers)
    extra["teacher_top1"] = evaluate(teacher, loader, env)["top1"]  # check the teacher before distilling
    if env.is_main:
        print(f"teacher {r.model.teacher}: top1 {extra['teacher_top1']:.2f}")
    student = NORMStudent(create_model(r.model.student, nc, norm_variant=True), teacher.num_features,
                          r.method.n, r.method.residual)
    extra["params_train"] = sum(p.numel() for p in student.parameters())  # with the FT (no CRD heads)
    m, c = r.method.multiplier, r.method.crd
    crd = None
    if c is not None:  # CRD needs each sample's index and contrast indices, and a bank row per sample
        train_set = ContrastiveSampleDataset(train_set, train_set.targets, c.nce_k, c.mode)  # type: ignore[attr-defined]
        crd = CRDLoss(student.net.num_features, teacher.num_features, len(train_set), c.feat_dim, c.nce_t, c.nce_m)
    method = NORMDistiller(student, teacher, r.method.ce_weight, r.method.kd_weight, r.method.norm_weight,
                           r.method.kd_temperature, r.method.logit_scale,
                           None if m is None else NormMultiplier(m.milestones, m.values, m.reference_epochs),
                           crd, 0.0 if c is None else c.weight)
    hooks: list[Hook] = [NORMSchedule(method)]
    if is_foldable(student.net):
        hooks.append(FoldAndDeploy(student, val_set, r, env, out))
    metrics = _fit(method, method.eval_model(), r, train_set, val_set, out, env, config_dict, hooks, info, extra)
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
