"""``make bench-gridconv``: training and inference throughput (poses/s) of D-GridConv vs plain GridConv vs the
MLP baseline, side by side in one run, with the ratios (``common.bench``).

    python -m gridconv.bench                         # the README size: 256 channels, 2 blocks, batch 200
    python -m gridconv.bench hidden=32 repeats=5     # the smoke size

Training = forward + MSE + backward + Adam step at the training batch (official: 200); inference = eval-mode
forward at the evaluation batch (official: 1000). Every ``common.bench`` key works (``device``, ``threads``,
``repeats``, ``warmup``, ``modes``, ``memory``, ``macs``); candidates alternate round by round and the medians
are reported, with the time relative to plain GridConv. On a GPU: bf16 autocast, peak memory and achieved
TFLOP/s against the card's peak.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from common.bench import BENCH_DEFAULTS, Candidate, amp_dtype, bench_config, compare, describe, print_table
from common.cli import parse_overrides
from common.errors import cli_guard

from .models import build_model

DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "hidden": 256, "blocks": 2, "batch": 200, "eval_batch": 1000}
VARIANTS = (
    ("mlp_baseline", {"arch": "mlp", "hidden_size": 1024, "num_blocks": 2}),
    ("gridconv", {"arch": "gridconv", "padding_mode": ("c", "z")}),
    ("dgridconv_handcrafted", {"arch": "dgridconv", "sgt": "handcrafted"}),
    ("dgridconv_learnable", {"arch": "dgridconv", "sgt": "learnable"}),
)


def lifting_steps(model: nn.Module, batch: int, eval_batch: int, device: torch.device) -> dict[str, Any]:
    """Adam training step on ``forward_train``'s MSE; eval-mode forward under ``no_grad``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 17, 2, device=device) * 0.3, torch.randn(batch, 17, 3, device=device) * 0.3
    xe = torch.randn(eval_batch, 17, 2, device=device) * 0.3
    dtype = amp_dtype(device)

    def train() -> None:
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, losses = model.forward_train(x, y)
        optimizer.zero_grad(set_to_none=True)
        losses["loss_mse"].backward()
        optimizer.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(xe)

    return {"train": train, "infer": infer}


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "gridconv.bench", __doc__ or "")
    cfg = bench_config(opts)
    torch.manual_seed(0)
    batch, eval_batch = int(opts["batch"]), int(opts["eval_batch"])
    candidates = []
    for label, model_cfg in VARIANTS:
        model_cfg = dict(model_cfg)
        if model_cfg["arch"] != "mlp":
            model_cfg |= {"hidden_size": int(opts["hidden"]), "num_blocks": int(opts["blocks"])}
        model = build_model(model_cfg).to(cfg.device)
        candidates.append(Candidate(label, model, lifting_steps(model, batch, eval_batch, cfg.device),
                                    {"train": batch, "infer": eval_batch}, torch.zeros(1, 17, 2, device=cfg.device),
                                    unit="pose"))
    print(f"GridConv bench: {describe(cfg)}; batch {batch} (train) / {eval_batch} (inference); GridConv "
          f"{opts['blocks']} blocks x {opts['hidden']} channels, 5x5 grid; MLP 2 x 1024 (Martinez)")
    records = compare(candidates, cfg)
    print_table(records, baseline="gridconv")
    return records


if __name__ == "__main__":
    main()
