"""What a method costs: candidates timed side by side against a baseline, in one process (DESIGN §7).

A paper's ``bench.py`` only builds :class:`Candidate` s (the method, its baseline, optionally the official
implementation) and calls :func:`compare` then :func:`print_table`::

    x = torch.randn(16, 3, 160, 160)
    pair = [Candidate("resnet18", plain, classification_steps(plain, x), batch=16),
            Candidate("kw1x_resnet18", kw, classification_steps(kw, x), batch=16)]
    print_table(compare(pair, BenchConfig(repeats=7)), baseline="resnet18")

Timing: ``torch.utils.benchmark.Timer`` (which synchronises CUDA), one call per measurement, candidates
alternated round by round so that a drifting machine load hits all alike; the figure is the median over
rounds. Memory: on CUDA the peak allocated bytes of one step above what was allocated before it; on CPU
the same quantity from torch's profiler (every tensor allocation and free in the step, in order), so it is
independent of the host allocator. MACs per sample: ``common.profiling.count_flops`` on one sample in eval
mode. On a GPU also the achieved TFLOP/s (a training step counted as 3x the forward) and the fraction of the
card's dense bf16/fp16 peak where the card is in :data:`PEAK_TFLOPS`.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.cli import split_list
from common.errors import UserError
from common.profiling import count_flops, count_params, human

Step = Callable[[], object]

# Dense tensor-core peak TFLOP/s (bf16, or fp16 where the card has no bf16), from the vendors' data sheets;
# matched against torch.cuda.get_device_name() by substring, first match wins (the specific names first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)

# the bench arguments every paper shares (``make bench-<paper> ARGS="batch=32 threads=4"``)
BENCH_DEFAULTS: dict[str, Any] = {"device": "auto", "threads": 0, "repeats": 7, "warmup": 2,
                                  "modes": "train,infer", "memory": True, "macs": True}


@dataclass
class Candidate:
    """One model to time: its steps by mode (``"train"``, ``"infer"``) and what its figures are per."""

    name: str
    model: nn.Module  # what params/MACs are counted on
    steps: Mapping[str, Step]
    batch: int | Mapping[str, int]  # samples per step, or per mode (throughput = batch / seconds)
    sample: Any = None  # one sample (a tensor or a tuple of args) for the MACs; None: not counted
    unit: str = "img"

    def batch_of(self, mode: str) -> int:
        return int(self.batch[mode]) if isinstance(self.batch, Mapping) else int(self.batch)


@dataclass
class BenchConfig:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int = 0  # 0: leave torch's setting
    repeats: int = 7
    warmup: int = 2
    modes: tuple[str, ...] = ("train", "infer")
    memory: bool = True
    macs: bool = True


def bench_config(options: Mapping[str, Any]) -> BenchConfig:
    """A :class:`BenchConfig` from parsed ``BENCH_DEFAULTS`` options; sets the thread count."""
    device = resolve_device(str(options["device"]))
    modes = tuple(split_list(str(options["modes"])))
    bad = [m for m in modes if m not in ("train", "infer")]
    if bad or not modes:
        raise UserError(f"bench: modes must be a comma list of train, infer; got {options['modes']!r}")
    if int(options["repeats"]) < 1:
        raise UserError("bench: repeats must be >= 1")
    if int(options["threads"]) > 0:
        torch.set_num_threads(int(options["threads"]))
    return BenchConfig(device, int(options["threads"]), int(options["repeats"]), int(options["warmup"]), modes,
                       bool(options["memory"]), bool(options["macs"]))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"bench: device={name} but no CUDA device is visible; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"bench: device must be auto, cpu or cuda[:N], got {name!r}") from None


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it, fp16 on older ones, none on CPU (DESIGN §4)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def classification_steps(model: nn.Module, x: torch.Tensor, loss: Callable[[Any], torch.Tensor] | None = None,
                         lr: float = 1e-6) -> dict[str, Step]:
    """``{"train", "infer"}`` for a network on batch ``x``: forward, loss (default: mean output), backward and
    an SGD-momentum step; eval-mode ``inference_mode`` forward. Autocast as :func:`amp_dtype`."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    dtype = amp_dtype(x.device)
    loss = loss or (lambda out: out.float().mean())

    def train() -> None:
        model.train()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            value = loss(model(x))
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    return {"train": train, "infer": infer}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(step: Step, device: torch.device) -> int:
    """Peak bytes of tensors allocated by one call of ``step`` above those live before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16/fp16 peak from :data:`PEAK_TFLOPS`, or None (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def time_once(step: Step, threads: int) -> float:
    """Seconds of one call of ``step`` (``torch.utils.benchmark.Timer``, which synchronises CUDA)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads or torch.get_num_threads())
    return timer.timeit(1).median


