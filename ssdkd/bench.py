"""What SSD-KD's time claim compares (issue 14 item 10): SSD-KD, Fast-2 and DeepInv-2k in one run on one teacher.

    python -m ssdkd.bench                                   # item 9's MNIST teacher (trained first), CPU or GPU
    python -m ssdkd.bench teacher=RUN/teacher/best.pt device=cuda epochs=40      # item 9's full length
    make bench-ssdkd ARGS="threads=2"

The three methods are item 9's experiments (`mnist_resnet8_ssdkd`, `mnist_resnet8_fast2`, `mnist_resnet8_deepinv2k`),
built by `ssdkd.distiller.build_method` exactly as `ssdkd.train` builds them: the same teacher, the same student
initialisation, the same inversion settings, each at its recipe's proportions (one synthesis call per epoch,
KD steps per epoch SSD-KD k, Fast-2 and DeepInv 4k as 100 vs 400 in the recipes, 2,000 pixel iterations per
DeepInversion batch) and the same `StageTimer` accounting (t_inv, t_kd, t_total; evaluation excluded, spec d.6).
`epochs` (default 14: the 10 warm-up rounds + 4 KD epochs, so that the whole bench, DeepInv-2k's 10x included,
takes minutes on 2 CPU cores; item 9 runs 40) sets trainer.epochs of all three (DeepInv has no warm-up: it only
stops by the rule below). Any other key=value is a Hydra override applied to all three (e.g.
`method.kd_batch_size=32`). Of common.bench's shared keys, `device`, `threads` and `memory` (false: no CPU peak
measurement) apply; `repeats`, `warmup`, `modes` and `macs` time repeated steps, which this bench does not, and
are refused.

SSD-KD and Fast-2 alternate epochs (a drifting machine load hits both alike); after each epoch the student is
scored on the 2,000 held-out real digits (untimed). The target is SSD-KD's final accuracy minus 3 points. DeepInv-2k
then runs until it reaches the target or has used `deepinv_factor` x SSD-KD's time to the target, checked inside
its 2,000-iteration batches too (a batch cut there adds nothing to its pool); then its ratio is "> factor".
Printed: accuracy against t_total and samples per epoch, final / best accuracy, t_inv / t_kd / t_total, time to
target, t_total(Fast-2)/t_total(SSD-KD) (paper 1.90-3.92), DeepInv-2k / SSD-KD time to target, synthesis and KD
throughput, and peak memory (CUDA: the allocator's peak per method; CPU: one KD step's, from common.bench).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from .datafree import DataFreeKD, SynthesisStopped

EXPERIMENTS = {"ssdkd": "mnist_resnet8_ssdkd", "fast2": "mnist_resnet8_fast2", "deepinv2k": "mnist_resnet8_deepinv2k"}


@dataclass
class BenchRun:
    """One method: `epoch()` runs a timed epoch and returns its metrics; `student` is what gets evaluated."""

    name: str
    method: DataFreeKD
    student: nn.Module

    def epoch(self) -> dict[str, float]:
        return self.method.run_epoch()


def bench_configs(overrides: Sequence[str] = (), deepinv_iterations: int = 2000) -> dict[str, dict[str, Any]]:
    """The three composed (plain) configs: item 9's experiments plus `overrides` (applied to each); DeepInversion's
    iterations per batch (2,000: DeepInv-2k; fewer only for tests)."""
    from common.config import compose

    from .train import CONFIG_DIR, parse

    out = {}
    for name, experiment in EXPERIMENTS.items():
        extra = [f"method.synthesis.iterations={deepinv_iterations}"] if name == "deepinv2k" else []
        cfg = compose(CONFIG_DIR, [f"experiment={experiment}", *overrides, *extra])
        parse(cfg)  # every key and value checked, as ssdkd.train does
        out[name] = OmegaConf.to_container(cfg, resolve=True)
    return out


def build_bench_runs(configs: dict[str, dict[str, Any]], teacher: nn.Module, *, device: torch.device | str = "cpu",
                     seed: int = 0) -> dict[str, BenchRun]:
    """SSD-KD, Fast-2 and DeepInv-2k from their configs on one `teacher`, students from one seeded initialisation."""
    from .distiller import build_method
    from .models import create_model

    device = torch.device(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    runs: dict[str, BenchRun] = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        student = create_model(cfg["model"]["student"], int(cfg["data"]["num_classes"])).to(device)
        torch.manual_seed(seed + 1)
        runs[name] = BenchRun(name, build_method(cfg, teacher, student, device), student)
    return runs


# ------------------------------------------------------------------------------------------ the CLI
# common.bench's shared keys that time repeated steps (repeats, warmup, modes) or count MACs: not what this bench does
NOT_TIMED_BY_STEPS = ("repeats", "warmup", "modes", "macs")
BENCH_KEYS = {"teacher": None, "epochs": 14, "deepinv_factor": 10.0, "deepinv_iterations": 2000,
              "output_dir": "outputs", "seed": 0}


def time_to_target(curve: list[dict[str, float]], target: float) -> float | None:
    """t_total at the end of the first epoch whose accuracy reaches `target` (None: never)."""
    return next((c["t_total"] for c in curve if c["top1"] >= target), None)


def _mnist_teacher(options: dict, config: dict[str, Any], env) -> tuple[nn.Module, object]:
    """Item 9's teacher (resnet8 on 8,000 real digits), trained first unless `teacher=` names one; the held-out set."""
    from .convert import load_teacher
    from .train import build_data, get_teacher, parse

    r = parse(OmegaConf.create(config))
    train_set, val_set = build_data(r.data)
    if options["teacher"]:
        return load_teacher(options["teacher"], r.model.teacher, r.data.num_classes), val_set
    out = Path(options["output_dir"]) / "ssdkd" / "bench"
    return get_teacher(r, train_set, val_set, out, env, config), val_set


