"""Typed schemas of afdcd's own config groups (model/, data/, method/) and the builders they drive.

`validate` (common.config) turns an unknown key or a wrongly typed value into one line naming the key;
`check` adds the choices and ranges. `build_distiller(model, method, num_classes)` builds student, teacher and
loss module exactly as a table row says; the trainer/optim/schedule groups belong to the common harness.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import check_choice, validate
from common.data.segmentation import LAYOUTS
from common.errors import UserError

from .afdcd import CONTRAST_MODES, GENERATORS, MASK_MODES, AfDCDLoss
from .convert import load_imagenet_backbone, load_model
from .distiller import SegDistiller
from .models import MODEL_NAMES, create_model

METHODS = ("baseline", "kd", "afdcd")


@dataclass
class LossModuleConfig:
    """`AfDCDLoss` arguments (spec b.2-b.3, b.5); the defaults are the official constructor's."""

    tau: float = 0.07
    groups: int = 16
    patch_size: list[int] = field(default_factory=lambda: [4, 4])
    pool_size: int = 4
    crop: int | None = None  # CamVid: 44 with pool_size 0 (the official dataset == 'camvid' branch)
    mask: str = "random"  # random | centre
    mask_ratio: float = 0.75
    generator: str = "plain"  # plain | enhanced
    contrast: str = "omni"  # omni | omni_all (k.3) | spatial | channel (ablations)
    align_conv: bool = False  # C_s == C_t only: a 1x1 conv instead of identity


@dataclass
class MethodConfig:
    """The b.1 objective: which terms are on and their weights."""

    name: str = "afdcd"  # baseline (CE + aux) | kd (+ pixel KD) | afdcd (+ L_fm + L_ctr)
    aux_weight: float = 0.4
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    fm_weight: float = 2e-6
    ctr_weight: float = 5e-3
    loss: LossModuleConfig = field(default_factory=LossModuleConfig)


@dataclass
class ModelConfig:
    student: str = "deeplabv3_resnet18"
    teacher: str | None = "deeplabv3_resnet101"
    teacher_checkpoint: str | None = None  # the CIRKD teacher (`deeplabv3_resnet101_<dataset>_best_model.pth`)
    student_init: str | None = None  # CSAIL ImageNet backbone (`resnet18-imagenet.pth` / `mobilenetv2-...`)
    aux: bool | None = None  # None: the official setting (ResNet models with aux head, MBV2 without)
    width: float = 1.0  # ResNet channel width of the student (< 1: the smoke profile's CPU-sized networks only)
    teacher_width: float = 1.0  # the same for a teacher trained here (a checkpoint says its own width)
    sync_bn: bool = True  # student SyncBatchNorm under multi-GPU DDP (b.4); the teacher keeps plain BN in eval


@dataclass
class EvalConfig:
    """Whole-image evaluation (spec d): scales whose upsampled logits are averaged, and horizontal flip."""

    scales: list[float] = field(default_factory=lambda: [1.0])  # [1.0]: the assumed reporting (k.7)
    flip: bool = False


@dataclass
class DataConfig:
    name: str = "cityscapes"
    root: str | None = None
    num_classes: int = 19
    crop: list[int] = field(default_factory=lambda: [512, 1024])
    train_split: str = "train"
    eval_split: str = "val"  # the reported split
    selection_split: str = "val"  # where the best checkpoint is chosen (CamVid release: test, spec k.5)
    train_list: str | None = None
    eval_list: str | None = None
    synthetic: bool = False  # write (once) and read a small learnable dataset in this layout at `root` (smoke)
    synthetic_size: list[int] = field(default_factory=lambda: [64, 64])  # (height, width) of synthetic images
    synthetic_images: list[int] = field(default_factory=lambda: [256, 64])  # train, and every other split


