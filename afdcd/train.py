"""Train one Af-DCD table row (baseline, CE + KD or Af-DCD student) on the common loop, or evaluate a teacher row.

    python -m afdcd.train experiment=cityscapes_deeplabv3_mobilenetv2_afdcd data.root=/data/cityscapes \
        model.teacher_checkpoint=deeplabv3_resnet101_citys_best_model.pth model.student_init=mobilenetv2-imagenet.pth
    torchrun --nproc_per_node=8 -m afdcd.train experiment=voc_deeplabv3_resnet18_afdcd data.root=/data/voc ...
    python -m afdcd.train experiment=cityscapes_deeplabv3_resnet18_baseline profile=smoke      # CPU, synthetic
    python -m afdcd.train experiment=cityscapes_teacher_deeplabv3_resnet101 data.root=... checkpoint=...  # eval

The loop is `common.engine.Trainer` with `common.tasks.SegmentationTask`: the iteration budget (40k), poly lr,
validation every 800 iterations on the whole split (best.pt and last.pt kept; the record holds the selected
and the last mIoU), clipping of the Af-DCD loss module's gradients only (b.4), student SyncBN under multi-GPU
DDP. A distilled run first scores its teacher on the evaluation split (`teacher_mIoU`). Without a teacher
checkpoint a distilled run stops with one line (the smoke runs of `afdcd.reproduce` train one first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from common.config import (
    CLASSIFICATION_OPTIONS,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    Selection,
    TrainerConfig,
    as_dict,
    hydra_main,
    refusing_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.data.segmentation import majority_class_miou, write_synthetic_segmentation
from common.dist import DistEnv, barrier, cleanup, init_distributed
from common.engine import Hook, RunInfo, Trainer, eval_loader, resolve_amp
from common.errors import UserError
from common.results import data_kind
from common.tasks import EvalContext, SegmentationTask

from .config import (
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    build_distiller,
    check_data,
    check_method,
    check_model,
)
from .data import build_dataset

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("train", "eval")


@dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    evaluation: EvalConfig
    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    logger: LoggerConfig


def parse(cfg: DictConfig) -> RunConfig:
    """Validate every group before anything is written; a wrong key or value is one line naming it."""
    if cfg.get("task") not in TASKS:
        raise UserError(f"config task={cfg.get('task')!r}: choose one of {', '.join(TASKS)}")
    return validate_groups(cfg, RunConfig, data=check_data(cfg.data), model=check_model(cfg.model),
                           method=check_method(cfg.method))


def prepare_data(d: DataConfig, env: DistEnv) -> None:
    """The smoke profile's synthetic dataset, written once in the real layout (rank 0; the others wait)."""
    if d.root is None:
        from common.data.segmentation import LAYOUTS

        raise UserError(f"config data.root is not set: pass data.root=<{LAYOUTS[d.name].description}> (spec f.2), "
                        "or profile=smoke for synthetic data")
    if d.synthetic and env.is_main:
        from common.data.segmentation import LAYOUTS

        splits = [s for s in LAYOUTS[d.name].splits if s != "trainval"]
        sizes = {s: d.synthetic_images[0] if s == "train" else d.synthetic_images[1] for s in splits}
        h, w = d.synthetic_size
        write_synthetic_segmentation(d.name, d.root, d.num_classes, sizes, h, w, seed=0)
    barrier()


def build_sets(d: DataConfig, train: bool = True) -> tuple[Dataset | None, Dataset, Dataset | None]:
    """(train, evaluation, selection) sets; selection is None when it is the evaluation split (spec k.5)."""
    assert d.root is not None
    train_set = build_dataset(d.name, d.root, d.train_split, tuple(d.crop), d.num_classes, d.train_list) \
        if train else None
    eval_set = build_dataset(d.name, d.root, d.eval_split, None, d.num_classes, d.eval_list)
    select = None if d.selection_split == d.eval_split else build_dataset(d.name, d.root, d.selection_split, None,
                                                                          d.num_classes)
    return train_set, eval_set, select


