"""What ScaleKD costs per training step (issue 9 item 10): the pairs for common's bench harness.

`build_bench_pairs()` returns three step callables over the same student/teacher and batch:

* `scalekd`  - one ScaleKD step: student forward, teacher forward (no grad), 4 CAPs, Phi twice with
  autograd, every loss, backward through student + CAPs (+ Phi's activations), optimizer step;
* `baseline` - "teacher forward + student train step": the teacher's no-grad forward plus a plain CE step;
* `kd`       - teacher forward + a logit-KD student step (0.5 CE + 0.5 soft CE, T = 1).

Prediction for Swin-L -> ResNet-50 at 224^2 (GMACs per image; spec c, b.2, b.4): teacher forward 34.0;
student step ~ 3 x 4.1; four CAPs ~ 13.9 forward, ~ 41.6 with backward; Phi ~ 3.0 run twice, forward +
input gradient ~ 12; so ScaleKD / baseline ~ (34 + 12.3 + 41.6 + 12) / (34 + 12.3) ~ 2.2.
`python -m scalekd.bench` times the three with `common.bench` (alternating rounds, medians, peak memory)
and prints the ratios to the baseline:

    python -m scalekd.bench                                   # Swin-L -> ResNet-50-D, batch 8, CPU fp32 / GPU bf16
    python -m scalekd.bench threads=2 repeats=5 student=mixer_b16 teacher=swin_l
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.bench import BENCH_DEFAULTS, Candidate, amp_dtype, bench_config, compare, describe, print_table, ratio
from common.cli import parse_overrides
from common.errors import UserError, cli_guard

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


def _sgd_step(params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor],
              autocast: Callable[[], Any] = contextlib.nullcontext) -> Callable[[], None]:
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def build_bench_pairs(student: str | nn.Module = "resnet50d", teacher: str | nn.Module = "swin_l", batch: int = 8,
                      image_size: int = 224,
                      device: str | torch.device = "cpu", num_classes: int = 1000,
                      channels_last: bool = False, amp: torch.dtype | None = None,
                      frequency_view: str = "dct") -> dict[str, BenchPair]:
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
                                 frequency_view=frequency_view).to(device).train()
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

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    return {
        "scalekd": BenchPair("scalekd", _sgd_step(distiller.student_parameters() + distiller.extra_parameters(),
                                                  scalekd_loss, autocast), distiller),
        "baseline": BenchPair("baseline", _sgd_step(list(s.parameters()), baseline_loss, autocast), s),
        "kd": BenchPair("kd", _sgd_step(list(s.parameters()), kd_step_loss, autocast), s),
    }


DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "modes": "train", "macs": False, "student": "resnet50d",
                            "teacher": "swin_l", "batch": 8, "image_size": 224, "frequency_view": "dct"}
NAMES = {"baseline": "teacher forward + student step", "kd": "teacher forward + KD step",
         "scalekd": "ScaleKD step (4 CAPs, TPP, KD)"}


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Time the three steps in one process and print ScaleKD / baseline and KD / baseline."""
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "scalekd.bench", __doc__ or "")
    cfg = bench_config(opts)
    if cfg.modes != ("train",):
        raise UserError("scalekd.bench: modes=train only (ScaleKD changes training; inference is the student's)")
    batch = int(opts["batch"])
    cuda = cfg.device.type == "cuda"
    pairs = build_bench_pairs(str(opts["student"]), str(opts["teacher"]), batch, int(opts["image_size"]),
                              cfg.device, channels_last=cuda, amp=amp_dtype(cfg.device),
                              frequency_view=str(opts["frequency_view"]))
    candidates = [Candidate(NAMES[k], pairs[k].model, {"train": pairs[k].step}, batch)
                  for k in ("baseline", "kd", "scalekd")]
    print(f"ScaleKD bench: {opts['teacher']} -> {opts['student']}, batch {batch}, {opts['image_size']} px, "
          f"{describe(cfg)}; every step includes the teacher's forward")
    records = compare(candidates, cfg)
    print_table(records, baseline=NAMES["baseline"])
    for r in records:  # the spread shows whether the machine was quiet enough for the medians to mean something
        print(f"{r['name']}: seconds per round {', '.join(f'{t:.2f}' for t in r['times'])}")
    for k, note in (("kd", ""), ("scalekd", "  (derivation: ~2.2x; target <= 2.2x)")):
        print(f"{NAMES[k]} / ({NAMES['baseline']}): {ratio(records, 'train', NAMES[k], NAMES['baseline']):.2f}x{note}")
    return records


if __name__ == "__main__":
    main()