def main(argv: list[str] | None = None) -> str:
    import sys

    from common.bench import BENCH_DEFAULTS, bench_config, peak_memory_bytes
    from common.cli import parse_overrides
    from common.dist import DistEnv
    from common.engine import eval_loader
    from common.errors import UserError
    from common.tasks import evaluate

    from .datafree import kd_train_step

    argv = sys.argv[1:] if argv is None else argv
    unused = [k for k in NOT_TIMED_BY_STEPS if any(a.startswith(f"{k}=") for a in argv)]
    if unused:  # shared bench keys that mean nothing here: refused by name, not ignored or sent to Hydra
        raise UserError(f"ssdkd.bench: {', '.join(unused)} not used here: this bench times whole epochs of SSD-KD, "
                        "Fast-2 and DeepInv-2k up to a target accuracy, not repeated steps (its length: epochs=, "
                        "deepinv_factor=; see --help)")
    shared = {k: v for k, v in BENCH_DEFAULTS.items() if k not in NOT_TIMED_BY_STEPS}
    options, overrides = parse_overrides(argv, {**shared, **BENCH_KEYS}, "ssdkd.bench", __doc__ or "",
                                         passthrough=True)
    bcfg = bench_config({**BENCH_DEFAULTS, **options})
    env = DistEnv(device=bcfg.device)
    base = [f"output_dir={options['output_dir']}", f"trainer.device={env.device.type}",
            f"trainer.epochs={int(options['epochs'])}"]
    configs = bench_configs([*base, *overrides], int(options["deepinv_iterations"]))
    teacher, val_set = _mnist_teacher(options, configs["ssdkd"], env)
    teacher = teacher.to(env.device)
    loader = eval_loader(val_set, 500, env, 0)
    t_top1 = evaluate(teacher, loader, env)["top1"]
    runs = build_bench_runs(configs, teacher, device=env.device, seed=int(options["seed"]))
    curves: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}

    def one_epoch(name: str) -> None:
        run = runs[name]
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        try:
            m = run.epoch()
        finally:
            if env.device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(env.device) / 2**20)
        m["top1"] = evaluate(run.student, loader, env)["top1"]  # untimed; warm-up epochs score the init
        curves[name].append(m)

    epochs = {name: int(cfg["trainer"]["epochs"]) for name, cfg in configs.items()}
    for _ in range(epochs["ssdkd"]):  # SSD-KD and Fast-2 alternate epochs: a drifting load hits both alike
        one_epoch("ssdkd")
        one_epoch("fast2")
    final = curves["ssdkd"][-1]["top1"]
    target = final - 3.0
    t_ssd = time_to_target(curves["ssdkd"], target) or curves["ssdkd"][-1]["t_total"]
    limit = float(options["deepinv_factor"]) * t_ssd
    di = runs["deepinv2k"]
    mid_batch = False
    for _ in range(epochs["deepinv2k"]):  # until the target, or factor x SSD-KD's time to it (also mid-batch)
        before, start = di.method.timer.t_total, time.perf_counter()
        di.method.synthesizer.should_stop = lambda b=before, s=start: b + time.perf_counter() - s >= limit
        try:
            one_epoch("deepinv2k")
        except SynthesisStopped:
            m = di.method
            curves["deepinv2k"].append({**m.timer.summary(), "samples_generated": float(m.n_generated),
                                        "top1": evaluate(di.student, loader, env)["top1"]})
            mid_batch = True
            break
        last = curves["deepinv2k"][-1]
        if last["top1"] >= target or last["t_total"] >= limit:
            break
    if env.device.type != "cuda" and options["memory"]:  # CPU: one KD step's peak (profiler), after all timings
        for name, run in runs.items():
            if len(run.method.pool) == 0:
                continue
            batch = run.method.pool.get(torch.arange(min(len(run.method.pool), run.method.batch_size)))
            peaks[name] = peak_memory_bytes(lambda r=run, b=batch: kd_train_step(
                r.student, r.method.teacher, b, r.method.augment, r.method.optimizer, r.method.temperature),
                env.device) / 2**20

    ssd_cfg = configs["ssdkd"]
    lines = [f"ssdkd bench on {env.device} ({torch.get_num_threads()} threads): {ssd_cfg['model']['teacher']} "
             f"teacher on MNIST (held-out top-1 {t_top1:.2f}) -> {ssd_cfg['model']['student']} students; epochs "
             + ", ".join(f"{n} {e} (warm-up {configs[n]['method']['warmup']})" for n, e in epochs.items())
             + f"; target = SSD-KD final - 3 = {target:.2f}", "",
             "| method | final / best top-1 | epochs | KD steps/epoch | t_inv (s) | t_kd (s) | t_total (s) | samples "
             "| time to target (s) | synthesis img/s | KD img/s | peak MB |", "|---" * 12 + "|"]
    for name, curve in curves.items():
        c, m = curve[-1], runs[name].method
        ttt = time_to_target(curve, target)
        kd_imgs = m.kd_step_count * m.batch_size
        lines.append(f"| {name} | {c['top1']:.2f} / {max(x['top1'] for x in curve):.2f} | {len(curve)} | "
                     f"{m.kd_steps} | {c['t_inv']:.1f} | {c['t_kd']:.1f} | {c['t_total']:.1f} | "
                     f"{c['samples_generated']:.0f} | {'not reached' if ttt is None else f'{ttt:.1f}'} | "
                     f"{c['samples_generated'] / max(c['t_inv'], 1e-9):.1f} | {kd_imgs / max(c['t_kd'], 1e-9):.1f} | "
                     f"{peaks.get(name, float('nan')):.0f} |")
    t_di = time_to_target(curves["deepinv2k"], target)
    ratio_fast = curves["fast2"][-1]["t_total"] / curves["ssdkd"][-1]["t_total"]
    di_ratio = (f"{t_di / t_ssd:.1f}" if t_di is not None else
                f"> {curves['deepinv2k'][-1]['t_total'] / t_ssd:.1f} (stopped{' mid-batch' if mid_batch else ''}, "
                "target not reached)")
    lines += ["", f"t_total(Fast-2) / t_total(SSD-KD) = {ratio_fast:.2f} (paper 1.90-3.92; bar >= 1.9)",
              f"time to target: DeepInv-2k / SSD-KD = {di_ratio} (bar >= 10); SSD-KD time to target {t_ssd:.1f} s",
              "", "accuracy against time (t_total s : top-1) per epoch:"]
    for name, curve in curves.items():
        lines.append(f"  {name}: " + ", ".join(f"{c['t_total']:.0f}:{c['top1']:.1f}" for c in curve))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    from common.errors import cli_guard

    cli_guard(main)()
