"""`make bench-norm`: what NORM costs, side by side with its baseline in one run (``common.bench``).

1. Training: images/s of a NORM distillation step (student + FT forward/backward, teacher forward) against
   plain CE training of the same student.
2. Inference: the deployed (FT folded) student against the plain network (must be equal: same parameter
   count and FLOPs, same measured speed), with the unfolded train-time student for reference.

    python -m norm.bench                                          # resnet32x4 -> resnet8x4, CIFAR size
    python -m norm.bench row=imagenet_resnet34_resnet18 batch=128 device=cuda

Every ``common.bench`` key works (``device``, ``threads``, ``repeats``, ``warmup``, ``modes``, ``memory``,
``macs``); the candidates alternate round by round and the medians are reported. GPU: bf16 autocast and
channels_last, TFLOP/s against the card's peak.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from common.bench import (
    BENCH_DEFAULTS,
    Candidate,
    amp_dtype,
    bench_config,
    classification_steps,
    compare,
    describe,
    print_table,
)
from common.cli import parse_overrides
from common.errors import UserError, cli_guard

from .distiller import NORMDistiller
from .models import NORMStudent, create_model
from .schedules import CIFAR_MULTIPLIER

DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "row": "cifar100_resnet32x4_resnet8x4", "batch": 64}


def distill_step(method: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """A NORM training step: ``forward_train`` losses summed, backward, SGD-momentum step."""
    opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    dtype = amp_dtype(x.device)

    def train() -> None:
        method.train()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            _, losses = method.forward_train(x, y)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"train": train}


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "norm.bench", __doc__ or "")
    rows = {r["id"]: r for r in yaml.safe_load((Path(__file__).parent / "paper.yaml").read_text())["rows"]}
    row = rows.get(opts["row"])
    if row is None or row["role"] != "student":
        raise UserError(f"norm.bench: row={opts['row']}: choose a student row of norm/paper.yaml")
    cfg = bench_config(opts)
    device, batch = cfg.device, int(opts["batch"])
    nc, size = (1000, 224) if row["id"].startswith("imagenet") else (100, 32)
    mf = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size).to(device, memory_format=mf)
    y = torch.randint(0, nc, (batch,), device=device)
    sample = torch.zeros(1, 3, size, size, device=device)

    def prepare(m: nn.Module) -> nn.Module:
        return m.to(device=device, memory_format=mf)

    plain = prepare(create_model(row["student"], nc, norm_variant=True))
    plain_steps = classification_steps(plain, x, loss=lambda out: nn.functional.cross_entropy(out.float(), y))
    student = NORMStudent(create_model(row["student"], nc, norm_variant=True), row["teacher_channels"], row["N"])
    method = prepare(NORMDistiller(student, create_model(row["teacher"], nc), ce_weight=0.1,
                                   multiplier=CIFAR_MULTIPLIER))
    train_time = classification_steps(method.student, x)
    candidates = [
        Candidate("plain student", plain, plain_steps, batch, sample),
        Candidate("NORM (train-time)", method.student, {**distill_step(method, x, y), "infer": train_time["infer"]},
                  batch, sample),
    ]
    if not row["student"].startswith("wrn"):  # WRN students keep a 1x1 conv after folding (spec b.5)
        deployed = prepare(method.student.fold())
        candidates.append(Candidate("NORM deployed (folded)", deployed,
                                    {"infer": classification_steps(deployed, x)["infer"]}, batch, sample))
    print(f"NORM bench: {row['teacher']} -> {row['student']} (N = {row['N']}), batch {batch}, {size} px, "
          f"{describe(cfg)}; train: NORM = distillation step (teacher forward included) vs CE training")
    records = compare(candidates, cfg)
    print_table(records, baseline="plain student")
    return records


if __name__ == "__main__":
    main()
