"""What NOAH costs: each NOAH model beside the same host with its plain head, in one run (``common.bench``).

    python -m noah.bench                        # ResNet50, MobileNetV2 1.0x: CPU, B=16, 224 px, 2 threads
    python -m noah.bench models=resnet18,deit_tiny_patch16_224 batch=64 threads=8
    python -m noah.bench device=cuda batch=128  # GPU: bf16 autocast, channels_last, TFLOP/s

Every ``common.bench`` key works (``device``, ``threads``, ``repeats``, ``warmup``, ``modes``, ``memory``,
``macs``). Training step = forward, mean-of-logits loss, backward, SGD step; inference = eval-mode
``inference_mode`` forward; the two heads alternate round by round and medians are reported (issue 10, item 9).

The budget (issue 10, item 9): NOAH's grouped 1x1 convs are dense GEMMs, so its share of inference time should
not exceed its extra-MAC share ``s = MACs(NOAH) / MACs(baseline) - 1`` (spec c: ResNet50 2.4 %, MobileNetV2
1.0x 20.4 %): inference <= 1 + s + 0.03, training <= 1 + 1.5 s + 0.03 (the backward through the softmax and
product over ``(B, N, K, L)`` is memory-bound; 0.03 for timing noise). The bench prints both and whether met.
Like every noah entry point it keeps large allocations on the heap (``noah/__init__.py``; ``NOAH_HEAP=off``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from common.allocator import heap_kept
from common.bench import BENCH_DEFAULTS, Candidate, bench_config, classification_steps, compare, describe, print_table
from common.bench import ratio as time_ratio
from common.cli import parse_overrides, split_list
from common.errors import UserError, cli_guard
from noah.models import create_model, list_models

DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "threads": 2, "repeats": 7, "models": "resnet50,mobilenetv2_100",
                            "batch": 16, "size": 224, "num_classes": 1000}
NOISE = 0.03  # timing noise allowance of the budget


def candidates_for(host: str, opts: dict[str, Any], device: torch.device) -> list[Candidate]:
    """The host with its baseline head and with NOAH (paper N, r, dropout), on one shared batch."""
    batch, size, k = int(opts["batch"]), int(opts["size"]), int(opts["num_classes"])
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size).to(device, memory_format=memory_format)
    sample = torch.zeros(1, 3, size, size, device=device)
    out = []
    for head in ("baseline", "noah"):
        model = create_model(host, head=head, num_classes=k, img_size=size).to(device, memory_format=memory_format)
        out.append(Candidate(f"{host} {head}", model, classification_steps(model, x), batch=batch, sample=sample))
    return out


def budget(records: list[dict[str, Any]], host: str) -> list[str]:
    """Lines: measured time ratios NOAH / baseline against the MAC-share budget of item 9."""
    base, noah = f"{host} baseline", f"{host} noah"
    macs = {r["name"]: r["macs"] for r in records}
    lines = []
    if macs.get(base) and macs.get(noah):
        s = macs[noah] / macs[base] - 1.0
        lines.append(f"{host}: NOAH adds s = {100 * s:.1f}% MACs")
    else:
        s = None
    for mode in sorted({r["mode"] for r in records}):
        measured = time_ratio(records, mode, noah, base)
        line = f"  {mode}: NOAH step = {measured:.3f}x the baseline's"
        if s is not None:
            limit = 1 + (s if mode == "infer" else 1.5 * s) + NOISE
            line += f" (budget {limit:.3f}x: {'met' if measured <= limit else 'NOT met'})"
        lines.append(line)
    return lines


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "noah.bench", __doc__ or "")
    hosts = split_list(str(opts["models"]))
    unknown = [h for h in hosts if h.removeprefix("noah_") not in list_models()]
    if unknown:
        raise UserError(f"noah.bench: unknown models {unknown}; known hosts: {', '.join(list_models())}")
    cfg = bench_config(opts)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"NOAH bench: {describe(cfg)}, batch {opts['batch']}, {opts['size']} px, K={opts['num_classes']}, "
          f"median of {cfg.repeats}; large allocations on the heap: {'yes' if heap_kept() else 'no (NOAH_HEAP=off)'}; "
          f"1-min load average at start {load:.1f} on {os.cpu_count()} CPUs")
    records: list[dict[str, Any]] = []
    for host in (h.removeprefix("noah_") for h in hosts):
        rows = compare(candidates_for(host, opts, cfg.device), cfg)
        print_table(rows, baseline=f"{host} baseline", title=f"\n{host}: NOAH vs its plain head")
        print("\n".join(budget(rows, host)), flush=True)
        records += rows
    return records


if __name__ == "__main__":
    main()
