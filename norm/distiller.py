"""The NORM distiller (mdistiller style): a frozen teacher, a student with the FT, the official objective.

    L = gamma * CE(z~_s, y) + a * KD(z~_s, z~_t) + w(epoch) * b * L_NORM(e, t) [+ c * L_CRD(f_s, f_t)]  (spec b.4)

with z~ = 2.5 * LayerNorm(z) (official logit standardization), `e` the FT's expanded feature and `t` the
teacher's feature at the same position. NORM+CRD (spec b.8) adds RepDistiller's CRD on the pooled features
the classifiers read (`f_s` after the FT and its shortcut), weighted c = 2.5; its targets are the packed rows
of `crd.ContrastiveSampleDataset` (label, sample index, contrast indices). `forward_train(image, target)`
returns the student's raw logits and the weighted losses by name; the trainer sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .crd import CRDLoss, unpack_targets
from .models import NORMStudent, pre_logits
from .norm import NormMultiplier, kd_loss, n_to_one_loss, standardize_logits


class NORMDistiller(nn.Module):
    """Offline NORM: `student` (a `NORMStudent`) learns from a frozen `teacher` kept in eval mode."""

    def __init__(self, student: NORMStudent, teacher: nn.Module, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, norm_weight: float = 1.0, kd_temperature: float = 4.0,
                 logit_scale: float | None = 2.5, multiplier: NormMultiplier | None = None,
                 crd: CRDLoss | None = None, crd_weight: float = 2.5):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.norm_weight = norm_weight
        self.kd_temperature = kd_temperature
        self.logit_scale = logit_scale
        self.multiplier = multiplier
        self.current_multiplier = 1.0
        self.crd = crd
        self.crd_weight = crd_weight

    def train(self, mode: bool = True) -> NORMDistiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        """The deployed network's parameters."""
        return list(self.student.net.parameters())

    def extra_parameters(self) -> list[nn.Parameter]:
        """Train-time-only parameters (the FT, folded away at deployment; the CRD embeddings, dropped)."""
        return list(self.student.ft.parameters()) + ([] if self.crd is None else list(self.crd.parameters()))

    @torch.no_grad()
    def teacher_forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.teacher.forward_features(image)
        return feat, self.teacher.forward_head(feat)

    def _standardize(self, logits: Tensor) -> Tensor:
        return logits if self.logit_scale is None else standardize_logits(logits, self.logit_scale)

    def loss_terms(self, expanded: Tensor, logits: Tensor, teacher_feat: Tensor, teacher_logits: Tensor,
                   target: Tensor, with_kd: bool = True) -> dict[str, Tensor]:
        """Unweighted CE, KD (when `with_kd`) and N-to-one losses."""
        z_s = self._standardize(logits)
        terms = {"ce": F.cross_entropy(z_s, target), "norm": n_to_one_loss(expanded, teacher_feat)}
        if with_kd:
            terms["kd"] = kd_loss(z_s, self._standardize(teacher_logits), self.kd_temperature)
        return terms

    def forward_train(self, image: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.crd is not None:
            if target.ndim != 2:
                raise ValueError("NORM+CRD needs the targets of crd.ContrastiveSampleDataset (label, index, "
                                 "contrast indices); wrap the training set")
            target, index, contrast_index = unpack_targets(target)
        expanded, y = self.student.forward_ft(image)
        logits = self.student.net.forward_head(y)
        teacher_feat, teacher_logits = self.teacher_forward(image)
        terms = self.loss_terms(expanded, logits, teacher_feat, teacher_logits, target, self.kd_weight != 0)
        losses = {"loss_ce": self.ce_weight * terms["ce"],
                  "loss_norm": self.current_multiplier * self.norm_weight * terms["norm"]}
        if "kd" in terms:
            losses["loss_kd"] = self.kd_weight * terms["kd"]
        if self.crd is not None:
            with torch.no_grad():
                f_t = pre_logits(self.teacher, teacher_feat)
            f_s = pre_logits(self.student.net, y)
            losses["loss_crd"] = self.crd_weight * self.crd(f_s, f_t, index, contrast_index)
        return logits, losses

    def forward(self, image: Tensor) -> Tensor:
        return self.student(image)

    def eval_model(self) -> NORMStudent:
        """What the trainer evaluates, averages (EMA) and saves as best.pt: the student with its FT."""
        return self.student

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Set w(epoch), the official epoch-wise NORM multiplier."""
        self.current_multiplier = 1.0 if self.multiplier is None else self.multiplier(epoch, num_epochs)
