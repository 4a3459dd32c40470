"""The Af-DCD training objective (spec b.1), mdistiller style:

    L = CE(up(z_s), y) + 0.4 CE(up(a_s), y) [ResNet students] + l_kd KD(z_s, z_t) + l_fd L_fm + l_ctr L_ctr

`SegDistiller(student, teacher, loss_module)` covers every row: no teacher = the baseline (CE + aux), a teacher
and no loss module = CE + KD, both = Af-DCD. The teacher is frozen and kept in eval mode; the Af-DCD loss
module (align + generator) is an extra trainable part that `eval_model()` leaves out, so it never enters the
student checkpoint. `forward_train(images, labels)` returns the stride-8 student logits and the weighted losses
`loss_ce`, `loss_aux`, `loss_kd`, `loss_fm`, `loss_ctr` (those that are on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .afdcd import AfDCDLoss

SegNet = nn.Module  # DeepLabV3, PSPNet (models.py) or MiniSegNet (mini.py): `forward_all` -> SegOutputs
IGNORE_INDEX = -1  # spec f.2: every void value is remapped to -1


def seg_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Task CE (b.1): bilinear upsampling (align_corners=True) to the label size, mean over non-ignored pixels.

    An all-ignored batch gives 0 (the official code gives NaN) and keeps the graph.
    """
    logits = F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def pixel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Pixel-wise KL(p_t || p_s) at stride 8 (no upsampling), averaged over the B*h*w pixels, times T^2 (b.1)."""
    b, _, h, w = teacher_logits.shape
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / (b * h * w) * temperature**2


class SegDistiller(nn.Module):
    """Student + optional frozen teacher + optional Af-DCD loss module, with the b.1 weights.

    Student and teacher are segmentation networks with `num_classes` and `forward_all(x, aux) -> SegOutputs`
    (the table models of models.py, or spec i's mini nets in mini.py).
    """

    def __init__(self, student: SegNet, teacher: SegNet | None = None,
                 loss_module: AfDCDLoss | None = None, *, aux_weight: float = 0.4, kd_weight: float = 1.0,
                 kd_temperature: float = 1.0, fm_weight: float = 2e-6, ctr_weight: float = 5e-3) -> None:
        super().__init__()
        if loss_module is not None and teacher is None:
            raise ValueError("the Af-DCD loss module needs a teacher")
        if teacher is not None and teacher.num_classes != student.num_classes:
            raise ValueError(f"teacher has {teacher.num_classes} classes, student {student.num_classes}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.loss_module = loss_module
        self.aux_weight, self.kd_weight, self.kd_temperature = aux_weight, kd_weight, kd_temperature
        self.fm_weight, self.ctr_weight = fm_weight, ctr_weight

    def train(self, mode: bool = True) -> SegDistiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        """The deployed network's parameters."""
        return list(self.student.parameters())

    def extra_parameters(self) -> list[nn.Parameter]:
        """Training-only parameters (align + generator), optimised with the student (b.4)."""
        return [] if self.loss_module is None else list(self.loss_module.parameters())

    def clip_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient norm the recipe clips (b.4: only the loss module's, max norm 15)."""
        return self.extra_parameters()

    def forward_train(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.student.forward_all(images, aux=bool(self.aux_weight))
        losses = {"loss_ce": seg_cross_entropy(out.logits, labels)}
        if out.aux is not None and self.aux_weight:
            losses["loss_aux"] = self.aux_weight * seg_cross_entropy(out.aux, labels)
        if self.teacher is None:
            return out.logits, losses
        with torch.no_grad():
            t = self.teacher.forward_all(images, aux=False)  # its aux logits are never used
        if self.kd_weight:
            losses["loss_kd"] = self.kd_weight * pixel_kd_loss(out.logits, t.logits, self.kd_temperature)
        if self.loss_module is not None:
            loss_fm, loss_ctr = self.loss_module(out.c4, t.c4)
            losses["loss_fm"] = self.fm_weight * loss_fm
            losses["loss_ctr"] = self.ctr_weight * loss_ctr
        return out.logits, losses

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def eval_model(self) -> SegNet:
        """What is evaluated and saved as the deployable checkpoint: the student alone (b.0)."""
        return self.student
