"""Train one SSD-KD table row (SSD-KD, Fast-k, DeepInv-k or KD on real data) on common's Trainer.

    python -m ssdkd.train experiment=cifar10_resnet34_resnet18_ssdkd data.root=/data/cifar10 \
        model.teacher_checkpoint=checkpoints/pretrained/cifar10_resnet34.pth
    python -m ssdkd.train experiment=cifar10_wrn40_2_wrn16_1_fast2 profile=smoke      # CPU, synthetic CIFAR-10
    python -m ssdkd.train experiment=mnist_resnet8_ssdkd data.root=../shared/data/mnist   # the real-data check
    torchrun --nproc_per_node=8 -m ssdkd.train experiment=... data.root=... model.teacher_checkpoint=...

Data-free KD has no training set. It runs on the one loop as follows (spec b.7(vi)): one optimizer step is one
KD step on `method.kd_batch_size` images the method replays from its store (`HarnessDistiller.kd_step`; the
loop's "dataset" is only the step index), an epoch is `method.kd_steps_per_epoch` steps, and a hook runs the
epoch's inversion before the first step (the `method.warmup` synthesis-only rounds before KD epoch 0). The
Trainer's epochs are therefore `trainer.epochs - method.warmup`; its per-epoch cosine is Fast's schedule.
Evaluation is on the real held-out set; it is never timed. `metrics.jsonl` gets, with every evaluation, the
cumulative t_inv / t_kd / t_total (device synchronised), Fast's synthesis-only time, samples generated and
the store size; `result.json` the same totals, the per-epoch list and the device. The teacher is evaluated and
printed first. Resume (`trainer.resume=auto`, SIGTERM -> exit 143) restores buffer, priorities, generator,
meta-Adam, BN history and counters exactly (they are the distiller's extra state).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

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
from common.data import (
    CIFAR,
    MNIST,
    NYUv2,
    NYUv2Transform,
    build_transforms,
    split_indices,
    write_synthetic_cifar,
    write_synthetic_nyuv2,
)
from common.dist import DistEnv, barrier, cleanup, init_distributed
from common.engine import Hook, Progress, RunInfo, Trainer, eval_loader
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier, EvalContext, SegmentationTask

from .convert import load_teacher
from .datafree import NORMALIZE_DICT
from .distiller import HarnessDistiller, build_method, build_real_kd, validate_method
from .models import SEGMENTATION_MODEL_DICT, create_model, model_names

CONFIG_DIR = Path(__file__).parent / "configs"
DATASETS = ("cifar10", "cifar100", "mnist", "nyuv2")


@dataclass
class DataConfig:
    name: str  # cifar10 | cifar100 | mnist (the real-data check) | nyuv2
    root: str | None = None
    synthetic: bool = False  # write CIFAR-format pickles under `root` first (smoke)
    num_classes: int = 10
    train_size: int = 50_000  # |D_train|: the buffer is rho * train_size (spec b.7(i))
    image_size: int = 32
    normalize: str = "cifar10"  # Fast's NORMALIZE_DICT key: the teacher's input normalisation
    crop_padding: int = 4  # the teacher's training crop/flip, also the inversion and KD view (spec b.3)
    hflip: bool = True
    in_chans: int = 3  # the teacher's input channels; a grey (synthesis.nc = 1) image is repeated to them
    train_per_class: int = 64  # synthetic only
    test_per_class: int = 16
    resize: int = 256  # NYUv2: shorter side resized to this (image_size is the training crop), spec d.3
    ignore_index: int = 255  # NYUv2 void label


@dataclass
class ModelConfig:
    teacher: str
    student: str
    teacher_checkpoint: str | None = None


@dataclass
class TeacherTrainingConfig:
    """The teacher trained first when none is given (synthetic smoke data, the MNIST check only)."""

    epochs: int = 8
    global_batch: int = 64
    lr: float = 0.05
    workers: int = 2  # data-loading processes (the KD loop itself needs none: its "dataset" is the step index)


@dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    teacher_training: TeacherTrainingConfig
    method: dict[str, Any]
    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    logger: LoggerConfig


def parse(cfg: DictConfig) -> RunConfig:
    """Validate every group; a wrong key or value is a one-line error naming it."""
    run = validate_groups(cfg, RunConfig, method=OmegaConf.to_container(cfg.method, resolve=True))
    validate_method(run.method)
    if run.data.name not in DATASETS:
        raise UserError(f"config data.name={run.data.name!r}: valid: {', '.join(DATASETS)}")
    if run.data.normalize not in NORMALIZE_DICT:
        raise UserError(f"config data.normalize={run.data.normalize!r}: valid: {', '.join(NORMALIZE_DICT)}")
    for key in ("teacher", "student"):
        if getattr(run.model, key) not in model_names():
            raise UserError(f"config model.{key}={getattr(run.model, key)!r}: valid: {', '.join(model_names())}")
    seg = bool(run.method.get("segmentation_reading", False))
    if run.data.name == "nyuv2" and not seg:
        raise UserError("NYUv2 distillation runs our reading of spec d.3 (per-pixel KL at tau, image-level phi and "
                        "L_oh; SSD-KD's is not public): set method.segmentation_reading=true to run it")
    if seg and run.data.name != "nyuv2":
        raise UserError(f"config method.segmentation_reading=true is for data=nyuv2, got data.name={run.data.name!r}")
    for key in ("teacher", "student"):
        if (getattr(run.model, key) in SEGMENTATION_MODEL_DICT) != (run.data.name == "nyuv2"):
            raise UserError(f"config model.{key}={getattr(run.model, key)!r} does not fit data.name="
                            f"{run.data.name!r} (DeepLabV3 for NYUv2, a classifier otherwise)")
    if run.trainer.epochs <= int(run.method["warmup"]):
        raise UserError(f"config trainer.epochs={run.trainer.epochs} counts the warm-up too: it must exceed "
                        f"method.warmup={run.method['warmup']}")
    if run.trainer.precise_bn_batches:
        raise UserError("config trainer.precise_bn_batches: data-free KD has no real training images to "
                        "re-estimate BatchNorm statistics from; leave it 0")
    return run


def mean_std(cfg: DataConfig, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The teacher's normalisation (Fast's NORMALIZE_DICT), repeated to `channels` for grey data."""
    n = NORMALIZE_DICT[cfg.normalize]
    mean, std = tuple(n["mean"]), tuple(n["std"])
    return (mean * channels, std * channels) if len(mean) == 1 else (mean, std)