def segmentation_task(r: RunConfig) -> SegmentationTask:
    return SegmentationTask(r.data.num_classes, ignore_index=-1, scales=r.evaluation.scales, flip=r.evaluation.flip)


class LastAndBest(Hook):
    """Record the last evaluation next to the selected (best) one: `last_mIoU`, ... (spec j: report both)."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        assert self.trainer is not None
        history = self.trainer.history
        if history:
            metrics.update({f"last_{k}": v for k, v in history[-1].items() if k != "epoch" and "/" not in k})


# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    parse, CLASSIFICATION_OPTIONS,
    "Af-DCD's segmentation training does not use it")


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    """Train (or, task=eval, evaluate) one row; returns the final metrics and the run directory."""
    r = check_config(cfg)
    if cfg.task == "eval":
        from .eval import run as evaluate_row

        return evaluate_row(cfg)
    env = init_distributed(r.trainer.device)
    prepare_data(r.data, env)
    train_set, eval_set, select_set = build_sets(r.data)
    assert train_set is not None
    if r.method.name != "baseline" and r.model.teacher_checkpoint is None:
        raise UserError(f"config model.teacher_checkpoint is not set: pass the CIRKD {r.model.teacher} checkpoint "
                        "(deeplabv3_resnet101_<dataset>_best_model.pth, spec d) or a best.pt of ours; "
                        "`python -m afdcd.reproduce` (smoke) trains a small teacher first")
    torch.manual_seed(r.trainer.seed)
    method = build_distiller(r.model, r.method, r.data.num_classes)  # a wrong teacher stops here, before any write
    out = run_dir(cfg, "afdcd", cfg.name)
    if env.is_main:
        save_resolved(cfg, out)
    if env.distributed and env.device.type == "cuda" and r.model.sync_bn:  # b.4 (SyncBN needs GPUs)
        method.student = nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
    task = segmentation_task(r)
    extra: dict[str, Any] = {"majority_mIoU": majority_class_miou(eval_set),  # type: ignore[arg-type]
                             "params_student": sum(p.numel() for p in method.student_parameters()),
                             "params_loss_module": sum(p.numel() for p in method.extra_parameters())}
    if method.teacher is not None:  # check the teacher before distilling (a wrong checkpoint shows here)
        method.teacher.to(env.device)
        loader = eval_loader(eval_set, 1, env, r.trainer.workers, task.collate)
        ctx = EvalContext(env, resolve_amp(r.trainer.amp, env.device))
        extra["teacher_mIoU"] = task.evaluate(method.teacher, loader, ctx)["mIoU"]
        if env.is_main:
            print(f"teacher {r.model.teacher}: mIoU {extra['teacher_mIoU']:.2f} on {r.data.name} {r.data.eval_split}")
    trainer_cfg = r.trainer
    if select_set is not None and trainer_cfg.selection == Selection.best_test:
        trainer_cfg.selection = Selection.best_heldout  # data.selection_split says where best.pt is chosen
    # b.4: clip_grad applies to the loss module alone; without one (baseline, KD) nothing is clipped
    clip = method.clip_parameters()
    if not clip:
        trainer_cfg.clip_grad = None
    info = RunInfo("afdcd", cfg.name, cfg.get("row"), r.data.name, data_kind(r.data.name, r.data.root) == "synthetic"
                   or r.data.synthetic, str(cfg.get("profile", "full")))
    hook = LastAndBest()
    params = [p for p in method.parameters() if p.requires_grad]  # student + loss module; the teacher is frozen
    trainer = Trainer(method, train_set, eval_set, trainer_cfg, r.optim, r.schedule, out, env, task=task,
                      model=method.eval_model(), heldout_set=select_set, hooks=[hook], params=params,
                      clip_params=clip, logger_cfg=r.logger, config_dict=as_dict(cfg), run_info=info,
                      checkpoint_meta={"arch": {"name": r.model.student, "num_classes": r.data.num_classes,
                                                "width": r.model.width, "dataset": r.data.name}})
    hook.trainer = trainer
    trainer.record_extra.update(extra)
    metrics = trainer.fit()
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