def compare(candidates: Sequence[Candidate], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Time every candidate's steps, alternating candidates round by round; one record per (mode, candidate)."""
    records: list[dict[str, Any]] = []
    peak = peak_tflops(cfg.device)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    params = {c.name: count_params(c.model) for c in candidates}
    macs = {c.name: count_flops(c.model, c.sample)["macs"] if cfg.macs and c.sample is not None else None
            for c in candidates}
    for mode in cfg.modes:
        active = [c for c in candidates if mode in c.steps]
        memory: dict[str, int | None] = {}
        for cand in active:
            for _ in range(max(cfg.warmup, 1)):
                cand.steps[mode]()
            memory[cand.name] = peak_memory_bytes(cand.steps[mode], cfg.device) if cfg.memory else None
        times: dict[str, list[float]] = {c.name: [] for c in active}
        for r in range(cfg.repeats):
            for k in range(len(active)):  # rotate who goes first, so no candidate always follows the same one
                cand = active[(r + k) % len(active)]
                times[cand.name].append(time_once(cand.steps[mode], cfg.threads))
        for cand in active:
            seconds = statistics.median(times[cand.name])
            m = macs[cand.name]
            batch = cand.batch_of(mode)
            flops = None if m is None else 2 * m * batch * (3 if mode == "train" else 1) / seconds
            records.append({
                "mode": mode, "name": cand.name, "unit": cand.unit, "batch": batch,
                "seconds": seconds, "times": times[cand.name], "throughput": batch / seconds,
                "peak_bytes": memory[cand.name], "macs": m, "params": params[cand.name],
                "tflops": None if flops is None or cfg.device.type != "cuda" else flops / 1e12,
                "peak_fraction": None if flops is None or peak is None else flops / 1e12 / peak,
            })
    return records


def ratio(records: Sequence[Mapping[str, Any]], mode: str, name: str, baseline: str) -> float:
    """``throughput(baseline) / throughput(name)``: how many times the baseline's time a step of ``name`` takes."""
    speed = {r["name"]: r["throughput"] for r in records if r["mode"] == mode}
    return speed[baseline] / speed[name]


def print_table(records: Sequence[Mapping[str, Any]], baseline: str, title: str = "") -> str:
    """Markdown table: throughput, time relative to ``baseline``, peak memory, MACs, params (GPU: TFLOP/s)."""
    gpu = any(r["tflops"] is not None for r in records)
    head = ["mode", "model", "throughput", f"time / {baseline}", "peak memory", "MACs/sample", "params"]
    head += ["TFLOP/s", "of peak"] if gpu else []
    lines = [title] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        rel = ratio(records, r["mode"], r["name"], baseline) if any(
            b["name"] == baseline and b["mode"] == r["mode"] for b in records) else float("nan")
        cells = [r["mode"], r["name"], f"{r['throughput']:,.1f} {r['unit']}/s", f"{rel:.2f}x",
                 "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f} MB",
                 "-" if r["macs"] is None else human(r["macs"]), human(r["params"])]
        if gpu:
            cells += ["-" if r["tflops"] is None else f"{r['tflops']:.2f}",
                      "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def describe(cfg: BenchConfig) -> str:
    """One line: device, threads, autocast."""
    if cfg.device.type == "cuda":
        dtype = amp_dtype(cfg.device)
        return f"device {torch.cuda.get_device_name(cfg.device)} ({str(dtype).split('.')[-1]} autocast)"
    return f"device cpu, {torch.get_num_threads()} threads"
