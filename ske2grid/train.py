"""Train a Ske2Grid (or ST-GCN) row on a pyskl skeleton pickle, then run the 10-clip test.

    python -m ske2grid.train experiment=ske2grid_d5_ntu60_xsub_hrnet data.root=/data/pyskl
    python -m ske2grid.train experiment=ske2grid_d8_pls_ntu60_xsub_hrnet data.root=/data/pyskl   # D5->D6->D7->D8
    python -m ske2grid.train experiment=ske2grid_d5_ntu60_xsub_hrnet profile=smoke                # synthetic, CPU
    torchrun --nproc_per_node=4 -m ske2grid.train experiment=... data.root=...   # same global batch 64

Runs on the common loop (`common.engine.Trainer`) with `common.tasks.MultiClipClassificationTask`: SGD Nesterov,
weight decay on all parameters, per-step cosine, 80 passes, 1-clip validation every 5 passes selecting `best.pt`
(on the evaluation split as released, `trainer.selection=best_test`; `trainer.selection=best_heldout` holds out
`data.heldout_fraction` of the training split instead). After training, the 10-clip test (clips folded into the
batch, softmax averaged) scores the selected and the last weights: `top1`, `top5`, `mean_class_accuracy` and
their `last_*` twins are the record's metrics; the 1-clip validation of the selected weights is `val1clip_*`.

PLS (spec §b.4): a row with `method.parent` starts from the parent's best checkpoint (`method.parent_checkpoint`,
else the newest finished run of the parent with the same data, sizes and recipe under `output_dir`, else the
parent is trained first, recursively, with the same overrides). Earlier UPT/GIT pairs are frozen in the model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.checkpoint import load_checkpoint
from common.config import (
    CLASSIFICATION_OPTIONS,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    Selection,
    TrainerConfig,
    check_choice,
    compose,
    hydra_main,
    refusing_unused_trainer_options,
    run_dir,
    save_resolved,
    validate_groups,
)
from common.data.base import write_marker
from common.dist import DistEnv, barrier, cleanup, init_distributed
from common.engine import Hook, RunInfo, Trainer, eval_loader, resolve_amp, resolve_channels_last
from common.errors import UserError
from common.tasks import EvalContext, MultiClipClassificationTask
from ske2grid.data import SkeletonClips, SkeletonPipeline
from ske2grid.method import SkeletonRecognizer
from ske2grid.models import MODELS, model_from_config
from ske2grid.pls import load_parent

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER = "ske2grid"
CLIP_DIMS = 4  # one clip: (M, T, V, C)
TOP_LEVEL = {"paper", "name", "row", "output_dir", "checkpoint", "checkpoint_key", "profile", "model", "data",
             "method", "optim", "schedule", "trainer", "logger", "hydra"}


# ----------------------------------------------------------------------------------------------------
# The paper's own config schemas (trainer / optim / schedule / logger are common's)
# ----------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "ske2grid"
    grid_shape: list[int] | None = None  # ske2grid only, e.g. [5, 5]
    progressive_joint_seq: list[int] | None = None  # ske2grid only: [n_0 = V, n_1, ..., n_{S-1}]
    widths: list[int] | None = None  # null: the released 10-block ST-GCN channel plan


@dataclass
class DataConfig:
    name: str = "ntu60_hrnet"  # a pyskl pickle kind (common.data.skeleton.SKELETON_DATASETS) or synthetic
    root: str | None = None
    ann_file: str | None = None
    dims: int = 2
    layout: str = "coco"
    in_channels: int = 3
    num_classes: int = 60
    train_split: str = "xsub_train"
    val_split: str = "xsub_val"
    test_split: str = "xsub_val"
    clip_len: int = 100
    num_person: int = 2
    val_clips: int = 1
    test_clips: int = 10
    prenorm_mask_low_score: bool = False
    heldout_fraction: float = 0.05  # trainer.selection=best_heldout only: this part of the training split
    train_per_class: int = 60  # synthetic only
    val_per_class: int = 60  # synthetic only
    frames: list[int] = field(default_factory=lambda: [24, 32])  # synthetic only: video length range
    seed: int = 0  # synthetic only


@dataclass
class MethodConfig:
    parent: str | None = None  # PLS: the parent row (experiment name)
    parent_checkpoint: str | None = None  # explicit parent weights (our best.pt); default: found or trained


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
    """Every group checked against its schema (unknown keys, types, ranges): one line naming the key."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    if unknown:
        raise UserError(f"config key {unknown[0]!r} is unknown; top-level keys: {', '.join(sorted(TOP_LEVEL))}")
    c = validate_groups(cfg, Config)
    check_choice("model.name", c.model.name, MODELS)
    if c.model.name == "stgcn" and (c.model.grid_shape or c.model.progressive_joint_seq):
        raise UserError("config model.grid_shape / model.progressive_joint_seq: ST-GCN has no grid (spec §c)")
    if c.model.name == "stgcn" and c.method.parent:
        raise UserError(f"config method.parent={c.method.parent}: PLS grows a Ske2Grid network, not ST-GCN (§b.4)")
    check_choice("data.dims", c.data.dims, (2, 3))
    check_choice("data.layout", c.data.layout, ("coco", "nturgb+d"))
    for key in ("num_classes", "clip_len", "num_person", "val_clips", "test_clips"):
        if getattr(c.data, key) < 1:
            raise UserError(f"config data.{key}={getattr(c.data, key)}: must be at least 1")
    if not 0 < c.data.heldout_fraction < 1:
        raise UserError(f"config data.heldout_fraction={c.data.heldout_fraction}: must be in (0, 1)")
    return c


