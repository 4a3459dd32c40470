"""What KernelWarehouse costs: each KW model beside its plain baseline, in one run, as ratios.

    python -m kernelwarehouse.bench                          # ResNet18 KW 1x vs ResNet18, CPU, B=16, 160 px
    python -m kernelwarehouse.bench models=kw1x_resnet18,kw4x_mobilenetv2_100 batch=32 size=224 threads=8
    python -m kernelwarehouse.bench impl=grouped             # the official op order, for comparison

Measures a training step (forward, backward, SGD step) and inference (``torch.inference_mode``) in
images/s, alternating baseline and KW runs so that a drifting machine load hits both alike, and reports
medians. Memory: on CUDA the peak allocated bytes; on CPU the bytes autograd saves for backward (the
activation memory of a training step). On a GPU it uses bf16 autocast and channels_last.
Also prints the analytic multiply-adds per image (convolutions/linears + KW kernel assembly).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.errors import UserError, cli_guard
from kernelwarehouse.models import create_model, warehouse_manager
from kernelwarehouse.warehouse import KWConvNd, KWLayer, KWLinear

DEFAULTS: dict[str, Any] = {"models": "kw1x_resnet18", "batch": 16, "size": 160, "threads": 2, "repeats": 5,
                            "device": "auto", "impl": "auto", "tapwise_ratio": None, "heap": "off"}


def keep_large_allocations_on_heap() -> bool:
    """glibc: serve large blocks from the heap and keep freed memory (``mallopt``), so per-step tensors of
    tens of MB (KW's per-sample kernels) are not re-mapped and page-faulted every step. Affects the plain
    and KW models alike; the same effect as running under jemalloc/tcmalloc. False where unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def baseline_of(name: str) -> str:
    """``kw1x_resnet18`` -> ``resnet18``."""
    return name.split("_", 1)[1] if name.startswith("kw") else name


def macs_per_image(model: nn.Module, size: int) -> dict[str, float]:
    """Analytic multiply-adds of conv / linear layers and of the KW kernel assembly (spec §c.5 split)."""
    totals = {"conv_linear": 0.0, "assembly": 0.0, "attention": 0.0}
    hooks = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(mod, KWLayer):
            params = mod.out_planes * (mod.in_planes // mod.groups) * mod.groups_spatial
            positions = out[0].numel() / mod.out_planes
            totals["conv_linear"] += params * positions
            totals["assembly"] += params * mod.num_cells
            totals["attention"] += sum(p.numel() for n, p in mod.attention.named_parameters()
                                       if n.endswith("weight") and p.ndim == 2)
        elif isinstance(mod, nn.Conv2d):
            totals["conv_linear"] += mod.weight.numel() * out[0].numel() / mod.out_channels
        elif isinstance(mod, nn.Linear):
            totals["conv_linear"] += mod.weight.numel() * x[0].numel() / mod.in_features

    for mod in model.modules():
        if isinstance(mod, (KWConvNd, KWLinear, nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return totals


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one training forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().mean().backward()
    model.zero_grad(set_to_none=True)
    return total


def make_steps(model: nn.Module, x: torch.Tensor, device: torch.device) -> dict[str, Callable[[], None]]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train() -> None:
        model.train()
        with amp:
            loss = model(x).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), amp:
            model(x)

    return {"train": train, "infer": infer}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_pair(name: str, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    batch, size = int(cfg["batch"]), int(cfg["size"])
    models = {"plain": create_model(baseline_of(name)), "kw": create_model(name)}
    manager = warehouse_manager(models["kw"])
    manager.impl = cfg["impl"]
    if cfg["tapwise_ratio"] is not None:
        manager.tapwise_ratio = float(cfg["tapwise_ratio"])
    manager.set_temperature(0.5)  # input-dependent attention, as during and after the anneal
    x = torch.randn(batch, 3, size, size)
    result: dict[str, Any] = {"model": name, "baseline": baseline_of(name)}
    for key, m in models.items():
        result[f"{key}_gmacs"] = sum(macs_per_image(m, size).values()) / 1e9
        result[f"{key}_params"] = sum(p.numel() for p in m.parameters())
        if device.type == "cpu":
            result[f"{key}_saved_mb"] = saved_activation_bytes(m, x) / 2**20
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = x.to(device, memory_format=memory_format)
    steps = {k: make_steps(m.to(device, memory_format=memory_format), x, device) for k, m in models.items()}
    for mode in ("infer", "train"):
        times: dict[str, list[float]] = {"plain": [], "kw": []}
        for key in times:  # warm-up
            steps[key][mode]()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                timed(steps[key][mode], device)
                result[f"{key}_{mode}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for _ in range(int(cfg["repeats"])):
            for key in times:
                times[key].append(timed(steps[key][mode], device))
        for key in times:
            result[f"{key}_{mode}_img_s"] = batch / statistics.median(times[key])
    return result


def parse_args(argv: list[str]) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in cfg:
            raise UserError(f"bench: unknown argument {arg!r}; use key=value with keys {sorted(cfg)}")
        cfg[key] = value
    if cfg["impl"] not in ("auto", "grouped"):
        raise UserError(f"bench: impl must be auto or grouped, got {cfg['impl']!r}")
    return cfg


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg["device"])
    torch.set_num_threads(int(cfg["threads"]))
    if cfg["heap"] not in ("on", "off"):
        raise UserError(f"bench: heap must be on or off, got {cfg['heap']!r}")
    heap = cfg["heap"] == "on" and keep_large_allocations_on_heap()
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} batch={cfg['batch']} size={cfg['size']} "
          f"impl={cfg['impl']} heap={'on' if heap else 'off'}"
          + (" (bf16 autocast, channels_last)" if device.type == "cuda" else ""))
    rows = []
    header = (f"{'model':<24}{'GMACs kw/plain':>16}{'infer img/s kw/plain':>24}{'ratio':>7}"
              f"{'train img/s kw/plain':>24}{'ratio':>7}{'memory kw/plain':>20}")
    print(header)
    for name in str(cfg["models"]).split(","):
        r = bench_pair(name.strip(), cfg, device)
        rows.append(r)
        mem_key = "saved_mb" if device.type == "cpu" else "train_peak_mb"
        print(f"{r['model']:<24}{r['kw_gmacs']:>7.3f}/{r['plain_gmacs']:<8.3f}"
              f"{r['kw_infer_img_s']:>11.1f}/{r['plain_infer_img_s']:<12.1f}"
              f"{r['plain_infer_img_s'] / r['kw_infer_img_s']:>6.2f}x"
              f"{r['kw_train_img_s']:>11.1f}/{r['plain_train_img_s']:<12.1f}"
              f"{r['plain_train_img_s'] / r['kw_train_img_s']:>6.2f}x"
              f"{r[f'kw_{mem_key}']:>9.0f}/{r[f'plain_{mem_key}']:<6.0f}MB")
    print("ratio = plain throughput / KW throughput (time of KW relative to plain); memory: "
          + ("autograd-saved activations per training step" if device.type == "cpu" else "peak allocated"))
    return rows


if __name__ == "__main__":
    main()
