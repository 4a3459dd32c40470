"""`make bench-norm`: what NORM costs, side by side with its baseline in one run.

1. Training: images/s of a NORM distillation step (student + FT forward/backward, teacher forward) against
   plain CE training of the same student; peak memory on GPU.
2. Inference: the deployed (FT folded) student against the plain network (must be equal: same parameter
   count and FLOPs, same measured speed), with the unfolded train-time student for reference.

    python -m norm.bench                                  # resnet32x4 -> resnet8x4, CIFAR size
    python -m norm.bench --row imagenet_resnet34_resnet18 --batch 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from common.engine import autocast, resolve_amp
from common.errors import UserError, cli_guard
from common.profiling import count_flops, count_params, human

from .distiller import NORMDistiller
from .models import NORMStudent, create_model
from .schedules import CIFAR_MULTIPLIER


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call (median of `iters`, after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _train_step(method: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None,
                opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        with autocast(x.device, amp):
            _, losses = method.forward_train(x, y)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return step


def _infer(m: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> Callable[[], None]:
    @torch.no_grad()
    def call() -> None:
        with autocast(x.device, amp):
            m(x)

    return call


class _CE(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.net(x)
        return logits, {"loss_ce": nn.functional.cross_entropy(logits, y)}


@cli_guard
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", default="cifar100_resnet32x4_resnet8x4", help="a student row of norm/paper.yaml")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    rows = {r["id"]: r for r in yaml.safe_load((Path(__file__).parent / "paper.yaml").read_text())["rows"]}
    row = rows.get(args.row)
    if row is None or row["role"] != "student":
        raise UserError(f"--row {args.row}: choose a student row of norm/paper.yaml")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp = resolve_amp("auto", device)
    channels_last = device.type == "cuda"
    imagenet = row["id"].startswith("imagenet")
    nc, size = (1000, 224) if imagenet else (100, 32)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, nc, (args.batch,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mf = torch.channels_last if channels_last else torch.contiguous_format

    def prepare(m: nn.Module) -> nn.Module:
        return m.to(device=device, memory_format=mf)

    print(f"NORM bench: {row['teacher']} -> {row['student']} (N = {row['N']}), batch {args.batch}, "
          f"{size} px, {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"amp {amp}")

    # ---- training step: NORM distillation vs plain CE training of the student
    results: dict[str, float] = {}
    for name in ("plain CE student", "NORM distillation"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net = create_model(row["student"], nc, norm_variant=True)
        if name == "plain CE student":
            method: nn.Module = prepare(_CE(net)).train()
        else:
            teacher = create_model(row["teacher"], nc)
            method = prepare(NORMDistiller(NORMStudent(net, row["teacher_channels"], row["N"]), teacher,
                                           ce_weight=0.1, multiplier=CIFAR_MULTIPLIER)).train()
        opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
        sec = _timeit(_train_step(method, x, y, amp, opt), device, args.warmup, args.iters)
        results[name] = args.batch / sec
        mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"  train  {name:22s} {args.batch / sec:9.1f} img/s{mem}")
        del method, opt
    print(f"  train  NORM / plain = {results['NORM distillation'] / results['plain CE student']:.2f}x throughput")

    # ---- inference: deployed (folded) student vs plain network vs the unfolded train-time student
    plain = prepare(create_model(row["student"], nc, norm_variant=True)).eval()
    student = NORMStudent(create_model(row["student"], nc, norm_variant=True), row["teacher_channels"], row["N"])
    student = prepare(student).eval()
    models = {"plain network": plain, "train-time (FT)": student}
    if not row["student"].startswith("wrn"):
        models["deployed (folded)"] = prepare(student.fold()).eval()
    # interleaved rounds so that machine load hits every model alike; median seconds per batch
    calls = {name: _infer(m, x, amp) for name, m in models.items()}
    for fn in calls.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.iters):
        for name, fn in calls.items():
            times[name].append(_timeit(fn, device, 0, 1))
    speed = {name: args.batch / sorted(t)[len(t) // 2] for name, t in times.items()}
    for name, m in models.items():
        flops = count_flops(m, x[:1])["flops"]
        print(f"  infer  {name:22s} {speed[name]:9.1f} img/s  params {count_params(m):>11,}  "
              f"FLOPs/img {human(flops)}  ({flops * speed[name] / 1e12:.2f} TFLOP/s achieved)")
    if "deployed (folded)" in speed:
        deployed = models["deployed (folded)"]
        same_params = count_params(deployed) == count_params(plain)
        same_flops = count_flops(deployed, x[:1])["flops"] == count_flops(plain, x[:1])["flops"]
        print(f"  infer  deployed / plain = {speed['deployed (folded)'] / speed['plain network']:.2f}x throughput "
              f"(same params: {same_params}, same FLOPs: {same_flops})")


if __name__ == "__main__":
    main()
