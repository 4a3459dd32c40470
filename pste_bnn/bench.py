"""Pieces the common bench harness times (phase 2 adds the CLI): Sparks vs SNN step-2 training steps at equal
tau (ResNet-18, batch 16, 160 px by default), the selection split into Hungarian / Sinkhorn / backward, and
inference from the export vs from latent weights. Each builder returns zero-argument callables.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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

    return step


def build_bench_pairs(model: str = "birealnet18", tau: int = 5, batch: int = 16, image_size: int = 160,
                      iters: int = 20, hard_every: int = 1, device: str = "cpu", seed: int = 0,
                      step_offset: int = 0) -> dict[str, Callable[[], None]]:
    """{"snn": step, "sparks": step}: one step-2 training step each (Adam, CE), equal tau and inputs.

    `step_offset` places the Sparks schedule (10k steps): 0 = gamma 1 (noisy, dense Hungarian), >= 2500 = gamma 0.
    """
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
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