def model_kwargs(c: Config) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(c.model).items() if v is not None or k == "widths"}


def build_model(c: Config) -> nn.Module:
    """The network of a validated config; a bad grid / cascade is a one-line error naming the keys."""
    try:
        return model_from_config(model_kwargs(c), dataclasses.asdict(c.data))
    except (ValueError, AssertionError) as err:
        raise UserError(f"config model.* ({c.model.name}): {err} (spec §b.4)") from None


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def annotation_file(d: DataConfig) -> Path:
    """The pickle to read; the synthetic one is written on first use (spec §i)."""
    if d.name == "synthetic":
        if d.root is None:
            raise UserError("data.root is not set for the synthetic pickle; pass data.root=<folder>")
        path = Path(d.root) / f"synthetic_coco_{d.train_per_class}x{d.val_per_class}_f{d.frames[0]}-{d.frames[1]}" \
                              f"_s{d.seed}.pkl"
        if not path.is_file():
            from common.data import write_synthetic_skeleton_pickle

            write_synthetic_skeleton_pickle(path, d.train_per_class, d.val_per_class, d.num_classes, d.frames, d.seed)
            write_marker(path.parent, {"writer": "common.data.skeleton.write_synthetic_skeleton_pickle"})
        return path
    if d.ann_file is None or (d.root is None and str(d.ann_file).startswith("None")):
        raise UserError(f"data.root is not set: pass data.root=<folder holding {d.name}.pkl> (pyskl annotation "
                        "pickle, spec §f) or data.ann_file=<file>, or use profile=smoke for synthetic data")
    return Path(d.ann_file)


def skeleton_spec(d: DataConfig) -> Any:
    from common.data.skeleton import SKELETON_DATASETS, SkeletonSpec

    joints = {"coco": 17, "nturgb+d": 25}[d.layout]
    known = SKELETON_DATASETS.get(d.name)
    if known is not None and (known.num_joints, known.dims, known.num_classes) != (joints, d.dims, d.num_classes):
        raise UserError(f"config data.name={d.name}: a {known.num_joints}-joint {known.dims}-D pickle with "
                        f"{known.num_classes} classes, but data.layout={d.layout}, data.dims={d.dims}, "
                        f"data.num_classes={d.num_classes} (spec §f)")
    return SkeletonSpec(d.num_classes, joints, d.dims, ())


def build_datasets(d: DataConfig, selection: Selection, seed: int = 0) -> dict[str, Dataset]:
    """train (1 random clip) / val (1 deterministic clip) / test (`test_clips`) / heldout (best_heldout only)."""
    path, spec = annotation_file(d), skeleton_spec(d)

    def clips(split: str, num_clips: int, test_mode: bool) -> SkeletonClips:
        pipe = SkeletonPipeline(d.dims, d.clip_len, num_clips, test_mode, d.num_person, d.prenorm_mask_low_score)
        return SkeletonClips(path, split, pipe, spec)

    train = clips(d.train_split, 1, False)
    out: dict[str, Dataset] = {"train": train, "val": clips(d.val_split, d.val_clips, True),
                               "test": clips(d.test_split, d.test_clips, True)}
    if selection == Selection.best_heldout:
        order = np.random.default_rng(seed).permutation(len(train.annotations))
        cut = max(1, int(round(d.heldout_fraction * len(order))))
        heldout = clips(d.train_split, d.val_clips, True)
        heldout.annotations = [train.annotations[i] for i in order[:cut]]
        train.annotations = [train.annotations[i] for i in order[cut:]]
        out["heldout"] = heldout
    return out