def build_data(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(real training set, real held-out set). The training set only trains a teacher here (smoke, MNIST) or
    feeds KD on real data; students of data-free rows never see it. Nothing is downloaded."""
    mean, std = mean_std(cfg)
    if cfg.root is None:
        hint = ("the folder of the MNIST IDX files (e.g. ../shared/data/mnist)" if cfg.name == "mnist" else
                f"the folder holding cifar-{cfg.name[5:]}-{'batches-py' if cfg.num_classes == 10 else 'python'}/")
        raise UserError(f"config data.root is not set: pass data.root=<{hint}>, or profile=smoke for synthetic data")
    if cfg.name == "mnist":  # t10k: 8,000 train (the teacher's), 2,000 held out (DESIGN s.3)
        tr, te = split_indices(10_000, 8_000, seed=0)
        tf = {"to_rgb": True, "mean": mean, "std": std}
        train_tf = build_transforms("mnist", True, cfg.image_size, padding=cfg.crop_padding, **tf)
        return (MNIST.from_root(cfg.root, "test", train_tf, indices=tr),
                MNIST.from_root(cfg.root, "test", build_transforms("mnist", False, cfg.image_size, **tf), indices=te))
    if cfg.synthetic:  # rank 0 writes, the others wait (torchrun)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            if cfg.name == "nyuv2":
                write_synthetic_nyuv2(cfg.root, cfg.train_per_class, cfg.test_per_class, seed=0)
            else:
                write_synthetic_cifar(cfg.root, cfg.num_classes, cfg.train_per_class, cfg.test_per_class, seed=0)
        barrier()
    if cfg.name == "nyuv2":  # Fast's pipeline (spec d.3): resize 256, 128 crops + flip; test: resize, full image
        return (NYUv2(cfg.root, "train", NYUv2Transform(True, cfg.resize, cfg.image_size)),
                NYUv2(cfg.root, "test", NYUv2Transform(False, cfg.resize)))
    train_tf = build_transforms(cfg.name, True, cfg.image_size, mean=mean, std=std, padding=cfg.crop_padding,
                                hflip=0.5 if cfg.hflip else 0.0)
    test_tf = build_transforms(cfg.name, False, cfg.image_size, mean=mean, std=std)
    return (CIFAR(cfg.root, cfg.num_classes, "train", train_tf), CIFAR(cfg.root, cfg.num_classes, "test", test_tf))


def real_images(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """uint8 (N, 3, H, W) images and labels of a CIFAR set (KD on real data, spec d.5 item 6)."""
    data = getattr(dataset, "data", None)
    if data is None or data.ndim != 4:
        raise UserError("method kd_real reads CIFAR images (data.name=cifar10/cifar100)")
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(dataset.targets)  # type: ignore[attr-defined]


class StepIndex(Dataset):
    """The loop's "dataset" for data-free KD: `steps * batch` indices; the images come from the method's store."""

    def __init__(self, steps: int, batch: int) -> None:
        self.n = steps * batch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class DataFreeTask(ClassificationTask):
    """A training step is the distiller's KD step on replayed images (the batch only sets its size);
    evaluation is top-1 of the student on real held-out images."""

    def losses(self, method: nn.Module, batch: Any) -> dict[str, Tensor]:
        return method.kd_step(len(batch))  # type: ignore[operator]

    def inputs(self, batch: Any) -> Any:
        raise UserError("data-free KD has no real training inputs (trainer.precise_bn_batches must be 0)")


class DataFreeSegmentationTask(SegmentationTask):
    """NYUv2 (spec d.3): the same KD step on replayed images; evaluation is the student's mIoU (13 classes, void
    ignored) on the real test images at full resolution."""

    losses = DataFreeTask.losses
    inputs = DataFreeTask.inputs


def build_task(cfg: DataConfig) -> ClassificationTask | SegmentationTask:
    if cfg.name == "nyuv2":
        return DataFreeSegmentationTask(cfg.num_classes, ignore_index=cfg.ignore_index)
    return DataFreeTask(num_classes=cfg.num_classes)


class DataFreeEpoch(Hook):
    """The epoch's inversion before its first KD step, the KD-step timer, and the time accounting (spec d.6)."""

    def __init__(self, distiller: HarnessDistiller, env: DistEnv) -> None:
        self.d, self.env = distiller, env

    def on_epoch_start(self, progress: Progress) -> None:
        log = self.d.epoch_log
        if progress.epoch > 0 and (not log or log[-1]["epoch"] < progress.epoch - 1):
            self._close_epoch(progress.epoch - 1)
        self.d.synthesize_epoch(progress.epoch)

    def on_step_start(self, progress: Progress) -> None:
        self.d.engine.timer.start("kd")

    def on_step_end(self, progress: Progress) -> None:
        self.d.engine.timer.stop("kd")

    def _close_epoch(self, epoch: int) -> None:
        self.d.epoch_log.append({"epoch": float(epoch), **self.d.accounting()})

    def log_values(self) -> dict[str, float]:
        return self.d.accounting()

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        if self.d.synthesized_epoch >= 0 and (not self.d.epoch_log or
                                              self.d.epoch_log[-1]["epoch"] < self.d.synthesized_epoch):
            self._close_epoch(self.d.synthesized_epoch)
        metrics.update(self.d.accounting())
        extra["time_accounting"] = {"per_epoch": list(self.d.epoch_log), "device": device_name(self.env.device),
                                    "evaluation_timed": False, "device_synchronised": True}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def get_teacher(r: RunConfig, train_set: Dataset, val_set: Dataset, out: Path, env: DistEnv,
                config_dict: dict[str, Any]) -> nn.Module:
    """The frozen teacher: `model.teacher_checkpoint`, or (synthetic / MNIST data only) trained here first."""
    arch, nc = r.model.teacher, r.data.num_classes
    if r.model.teacher_checkpoint is not None:
        return load_teacher(r.model.teacher_checkpoint, arch, nc)
    if r.data.name == "nyuv2":
        raise UserError(f"config model.teacher_checkpoint is not set: pass the NYUv2 {arch} teacher (a VainF/Fast "
                        "DeepLabV3 state dict); segmentation teachers are not trained here")
    if not (r.data.synthetic or r.data.name == "mnist"):
        raise UserError(f"config model.teacher_checkpoint is not set: pass the {arch} teacher (Fast/CMI "
                        f"checkpoints/pretrained/{r.data.name}_{arch}.pth, spec d.1)")
    teacher_dir = out / "teacher"
    if not (teacher_dir / "FINISHED").is_file():
        teacher_dir.mkdir(parents=True, exist_ok=True)
        t = r.teacher_training
        net = create_model(arch, nc)
        tcfg = dataclasses.replace(r.trainer, epochs=t.epochs, global_batch=t.global_batch, max_steps=None,
                                   workers=t.workers)
        # teacher_training.lr is the lr at its own batch: the KD lr scaling (optim.base_batch) must not touch it
        # (it scaled 0.05 to 0.0125 and left the MNIST teacher at 85% after 3 epochs, measured)
        ocfg = dataclasses.replace(r.optim, lr=t.lr, base_batch=None)
        trainer = Trainer(Classifier(net), train_set, val_set, tcfg, ocfg,
                          ScheduleConfig(name="cosine", per_step=True), teacher_dir, env,  # type: ignore[arg-type]
                          task=ClassificationTask(), model=net, logger_cfg=r.logger, config_dict=config_dict)
        trainer.fit()
    barrier()
    return load_teacher(teacher_dir / "best.pt", arch, nc)


# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    parse, CLASSIFICATION_OPTIONS,
    "data-free KD trains on synthesized images with the KD loss only and does not use it")


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    """Train one row; returns the final metrics (also in result.json) and the run directory."""
    r = check_config(cfg)
    env = init_distributed(r.trainer.device)
    out = run_dir(cfg, "ssdkd", cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    config_dict = as_dict(cfg)
    train_set, val_set = build_data(r.data)
    teacher = get_teacher(r, train_set, val_set, out, env, config_dict).to(env.device)
    task = build_task(r.data)
    loader = eval_loader(val_set, r.trainer.eval_batch or 256, env, r.trainer.workers, getattr(task, "collate", None))
    score = task.evaluate(teacher, loader, EvalContext(env))  # the teacher is checked before distilling (item 7)
    teacher_score = score[task.primary]
    if env.is_main:
        print(f"teacher {r.model.teacher}: {task.primary} {teacher_score:.2f}", flush=True)

    torch.manual_seed(r.trainer.seed)  # the student init depends only on the seed: same for every method
    student = create_model(r.model.student, r.data.num_classes).to(env.device)
    torch.manual_seed(r.trainer.seed + 1)
    composed = {**config_dict, "method": r.method}
    if r.method["name"] == "kd_real":
        images, labels = real_images(train_set)
        engine = build_real_kd(composed, teacher, student, images, labels, env.device)
    else:
        engine = build_method(composed, teacher, student, env.device)
    distiller = HarnessDistiller(engine)

    steps = engine.kd_steps
    warmup = int(r.method["warmup"])
    trainer_cfg = dataclasses.replace(r.trainer, epochs=r.trainer.epochs - warmup)
    info = RunInfo("ssdkd", cfg.name, cfg.get("row"), r.data.name, synthetic=r.data.synthetic,
                   profile=str(cfg.get("profile", "full")), data_root=r.data.root)
    trainer = Trainer(distiller, StepIndex(steps, r.trainer.global_batch), val_set, trainer_cfg, r.optim, r.schedule,
                      out, env, task=task, model=student,
                      hooks=[DataFreeEpoch(distiller, env)], params=list(student.parameters()),
                      logger_cfg=r.logger, config_dict=config_dict, run_info=info)
    trainer.record_extra.update(**{f"teacher_{task.primary}": teacher_score}, method=r.method["name"],
                                warmup_epochs=warmup, kd_steps_per_epoch=steps, kd_epochs=trainer_cfg.epochs)
    metrics = trainer.fit()
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
