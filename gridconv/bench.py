"""``make bench-gridconv``: training and inference throughput (poses/s) of D-GridConv vs plain GridConv
vs the MLP baseline, side by side at one size, with the ratios.

    python -m gridconv.bench                       # the README size: 256 channels, 2 blocks, batch 200
    python -m gridconv.bench --hidden 32 --steps 5 # the smoke size

Training = forward + MSE + backward + Adam step at the training batch; inference = eval-mode forward at the
evaluation batch. On a GPU: bf16 autocast, peak memory and achieved TFLOP/s (convolution FLOPs counted by
torch's FLOP counter, training counted as 3x the forward).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from common.errors import cli_guard
from common.profiling import count_flops, count_params, human

from .models import build_model

VARIANTS = (
    ("mlp_baseline", {"arch": "mlp", "hidden_size": 1024, "num_blocks": 2}),
    ("gridconv", {"arch": "gridconv", "padding_mode": ("c", "z")}),
    ("dgridconv_handcrafted", {"arch": "dgridconv", "sgt": "handcrafted"}),
    ("dgridconv_learnable", {"arch": "dgridconv", "sgt": "learnable"}),
)


def timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_one(cfg: dict, batch: int, eval_batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 17, 2, device=device) * 0.3, torch.randn(batch, 17, 3, device=device) * 0.3
    xe = torch.randn(eval_batch, 17, 2, device=device) * 0.3
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def train_step() -> None:
        model.train()
        with amp:
            _, losses = model.forward_train(x, y)
        optimizer.zero_grad(set_to_none=True)
        losses["loss_mse"].backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        model.eval()
        with amp:
            model(xe)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = timed(train_step, steps, warmup, device)
    t_infer = timed(infer_step, steps, warmup, device)
    flops = count_flops(model, x[:1].float())["flops"]
    out = {"params": count_params(model), "macs_per_pose": flops // 2,
           "train_poses_s": batch / t_train, "infer_poses_s": eval_batch / t_infer}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["train_tflops"] = 3 * flops * batch / t_train / 1e12
        out["infer_tflops"] = flops * eval_batch / t_infer / 1e12
    return out


@cli_guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="GridConv channels (the README models: 256)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=200, help="training batch (official: 200)")
    parser.add_argument("--eval-batch", type=int, default=1000, help="inference batch (official: 1000)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch} (train) / {args.eval_batch} (inference); "
          f"GridConv {args.blocks} blocks x {args.hidden} channels, 5x5 grid; MLP 2 x 1024 (Martinez)")
    results = {}
    for label, cfg in VARIANTS:
        cfg = dict(cfg)
        if cfg["arch"] != "mlp":
            cfg |= {"hidden_size": args.hidden, "num_blocks": args.blocks}
        results[label] = bench_one(cfg, args.batch, args.eval_batch, args.steps, args.warmup, device)
    header = "| model | params | MACs/pose | train poses/s | infer poses/s | train vs GridConv | infer vs GridConv |"
    extra = " peak mem (GB) | train TFLOP/s |" if device.type == "cuda" else ""
    print(header + extra)
    print("|---" * (header.count("|") - 1 + extra.count("|")) + "|")
    base = results["gridconv"]
    for label, r in results.items():
        row = (f"| {label} | {human(r['params'])} | {human(r['macs_per_pose'])} | {r['train_poses_s']:,.0f} | "
               f"{r['infer_poses_s']:,.0f} | {r['train_poses_s'] / base['train_poses_s']:.2f}x | "
               f"{r['infer_poses_s'] / base['infer_poses_s']:.2f}x |")
        if device.type == "cuda":
            row += f" {r['peak_mem_gb']:.2f} | {r['train_tflops']:.2f} |"
        print(row)
    d = results["dgridconv_handcrafted"]
    print(f"D-GridConv / GridConv cost: {base['train_poses_s'] / d['train_poses_s']:.2f}x slower to train, "
          f"{base['infer_poses_s'] / d['infer_poses_s']:.2f}x slower at inference")


if __name__ == "__main__":
    main()