# ----------------------------------------------------------------------------------------------------
# PLS parent
# ----------------------------------------------------------------------------------------------------
FINGERPRINT = ("data", "optim", "schedule", "profile")
TRAINER_FINGERPRINT = ("epochs", "global_batch", "seed", "selection")


def _fingerprint(cfg: DictConfig | dict) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    fp = {k: c.get(k) for k in FINGERPRINT}
    fp["model"] = c.get("model")
    fp["trainer"] = {k: (c.get("trainer") or {}).get(k) for k in TRAINER_FINGERPRINT}
    return json.loads(json.dumps(fp, default=str))


CHILD_ONLY = ("experiment", "method.parent", "hydra.", "name", "row", "checkpoint", "model.grid_shape",
              "model.progressive_joint_seq")


def parent_config(overrides: Sequence[str], parent: str) -> tuple[DictConfig, list[str]]:
    """The parent row composed with the child's command-line overrides (same data, sizes and recipe), and
    those overrides (the child's own grid, cascade and parent left out)."""
    keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(CHILD_ONLY)]
    cfg = compose(CONFIG_DIR, [f"experiment={parent}", *keep])
    if cfg.get("name") != parent:
        raise UserError(f"config method.parent={parent}: no experiment of that name (configs/experiment/)")
    return cfg, [f"experiment={parent}", *keep]


def finished_run(output_dir: Path, cfg: DictConfig) -> Path | None:
    """The newest complete run of `cfg`'s experiment under `output_dir` with the same fingerprint and a best.pt."""
    want = _fingerprint(cfg)
    runs = sorted((output_dir / PAPER / str(cfg.name)).glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    for result in reversed(runs):
        try:
            record = json.loads(result.read_text())
            saved = OmegaConf.load(result.parent / "config.yaml")
        except (OSError, ValueError):
            continue
        if record.get("complete") and (result.parent / "best.pt").is_file() and _fingerprint(saved) == want:
            return result.parent
    return None


def resolve_parent(cfg: DictConfig, c: Config, out: Path, overrides: Sequence[str]) -> Path | None:
    """The parent's best checkpoint: given, reused from a finished run, or trained now (recursively)."""
    if not c.method.parent:
        return None
    if c.method.parent_checkpoint:
        path = Path(c.method.parent_checkpoint)
        if not path.is_file():
            raise UserError(f"method.parent_checkpoint={path} does not exist; give the parent run's best.pt, or "
                            "leave it unset to reuse or train the parent (spec §b.4)")
        return path
    pcfg, parent_overrides = parent_config(overrides, c.method.parent)
    base = Path(cfg.output_dir)
    found = finished_run(base, pcfg)
    if found is not None:
        print(f"PLS: reusing the finished parent run {found}", flush=True)
        return found / "best.pt"
    parent_dir = base / PAPER / str(pcfg.name) / f"{out.name}-parent-of-{cfg.name}"
    print(f"PLS: no finished run of the parent {pcfg.name}; training it first in {parent_dir}", flush=True)
    run(pcfg, parent_dir, parent_overrides, finalize=False)
    barrier()
    return parent_dir / "best.pt"


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Our run checkpoints hold the recognizer's state (`model.` + the network's keys)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def init_from_parent(net: nn.Module, path: Path) -> None:
    """Load the parent's weights into the child (only the newest pair may be missing; §b.4)."""
    try:
        state = load_checkpoint(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file: one line naming it
        raise UserError(f"PLS parent checkpoint {path} cannot be read ({type(err).__name__}); give the parent "
                        "run's best.pt") from None
    weights = state.get("model", state.get("state_dict")) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"PLS parent checkpoint {path} holds no 'model' state_dict; give the parent run's best.pt")
    load_parent(net, strip_prefix(weights), source=f"PLS parent checkpoint {path}")


# ----------------------------------------------------------------------------------------------------
# The 10-clip test
# ----------------------------------------------------------------------------------------------------
def test_clips(model: nn.Module, dataset: Dataset, task: MultiClipClassificationTask, env: DistEnv,
               batch: int, amp: str = "auto", channels_last: str = "auto", workers: int = 2) -> dict[str, float]:
    """Top-1 / top-5 / mean class accuracy of `model` over `dataset` (multi-clip samples)."""
    ctx = EvalContext(env, resolve_amp(amp, env.device), resolve_channels_last(channels_last, env.device))
    return task.evaluate(model, eval_loader(dataset, batch, env, workers), ctx)


