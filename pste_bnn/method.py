"""The two-step training object (mdistiller shape) and the official optimiser groups / schedule (spec d.1, d.2).

`SubBitDistiller(student, teacher)`: KD-only from a frozen ResNet-34 (official `DistributionLoss`,
-sum softmax(t) log_softmax(s), temperature 1), or cross-entropy when no teacher is given (our CIFAR /
mini readings). Step 2 drives the global selection schedule from `on_step_start` and logs each layer's
selected ids and how many changed per epoch (d.2).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import load_checkpoint, load_foreign_state_dict
from common.errors import UserError

from .models import SubBitNet, teacher_resnet34
from .sparks import PermutationSelector


def distribution_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Official `utils.py::DistributionLoss`: -sum_c softmax(teacher)_c log_softmax(student)_c, batch mean."""
    return -(F.softmax(teacher_logits.detach(), dim=1) * F.log_softmax(student_logits, dim=1)).sum(1).mean()


class SubBitDistiller(nn.Module):
    """Student Bi-Real net + optional frozen teacher; `forward_train` -> (logits, {"loss_kd" | "loss_ce"})."""

    def __init__(self, student: SubBitNet, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._last_ids: dict[str, list[int]] = {}

    def train(self, mode: bool = True) -> SubBitDistiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def forward_train(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        if self.teacher is None:
            return logits, {"loss_ce": F.cross_entropy(logits, targets)}
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return logits, {"loss_kd": distribution_loss(logits, teacher_logits)}

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Advance the global t / gamma schedule (b.8) before every step-2 optimiser step."""
        schedule = getattr(self.student, "selection_schedule", None)
        if schedule is not None:
            schedule.set_step(step, total_steps)

    @torch.no_grad()
    def selection_log(self) -> dict[str, dict[str, Any]]:
        """Per Sparks layer: the inference ids Hungarian(X)[:n] and how many changed since the last call (d.2)."""
        out = {}
        for name, mod in self.student.named_modules():
            if isinstance(mod, PermutationSelector):
                ids = mod.frozen_ids().tolist()
                prev = self._last_ids.get(name)
                out[name] = {"ids": ids, "changed": None if prev is None else len(set(ids) - set(prev))}
                self._last_ids[name] = ids
        return out

    def on_epoch_start(self, epoch: int, num_epochs: int) -> dict[str, dict[str, Any]]:
        return self.selection_log()

    def eval_model(self) -> nn.Module:
        return self.student


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_x_mult: float = 10.0) -> list[dict[str, Any]]:
    """Official Adam groups (d.1): 'weights' = 4-D tensors or names containing 'conv' (SNN patterns too) with
    `weight_decay`; everything else without; Sparks X logits apart at lr_x_mult x lr, no decay (b.8)."""
    weights, others, logits = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("selector.logits"):
            logits.append(p)
        elif p.ndim == 4 or "conv" in name:
            weights.append(p)
        else:
            others.append(p)
    groups = [{"params": others, "lr": lr, "weight_decay": 0.0, "name": "other"},
              {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if logits:
        groups.append({"params": logits, "lr": lr * lr_x_mult, "weight_decay": 0.0, "name": "selection_logits"})
    return groups


def official_lr_lambda(epochs: int):
    """LambdaLR factor 1 - e/epochs, stepped at the START of each epoch: epoch e trains at lr (1 - (e+1)/E) (d.1)."""
    return lambda e: 1.0 - e / epochs


def epoch_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The lr epoch `epoch` (0-based) trains at under the official start-of-epoch `scheduler.step()`."""
    return base_lr * (1.0 - (epoch + 1) / epochs)


def load_teacher(path: str | os.PathLike, num_classes: int = 1000) -> nn.Module:
    """The frozen KD teacher from a local torchvision ResNet-34 file; anything else is a one-line error."""
    if path is None or not os.path.isfile(path):
        raise UserError(f"teacher checkpoint {path} not found; pass method.teacher=/path/to/resnet34.pth "
                        "(torchvision ResNet-34 ImageNet weights, spec c)")
    try:
        state = load_checkpoint(path)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except UserError:
        state = load_foreign_state_dict(path)
    teacher = teacher_resnet34(num_classes)
    own = teacher.state_dict()
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or len(state) != len(own):
        raise UserError(f"teacher {path} is not a torchvision ResNet-34 ({len(bad)} keys missing or mis-shaped, "
                        f"e.g. {bad[:3]}); the recipe distils from ResNet-34 (spec d.1)")
    teacher.load_state_dict(state)
    return teacher.eval().requires_grad_(False)
