"""The ScaleKD distiller (mdistiller shape): a frozen teacher, a student, four CAPs, TPP and KD (spec b.4).

    L = (1 - alpha_kd) * L_cls + loss_s3 + loss_s3_alt + loss_s4 + loss_s4_alt + loss_kd

`forward_train(images, targets)` returns the student's logits and the weighted losses by name
(`loss_cls, loss_s3, loss_s3_alt, loss_s4, loss_s4_alt, loss_kd`); the trainer sums them. The CAP widths
and grids come from a dry run of student and teacher at `image_size`; heads, softmax scales, weights,
query mode and the CAP variant come from the `StageConfig`s (the released per-pair values live in the
experiment files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

from .models.taps import StudentTaps, TeacherAdapter, student_taps, teacher_adapter
from .scalekd import DualViewFeatureMimicking, ScaleKDLoss

CAP_VARIANTS = ("v2", "v1", "layernorm")  # fmdv2.py / fmd.py / fmd_convnext.py


@dataclass
class StageConfig:
    """Hyper-parameters of one distillation stage's two CAPs (official `FreqMaskingDistillLoss*` args)."""

    alpha: tuple[float, float] = (0.08, 0.06)
    num_heads: int = 8
    softmax_scale: tuple[float, float] = (1.0, 1.0)
    self_query: bool = True


@dataclass
class ClassLoss:
    """The student head's loss (mmcls heads): "ce" (optionally label-smoothed) or "bce" (multi-label
    sigmoid head on one-hot targets, summed over classes and averaged over the batch), times `weight`."""

    kind: str = "ce"
    label_smoothing: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "bce"):
            raise UserError(f"class loss {self.kind!r} is not one of ['ce', 'bce']")

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.kind == "bce":
            onehot = targets if targets.dtype.is_floating_point else F.one_hot(targets, logits.shape[1])
            loss = F.binary_cross_entropy_with_logits(logits, onehot.to(logits.dtype), reduction="sum")
            return self.weight * loss / logits.shape[0]
        return self.weight * F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


