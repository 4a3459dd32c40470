"""What ScaleKD costs per training step (issue 9 item 10): the pairs for common's bench harness.

`build_bench_pairs()` returns three step callables over the same student/teacher and batch:

* `scalekd`  - one ScaleKD step: student forward, teacher forward (no grad), 4 CAPs, Phi twice with
  autograd, every loss, backward through student + CAPs (+ Phi's activations), optimizer step;
* `baseline` - "teacher forward + student train step": the teacher's no-grad forward plus a plain CE step;
* `kd`       - teacher forward + a logit-KD student step (0.5 CE + 0.5 soft CE, T = 1).

Prediction for Swin-L -> ResNet-50 at 224^2 (GMACs per image; spec c, b.2, b.4): teacher forward 34.0;
student step ~ 3 x 4.1; four CAPs ~ 13.9 forward, ~ 41.6 with backward; Phi ~ 3.0 run twice, forward +
input gradient ~ 12; so ScaleKD / baseline ~ (34 + 12.3 + 41.6 + 12) / (34 + 12.3) ~ 2.2.
The CLI and timing loop come with the shared bench harness (phase 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distiller import ScaleKDDistiller, StageConfig
from .models import create_student, create_teacher, student_taps, teacher_adapter
from .scalekd import kd_loss

# released CAP heads per teacher (d.1/d.2): (s3 heads, s4 heads)
HEADS = {"swin_s": (3, 6), "swin_b": (8, 16), "swin_l": (16, 24)}


@dataclass
class BenchPair:
    """One measured configuration: `step()` runs a full training step on the fixed batch."""

    name: str
    step: Callable[[], None]
    model: nn.Module


def _sgd_step(params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def build_bench_pairs(student: str | nn.Module = "resnet50d", teacher: str | nn.Module = "swin_l", batch: int = 8,
                      image_size: int = 224,
                      device: str | torch.device = "cpu", num_classes: int = 1000,
                      channels_last: bool = False) -> dict[str, BenchPair]:
    """ScaleKD step vs teacher forward + student step vs KD step, on one random batch (random weights).

    `student` / `teacher` are names of `scalekd.models` or ready networks."""
    device = torch.device(device)
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    t = create_teacher(teacher, num_classes=num_classes) if isinstance(teacher, str) else teacher
    s = create_student(student, num_classes=num_classes) if isinstance(student, str) else student
    t, s = t.to(device, memory_format=memory), s.to(device, memory_format=memory)
    h3, h4 = HEADS.get(teacher, (8, 8)) if isinstance(teacher, str) else (1, 2)
    distiller = ScaleKDDistiller(s, t, StageConfig(num_heads=h3, softmax_scale=(5.0, 5.0)),
                                 StageConfig(num_heads=h4, softmax_scale=(5.0, 5.0), self_query=False),
                                 kd_temperature=1.0, kd_alpha=0.5, image_size=image_size,
                                 cap_variant="v2" if type(s).__name__ in ("ResNet", "EfficientNet") else "v1",
                                 frequency_view="dct").to(device).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, num_classes, (batch,), device=device)
    taps, tio = student_taps(s), teacher_adapter(t)

    def scalekd_loss() -> torch.Tensor:
        return sum(distiller.forward_train(x, y)[1].values())

    def baseline_loss() -> torch.Tensor:
        with torch.no_grad():
            tio.stage_outputs(x)
        return F.cross_entropy(s(x), y)

    def kd_step_loss() -> torch.Tensor:
        with torch.no_grad():
            logit_t = tio.stage_outputs(x)[2]
        logits = taps(x)[2]
        factor, loss = kd_loss(logits, logit_t, 1.0, 0.5)
        return factor * F.cross_entropy(logits, y) + loss

    return {
        "scalekd": BenchPair("scalekd", _sgd_step(distiller.student_parameters() + distiller.extra_parameters(),
                                                  scalekd_loss), distiller),
        "baseline": BenchPair("baseline", _sgd_step(list(s.parameters()), baseline_loss), s),
        "kd": BenchPair("kd", _sgd_step(list(s.parameters()), kd_step_loss), s),
    }