class MultiClipTest(Hook):
    """After training: the multi-clip test of the selected weights and of the last ones (pyskl's test)."""

    def __init__(self, method: nn.Module, test_set: Dataset, task: MultiClipClassificationTask, env: DistEnv,
                 run_dir: Path, c: Config) -> None:
        self.method, self.test_set, self.task, self.env, self.run_dir, self.c = method, test_set, task, env, run_dir, c

    def _test(self) -> dict[str, float]:
        t = self.c.trainer
        batch = t.eval_batch or t.max_device_batch or t.global_batch  # videos; each holds test_clips clips
        return test_clips(self.method, self.test_set, self.task, self.env, batch, t.amp, t.channels_last, t.workers)

    def on_fit_end(self, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        selection = self.c.trainer.selection
        for key in [k for k in metrics if k in ("top1", "top5", "loss", "mean_class_accuracy")
                    or k.startswith("best_")]:
            metrics[f"val1clip_{key}"] = metrics.pop(key)
        barrier()  # rank 0 wrote best.pt / last.pt
        other = "best.pt" if selection == Selection.last else "last.pt"
        selected = self._test()  # the method holds the selected weights (trainer.selection)
        metrics.update(selected)
        same = selection != Selection.last and extra.get("best_epoch") == self.c.trainer.epochs
        prefix = "best_" if selection == Selection.last else "last_"
        if same:  # the selected epoch is the last one: the same weights, no second test
            metrics.update({f"{prefix}{k}": v for k, v in selected.items()})
        elif (self.run_dir / other).is_file():
            current = {k: v.clone() for k, v in self.method.state_dict().items()}
            self.method.load_state_dict(load_checkpoint(self.run_dir / other)["model"])
            metrics.update({f"{prefix}{k}": v for k, v in self._test().items()})
            self.method.load_state_dict(current)
        extra["test_clips"] = self.c.data.test_clips
        extra["test_split"] = self.c.data.test_split
        extra["selected_on"] = {"best_test": f"1-clip top-1 on {self.c.data.val_split} (released)",
                                "best_heldout": f"1-clip top-1 on a held-out {self.c.data.heldout_fraction:.0%} "
                                                f"of {self.c.data.train_split}",
                                "last": "the last epoch"}[str(selection)]


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# the paper's validation, then the shared trainer options this paper never reads (refused by name);
# `hydra_main(check=...)` runs it before Hydra makes the run directory, and `run` again
check_config = refusing_unused_trainer_options(
    validate_config, CLASSIFICATION_OPTIONS,
    "Ske2Grid's training (plain CE on skeleton clips) does not use it")


def run(cfg: DictConfig, out: Path | None = None, overrides: Sequence[str] | None = None,
        finalize: bool = True) -> dict[str, float]:
    """Train one row (its PLS parent first when needed) and run the multi-clip test; returns the metrics."""
    c = check_config(cfg)
    overrides = list(hydra_overrides() if overrides is None else overrides)
    out = Path(out) if out is not None else run_dir(cfg, PAPER, str(cfg.name))
    net = build_model(c)  # a bad grid/cascade fails before anything is written
    splits = build_datasets(c.data, c.trainer.selection, c.trainer.seed)
    env = init_distributed(c.trainer.device)
    parent = resolve_parent(cfg, c, out, overrides)
    torch.manual_seed(c.trainer.seed)
    net = build_model(c)
    if parent is not None:
        init_from_parent(net, parent)  # a parent of the wrong grid or stage count fails before any write
    if env.is_main:
        save_resolved(cfg, out)
    method = SkeletonRecognizer(net)
    task = MultiClipClassificationTask(c.data.num_classes, CLIP_DIMS)
    info = RunInfo(PAPER, str(cfg.name), cfg.get("row"), c.data.name, synthetic=c.data.name == "synthetic",
                   profile=str(cfg.get("profile", "full")), data_root=c.data.ann_file or c.data.root)
    trainer = Trainer(method, splits["train"], splits["val"], c.trainer, c.optim, c.schedule, out, env, task=task,
                      heldout_set=splits.get("heldout"),
                      hooks=[MultiClipTest(method, splits["test"], task, env, out, c)],
                      logger_cfg=c.logger, config_dict=OmegaConf.to_container(cfg, resolve=True), run_info=info,
                      checkpoint_meta={"model_config": model_kwargs(c), "parent": str(parent) if parent else None})
    if parent is not None:
        trainer.record_extra["parent_checkpoint"] = str(parent)
    t0 = time.time()
    metrics = trainer.fit()
    if env.is_main:
        print(f"{cfg.name}: {time.time() - t0:.0f} s, {c.data.test_clips}-clip test top1={metrics['top1']:.2f} "
              f"top5={metrics['top5']:.2f} mean_class_accuracy={metrics['mean_class_accuracy']:.2f}", flush=True)
    if finalize:
        cleanup()
    return metrics


@hydra_main(CONFIG_DIR, check=check_config)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