def _dry_run_shapes(student: StudentTaps, teacher: TeacherAdapter, image_size: int) -> dict[str, torch.Size]:
    """Shapes of S3, S4, T3, T4 for one image, from a forward without real compute where possible."""
    param = next(student.model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    modes = (student.model.training, teacher.model.training)
    student.model.eval()
    teacher.model.eval()
    try:
        with torch.no_grad():
            s3, s4, _ = student(x)
            t3, t4, _ = teacher.stage_outputs(x)
    finally:
        student.model.train(modes[0])
        teacher.model.train(modes[1])
    return {"s3": s3.shape, "s4": s4.shape, "t3": t3.shape, "t4": t4.shape}


class ScaleKDDistiller(nn.Module):
    """ScaleKD over a timm `student` and a frozen timm `teacher` (Swin, or ViT/EVA with `is_vit`).

    `s3` / `s4` configure the stage-3 (TPP proxy) and stage-4 CAP pairs (None disables a stage); `kd_alpha`
    None disables KD. `teacher_train_mode` (official default True, b.5) keeps the teacher's drop-path on
    during distillation, as the released runs did.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, s3: StageConfig | None = None,
                 s4: StageConfig | None = None, kd_temperature: float = 4.0, kd_alpha: float | None = 0.5,
                 class_loss: Callable[[Tensor, Tensor], Tensor] | None = None, cap_variant: str = "v2",
                 image_size: int = 224, teacher_train_mode: bool = True, frequency_view: str = "dct",
                 student_adapter: StudentTaps | None = None,
                 teacher_adapter_: TeacherAdapter | None = None) -> None:
        super().__init__()
        if cap_variant not in CAP_VARIANTS:
            raise UserError(f"cap_variant {cap_variant!r} is not one of {list(CAP_VARIANTS)}")
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        self.teacher_train_mode = teacher_train_mode
        self.class_loss = class_loss or ClassLoss()
        self.taps = student_adapter or student_taps(student)
        self.teacher_io = teacher_adapter_ or teacher_adapter(teacher)
        shapes = _dry_run_shapes(self.taps, self.teacher_io, image_size)
        self.shapes = {k: tuple(v[1:]) for k, v in shapes.items()}
        mimic = {}
        for name, cfg in (("s3", s3), ("s4", s4)):
            if cfg is None:
                mimic[name] = None
                continue
            cs, hs, ws = self.shapes[name]
            # s3 CAPs output teacher stage-(n-1) tokens (Phi's input); s4 CAPs output last-stage tokens
            ct, ht, wt = self.shapes["t3" if name == "s3" else "t4"]
            if name == "s4" and self.teacher_io.is_vit:
                ct, ht, wt = self.shapes["t3"]  # plain ViT: the s4 CAP feeds the tail, same token space
            if cap_variant != "v1" and (hs, ws) != (ht, wt):
                raise UserError(f"CAP grid {ht}x{wt} (teacher) != student {name.upper()} grid {hs}x{ws} with "
                                f"cap_variant={cap_variant}; use cap_variant=v1 (any key grid -> any query grid)")
            mimic[name] = DualViewFeatureMimicking(
                cs, ct, (ht, wt), alpha=cfg.alpha, pos_hw=(hs, ws) if cap_variant == "v1" else None,
                self_query=cfg.self_query, softmax_scale=cfg.softmax_scale, num_heads=cfg.num_heads,
                norm="layernorm" if cap_variant == "layernorm" else "batchnorm", frequency_view=frequency_view)
        if mimic["s3"] is not None and mimic["s4"] is not None:
            q_need = self.shapes["t4"][1:] if not self.teacher_io.is_vit else self.shapes["t3"][1:]
            if tuple(mimic["s4"].cap_spatial.query_hw) != tuple(q_need):
                raise UserError(f"the TPP proxy grid {q_need} does not match the s4 CAP query grid")
        self.distill = ScaleKDLoss(mimic["s3"], mimic["s4"], kd_temperature, kd_alpha)
        self.no_decay_keys: list[str] = []  # mmcls paramwise custom_keys (d.2), set by the recipe

    def no_weight_decay(self) -> set[str]:
        """Trainable parameter names containing ".<key>" for a key of `no_decay_keys` (timm's optimizer
        factory leaves them without weight decay; `.pos_embed` also matches the CAPs' position embeddings)."""
        return {n for n, p in self.named_parameters()
                if p.requires_grad and any(f".{k}" in f".{n}" for k in self.no_decay_keys)}

    def train(self, mode: bool = True) -> ScaleKDDistiller:
        super().train(mode)
        self.teacher.train(mode and self.teacher_train_mode)
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        """The deployed network's parameters."""
        return list(self.student.parameters())

    def extra_parameters(self) -> list[nn.Parameter]:
        """Train-time-only parameters: the four CAPs."""
        return list(self.distill.parameters())

    def _last_stage(self, hw: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        return lambda tokens: self.teacher_io.last_stage(tokens, hw)

    def forward_losses(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """-> (student logits, weighted losses, intermediates incl. teacher logits and features)."""
        s3, s4, logits = self.taps(images)
        with torch.no_grad():
            t3, t4, logit_t = self.teacher_io.stage_outputs(images)
        losses, cls_factor, inter = self.distill(
            s3, s4, t4, self._last_stage(tuple(t3.shape[-2:])), logits, logit_t,
            tail=self.teacher_io.tail if self.teacher_io.is_vit else None)
        out = {"loss_cls": cls_factor * self.class_loss(logits, targets), **losses}
        inter.update(logit_t=logit_t, t3=t3, t4=t4, s3=s3, s4=s4)
        return logits, out, inter

    def forward_train(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, losses, _ = self.forward_losses(images, targets)
        return logits, losses

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def eval_model(self) -> nn.Module:
        """What is evaluated, averaged (EMA) and deployed: the student alone."""
        return self.student


def distiller_from_config(method: object, student: nn.Module, teacher: nn.Module,
                          image_size: int = 224) -> ScaleKDDistiller:
    """A `ScaleKDDistiller` from the `method` config group (configs/method/scalekd.yaml keys)."""
    from .models.taps import ViTTeacher

    def get(key: str, default: object = None) -> object:
        return method.get(key, default) if hasattr(method, "get") else getattr(method, key, default)

    def stage(cfg: object) -> StageConfig | None:
        if cfg is None:
            return None
        c = dict(cfg)
        unknown = set(c) - {"alpha", "num_heads", "softmax_scale", "self_query"}
        if unknown:
            raise UserError(f"method stage key(s) {sorted(unknown)} unknown; expected alpha, num_heads, "
                            "softmax_scale, self_query")
        scale = c.get("softmax_scale", (1.0, 1.0))
        return StageConfig(alpha=tuple(c.get("alpha", (0.08, 0.06))), num_heads=int(c.get("num_heads", 8)),
                           softmax_scale=(float(scale),) * 2 if isinstance(scale, (int, float)) else tuple(scale),
                           self_query=bool(c.get("self_query", True)))

    kd = get("kd")
    loss = dict(get("class_loss") or {})
    adapter = None
    if type(teacher).__name__ == "VisionTransformer":
        split = dict(get("vit_teacher") or {})
        adapter = ViTTeacher(teacher, int(split.get("phi_blocks", 2)), int(split.get("tail_blocks", 0)))
    return ScaleKDDistiller(
        student, teacher, stage(get("s3")), stage(get("s4")),
        kd_temperature=float(kd["temperature"]) if kd else 4.0, kd_alpha=float(kd["alpha"]) if kd else None,
        class_loss=ClassLoss(**loss), cap_variant=str(get("cap_variant", "v2")), image_size=image_size,
        teacher_train_mode=bool(get("teacher_train_mode", True)), frequency_view=str(get("frequency_view", "dct")),
        teacher_adapter_=adapter)