def check_method(cfg: Any) -> MethodConfig:
    """Validate `method` (types, choices, ranges); one line naming the key."""
    m = validate(cfg, MethodConfig, "method.")
    check_choice("method.name", m.name, METHODS)
    check_choice("method.loss.mask", m.loss.mask, MASK_MODES)
    check_choice("method.loss.generator", m.loss.generator, GENERATORS)
    check_choice("method.loss.contrast", m.loss.contrast, CONTRAST_MODES)
    if not 0.0 <= m.loss.mask_ratio < 1.0:
        raise UserError(f"config method.loss.mask_ratio={m.loss.mask_ratio}: the removed fraction, in [0, 1)")
    if len(m.loss.patch_size) != 2 or min(m.loss.patch_size) < 1:
        raise UserError(f"config method.loss.patch_size={m.loss.patch_size}: two positive integers (N_h, N_w)")
    for key in ("aux_weight", "kd_weight", "fm_weight", "ctr_weight"):
        if getattr(m, key) < 0:
            raise UserError(f"config method.{key}={getattr(m, key)}: must be >= 0")
    if m.kd_temperature <= 0 or m.loss.tau <= 0:
        raise UserError("config method.kd_temperature and method.loss.tau must be > 0")
    return m


def check_model(cfg: Any) -> ModelConfig:
    m = validate(cfg, ModelConfig, "model.")
    check_choice("model.student", m.student, MODEL_NAMES)
    for key in ("width", "teacher_width"):
        if not 0 < getattr(m, key) <= 1:
            raise UserError(f"config model.{key}={getattr(m, key)}: a channel width in (0, 1] (1 = spec c)")
    if m.teacher is not None:
        check_choice("model.teacher", m.teacher, MODEL_NAMES)
    for key in ("teacher_checkpoint", "student_init"):
        path = getattr(m, key)
        if path is not None and not Path(path).expanduser().is_file():
            raise UserError(f"config model.{key}: no file at {path}")
    return m


def check_data(cfg: Any) -> DataConfig:
    d = validate(cfg, DataConfig, "data.")
    check_choice("data.name", d.name, tuple(LAYOUTS))
    for key in ("train_split", "eval_split", "selection_split"):
        check_choice(f"data.{key}", getattr(d, key), tuple(LAYOUTS[d.name].splits))
    if len(d.crop) != 2 or min(d.crop) < 8:
        raise UserError(f"config data.crop={d.crop}: (height, width), each >= 8")
    if len(d.synthetic_size) != 2 or len(d.synthetic_images) != 2 or min(*d.synthetic_size, *d.synthetic_images) < 1:
        raise UserError(f"config data.synthetic_size={d.synthetic_size}, data.synthetic_images="
                        f"{d.synthetic_images}: two positive integers each")
    if not 1 <= d.num_classes <= LAYOUTS[d.name].num_classes:
        raise UserError(f"config data.num_classes={d.num_classes}: {d.name} has {LAYOUTS[d.name].num_classes}")
    return d


def build_loss_module(student_channels: int, teacher_channels: int, loss: LossModuleConfig) -> AfDCDLoss:
    kwargs = asdict(loss)
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    try:
        return AfDCDLoss(student_channels, teacher_channels, **kwargs)
    except ValueError as err:
        raise UserError(f"config method.loss: {err}") from None


def build_distiller(model: ModelConfig, method: MethodConfig, num_classes: int,
                    device: torch.device | str | None = None) -> SegDistiller:
    """Student (+ ImageNet init), teacher (from its checkpoint, checked against the row), loss module.

    A missing teacher checkpoint leaves a randomly initialised teacher: only the smoke profile, which trains
    its own teacher first, may ask for that (`model.teacher_checkpoint: null`).
    """
    with torch.device(device) if device is not None else nullcontext():
        student = create_model(model.student, num_classes, model.aux, model.width)
    if model.student_init:
        load_imagenet_backbone(student, model.student_init)
    if method.name == "baseline":
        return SegDistiller(student, aux_weight=method.aux_weight)
    if model.teacher is None:
        raise UserError(f"config method.name={method.name} needs model.teacher")
    if model.teacher_checkpoint:
        teacher = load_model(model.teacher_checkpoint, name=model.teacher, num_classes=num_classes)
    else:
        with torch.device(device) if device is not None else nullcontext():
            teacher = create_model(model.teacher, num_classes, width=model.teacher_width)
    loss_module = None
    if method.name == "afdcd":
        with torch.device(device) if device is not None else nullcontext():
            loss_module = build_loss_module(student.c4_channels, teacher.c4_channels, method.loss)
    return SegDistiller(student, teacher, loss_module, aux_weight=method.aux_weight,
                        kd_weight=method.kd_weight, kd_temperature=method.kd_temperature,
                        fm_weight=method.fm_weight, ctr_weight=method.ctr_weight)
