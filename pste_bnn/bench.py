"""`make bench-pste_bnn`: one run on common.bench (issue 13 item 10).

    python -m pste_bnn.bench                                    # ResNet-18, tau 5, batch 16, 160 px, 2 threads
    python -m pste_bnn.bench device=cuda batch=64 size=224      # GPU
    python -m pste_bnn.bench tau=4 iters=10 hard_every=4 schedule_points=0,0.5

Prints (1) size and BOPs per model and tau vs the 1-bit network, as ratios (b.12); (2) a step-2 training step
of Sparks vs SNN at equal tau (Adam, CE), at each schedule point (fraction of step 2: 0 = gamma 1, noisy dense
Hungarian; >= 0.25 = gamma 0), with the Sparks / SNN ratio; (3) the selection of all layers split into
Hungarian solves, Sinkhorn forward and Sinkhorn forward + backward; (4) inference from the export (ids, index
map, alpha) vs from latent weights with the frozen selection.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.bench import BENCH_DEFAULTS, Candidate, bench_config, compare, describe, print_table, ratio
from common.cli import parse_overrides, split_list
from common.errors import UserError, cli_guard

from .accounting import accounting
from .models import create_model
from .sparks import N_CODEWORDS, ExportedBinaryConv, HungarianJob, gumbel_noise, sinkhorn


def _train_step(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith("selector.logits")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("selector.logits")], "lr": 1e-2}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=1e-3)
    schedule = getattr(model, "selection_schedule", None)
    state = {"step": 0}

    def step() -> None:
        if schedule is not None:
            schedule.set_step(state["step"], 10_000)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        opt.step()
        state["step"] += 1

    step.model = model  # type: ignore[attr-defined]  # what the bench counts parameters on
    return step


def build_bench_pairs(model: str = "birealnet18", tau: int = 5, batch: int = 16, image_size: int = 160,
                      iters: int = 20, hard_every: int = 1, device: str = "cpu", seed: int = 0,
                      step_offset: int = 0) -> dict[str, Callable[[], None]]:
    """{"snn": step, "sparks": step}: one step-2 training step each (Adam, CE), equal tau and inputs.

    `step_offset` places the Sparks schedule (10k steps): 0 = gamma 1 (noisy, dense Hungarian), >= 2500 = gamma 0.
    """
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)  # every model here has >= 10 classes
    pairs = {}
    for quantizer in ("snn", "sparks"):
        kwargs = {"iters": iters, "hard_every": hard_every, "init": "freq"} if quantizer == "sparks" else {}
        net = create_model(model, quantizer=quantizer, tau=tau, quantizer_kwargs=kwargs).to(device).train()
        if quantizer == "sparks":
            for _, conv in net.binary_convs():
                conv.weight.data.normal_(0, 0.05)
                conv.selector.init_from_weight(conv.weight)
        step = _train_step(net, images, targets)
        if quantizer == "sparks" and step_offset:
            net.selection_schedule.set_step(step_offset, 10_000)
        pairs[quantizer] = step
    return pairs


def build_selection_parts(layers: int = 16, n: int = 32, iters: int = 20, temperature: float = 1.0,
                          noise_factor: float = 1.0, device: str = "cpu") -> dict[str, Callable[[], object]]:
    """The selection of one step for `layers` layers, split: Hungarian solves, Sinkhorn forward, its backward."""
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(layers, N_CODEWORDS, N_CODEWORDS)
    logits[:, torch.arange(n), torch.randperm(N_CODEWORDS, generator=g)[:n]] = 5.0
    scores = (logits + noise_factor * gumbel_noise(logits.shape, g)).double().to(device)
    grad = torch.randn(layers, n, N_CODEWORDS, dtype=torch.float64, device=device)

    def hungarian_part() -> object:
        return HungarianJob(scores).result()

    def sinkhorn_part() -> object:
        return sinkhorn(scores, temperature, iters, rows=n)

    leaf = scores.clone().requires_grad_(True)

    def backward_part() -> object:
        return torch.autograd.grad(sinkhorn(leaf, temperature, iters, rows=n), leaf, grad)

    return {"hungarian": hungarian_part, "sinkhorn_forward": sinkhorn_part, "sinkhorn_fwd_bwd": backward_part}


def build_inference_pair(model: str = "birealnet18", tau: int = 5, batch: int = 16, image_size: int = 160,
                         device: str = "cpu") -> dict[str, Callable[[], object]]:
    """Eval forward from latent weights + frozen selection vs from the exported (ids, index map, alpha)."""
    net = create_model(model, quantizer="sparks", tau=tau).to(device).eval()
    exported = create_model(model, quantizer="sparks", tau=tau).to(device).eval()
    exported.load_state_dict(net.state_dict())
    for name, conv in exported.binary_convs():
        parent, _, attr = name.rpartition(".")
        setattr(exported.get_submodule(parent), attr, ExportedBinaryConv(conv.export()))
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def run(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(x)

    with torch.no_grad():
        net(x)  # freeze the selection once
    return {"latent": run(net), "export": run(exported)}


def size_and_bops(model: str = "birealnet18", taus: tuple[int, ...] = (6, 5, 4)) -> dict[int, dict]:
    """Size and BOPs per tau, with the ratios to the 1-bit network (spec b.12)."""
    net = create_model(model, quantizer="real")
    return {tau: accounting(net, tau) for tau in taus}


DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "threads": 2, "repeats": 5, "memory": False, "macs": False,
                            "model": "birealnet18", "tau": 5, "batch": 16, "size": 160, "iters": 20, "hard_every": 1,
                            "schedule_points": "0,0.5", "size_models": "birealnet18,birealnet34", "taus": "6,5,4"}


def print_size_table(models: list[str], taus: tuple[int, ...]) -> None:
    """Size and BOPs per model and tau, and their ratios to the 1-bit network (b.12)."""
    print("| model | tau | bits/weight | size (bits) | size 1-bit / size | BOPs | BOPs 1-bit / BOPs |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        for tau, acc in size_and_bops(name, taus).items():
            print(f"| {name} | {tau} | {acc['bits_per_weight']:.3f} | {acc['size_bits']:,} | "
                  f"{acc['size_ratio_vs_1bit']:.2f}x | {acc['bops_subbit']:,} | {acc['bops_ratio_vs_1bit']:.2f}x |")


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "pste_bnn.bench", __doc__ or "")
    cfg = bench_config(opts)
    if not 0 <= int(opts["tau"]) <= 9:
        raise UserError(f"bench: tau must be in 0..9, got {opts['tau']}")
    points = [float(p) for p in split_list(str(opts["schedule_points"]))]
    device = str(cfg.device)
    print(f"pste_bnn bench: {describe(cfg)}, {opts['model']}, tau {opts['tau']}, batch {opts['batch']}, "
          f"{opts['size']} px, L = {opts['iters']}, hard_every = {opts['hard_every']}")
    print("\nSize and BOPs vs the 1-bit network (binary 3x3 convs, 224 px):")
    print_size_table(split_list(str(opts["size_models"])), tuple(int(t) for t in split_list(str(opts["taus"]))))
    records: list[dict[str, Any]] = []
    total = 10_000
    for point in points if "train" in cfg.modes else []:  # modes= selects what is timed, as in every bench
        pairs = build_bench_pairs(opts["model"], int(opts["tau"]), int(opts["batch"]), int(opts["size"]),
                                  int(opts["iters"]), int(opts["hard_every"]), device, step_offset=int(point * total))
        cands = [Candidate(f"{q}@{point:g}", pairs[q].model, {"train": pairs[q]}, int(opts["batch"]))
                 for q in ("snn", "sparks")]
        rows = compare(cands, _only(cfg, "train"))
        print_table(rows, baseline=f"snn@{point:g}", title=f"\nstep-2 training step at {point:g} of step 2 "
                    f"(gamma {max(0.0, 1 - point / 0.25):g})")
        r = ratio(rows, "train", f"sparks@{point:g}", f"snn@{point:g}")
        print(f"Sparks / SNN training step at {point:g}: {r:.2f}x (bar: <= 1.8x)")
        records += rows
    if "train" in cfg.modes:
        net = create_model(opts["model"], quantizer="sparks", tau=int(opts["tau"]))
        layers = len(net.binary_convs())
        parts = build_selection_parts(layers, 2 ** int(opts["tau"]), int(opts["iters"]), device=device)
        cands = [Candidate(k, nn.Identity(), {"train": v}, 1, unit="step") for k, v in parts.items()]
        rows = compare(cands, _only(cfg, "train"))
        print(f"\nselection of all {layers} layers, one step (gamma 1):")
        for r in rows:
            print(f"  {r['name']}: {r['seconds'] * 1e3:.1f} ms")
        records += rows
    if "infer" in cfg.modes:
        pair = build_inference_pair(opts["model"], int(opts["tau"]), int(opts["batch"]), int(opts["size"]), device)
        cands = [Candidate(k, nn.Identity(), {"infer": v}, int(opts["batch"])) for k, v in pair.items()]
        rows = compare(cands, _only(cfg, "infer"))
        print_table(rows, baseline="latent", title="\ninference: export (ids, index map, alpha) vs latent weights")
        records += rows
    return records


def _only(cfg: Any, mode: str) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, modes=(mode,))


if __name__ == "__main__":
    main()
