"""What SSD-KD's time claim compares (issue 14 item 10): the runs for the shared bench harness (phase 2).

`build_bench_runs(teacher, make_student, ...)` returns SSD-KD, Fast-2 and DeepInv-2k on one teacher, each at its
recipe's proportions (one synthesis call per epoch; 2,000 pixel iterations per DeepInversion batch; own KD steps
per epoch: SSD-KD 100, Fast-2 and DeepInv 400, spec b.7(v), d.2, d.5), from the same student initialisation and
the same `StageTimer` accounting (t_inv, t_kd, t_total; evaluation excluded, spec d.6). The harness alternates
`run.epoch()` calls, evaluates with `run.student` between epochs (untimed), and reports accuracy against time and
samples, time to a target accuracy, total-time ratios, throughput and peak memory. `scale` shrinks sizes
(batch, buffer, steps) proportionally for CPU runs; it never changes the method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .datafree import (
    NORMALIZE_DICT,
    DataFreeKD,
    DeepInversionSynthesizer,
    FastMetaSynthesizer,
    Generator,
    ImagePool,
    InversionAugment,
    Normalizer,
)
from .ssdkd import SSDKD, ReplayBuffer, SSDKDConfig


@dataclass
class BenchRun:
    """One method: `epoch()` runs a timed epoch and returns its metrics; `student` is what gets evaluated."""

    name: str
    method: DataFreeKD
    student: nn.Module

    def epoch(self) -> dict[str, float]:
        return self.method.run_epoch()


def _sgd(student: nn.Module, lr: float, epochs_after_warmup: int):
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs_after_warmup, eta_min=2e-4)


def build_bench_runs(teacher: nn.Module, make_student: Callable[[], nn.Module], *, num_classes: int,
                     normalize: str = "cifar10", image_size: int = 32, channels: int = 3, train_size: int = 50_000,
                     epochs: int = 220, warmup: int = 20, scale: float = 1.0, nz: int = 256, ngf: int = 64,
                     adv: float = 1.1, oh: float = 0.4, deepinv_iterations: int = 2000,
                     device: torch.device | str = "cpu", seed: int = 0) -> dict[str, BenchRun]:
    """SSD-KD, Fast-2 and DeepInv-2k on `teacher`, each with a student from `make_student()` under the same seed."""
    device = torch.device(device)
    teacher = teacher.to(device).eval().requires_grad_(False)

    def student() -> nn.Module:
        torch.manual_seed(seed)
        return make_student().to(device)

    def sized(n: int) -> int:
        return max(1, round(n * scale))

    b = sized(256)
    normalizer = Normalizer(**NORMALIZE_DICT[normalize]).to(device)
    runs: dict[str, BenchRun] = {}
    torch.manual_seed(seed)
    gen0 = Generator(nz, ngf, image_size, channels).to(device)

    def fast_synth(s: nn.Module, aug: InversionAugment) -> FastMetaSynthesizer:
        return FastMetaSynthesizer(teacher, s, copy.deepcopy(gen0), num_classes=num_classes, batch_size=b, g_steps=2,
                                   lr_g=5e-3, lr_z=0.015, adv=adv, bn=10.0, oh=oh, bn_mmt=0.9, is_maml=True,
                                   warmup=warmup, reset_l0=True, augment=aug)

    s = student()
    aug = InversionAugment(normalizer)
    cfg = SSDKDConfig(epochs=epochs, warmup=warmup, kd_steps_per_epoch=sized(100), batch_size=b)
    buf = ReplayBuffer(max(1, round(0.1 * train_size * scale)), num_classes, (channels, image_size, image_size),
                       replace_per_call=max(1, b // 2), device=device)
    opt, sch = _sgd(s, 0.2, epochs - warmup)
    runs["ssdkd"] = BenchRun("ssdkd", SSDKD(teacher, s, fast_synth(s, aug), buf, opt, sch, aug, cfg), s)

    s = student()
    aug = InversionAugment(normalizer)
    opt, sch = _sgd(s, 0.2, epochs - warmup)
    runs["fast2"] = BenchRun("fast2", DataFreeKD(teacher, s, fast_synth(s, aug), ImagePool(quantize=True), opt, sch,
                                                 aug, warmup=warmup, kd_steps=sized(400), batch_size=b), s)

    s = student()
    aug = InversionAugment(normalizer)
    opt, sch = _sgd(s, 0.1, epochs)
    deepinv = DeepInversionSynthesizer(teacher, s, normalizer, num_classes=num_classes,
                                       img_size=(channels, image_size, image_size), batch_size=b,
                                       iterations=deepinv_iterations, lr=0.1, adv=1.0, bn=10.0, oh=1.0)
    runs["deepinv2k"] = BenchRun("deepinv2k", DataFreeKD(teacher, s, deepinv, ImagePool(quantize=True), opt, sch, aug,
                                                         warmup=0, kd_steps=sized(400), batch_size=b), s)
    return runs
