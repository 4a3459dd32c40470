"""``make reproduce-gridconv``: the README rows on Human3.6M, or, without it, the smoke comparison.

    python -m gridconv.reproduce --data-root /data/h36m [--seeds 0 1 2]   # the four README rows
    make reproduce-gridconv ARGS="data.root=/data/h36m"                  # the same
    python -m gridconv.reproduce                                          # synthetic smoke, CPU minutes

With a Human3.6M root (``--data-root`` or ``$GRIDCONV_H36M_ROOT``) every row of ``paper.yaml`` is trained
with its experiment file and the paper-vs-ours table is printed (mean +- std over seeds). Without one,
the smoke profile (spec section i) trains, on synthetic poses with 3 px detection-like noise, an MLP
baseline, plain GridConv, and D-GridConv with handcrafted and with learnable (frozen ``standard``) SGT, and
prints their MPJPE / P-MPJPE. Smoke numbers show that the pipeline learns; they are not the paper's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from common.config import compose
from common.errors import cli_guard
from common.profiling import count_params
from common.report import paper_report

from .models import build_model
from .train import CONFIG_DIR, PAPER, model_kwargs, run, validate_config

ROWS = ("gt_dgridconv_handcrafted", "gt_dgridconv_learnable", "hrnet_dgridconv_handcrafted",
        "hrnet_dgridconv_learnable")
# (name, overrides): the smoke comparison of spec section i (widths come from profile=smoke).
SMOKE_MODELS = (
    ("smoke_mlp_baseline", ["model=mlp", "model.hidden_size=256"]),  # the baseline keeps its 2x256 size
    ("smoke_gridconv_handcrafted", ["model=gridconv"]),
    ("smoke_dgridconv_handcrafted", ["model=dgridconv", "model.padding_mode=[c,r]"]),
    ("smoke_dgridconv_learnable", ["model=dgridconv", "model.sgt=learnable", "model.padding_mode=[c,r]"]),
)


def train_one(overrides: list[str], output_dir: Path, name: str, seed: int) -> tuple[dict[str, float], float]:
    cfg = compose(CONFIG_DIR, overrides + [f"name={name}", f"trainer.seed={seed}", "trainer.resume=none",
                                           f"output_dir={output_dir}"])
    out = output_dir / PAPER / name / f"{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    t0 = time.time()
    metrics = run(cfg, out)
    return metrics, time.time() - t0


def fmt(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{values[0]:.1f}"


def smoke(seeds: list[int], output_dir: Path, extra: list[str]) -> str:
    lines = ["| model | params | MPJPE (mm) | P-MPJPE (mm) | train+eval time (s) |", "|---|---|---|---|---|"]
    for name, overrides in SMOKE_MODELS:
        overrides = ["profile=smoke", *overrides, *extra]
        model_cfg = validate_config(compose(CONFIG_DIR, overrides)).model
        params = count_params(build_model(model_kwargs(model_cfg)))
        results = [train_one(overrides, output_dir, name, s) for s in seeds]
        p1 = [r[0]["mpjpe"] for r in results]
        p2 = [r[0]["pmpjpe"] for r in results]
        lines.append(f"| {name} | {params:,} | {fmt(p1)} | {fmt(p2)} | {fmt([r[1] for r in results])} |")
        print(lines[-1], flush=True)
    return "\n".join(["Smoke comparison (synthetic poses, 3 px 2D noise; seeds " + ", ".join(map(str, seeds))
                      + "; NOT comparable with the paper's Human3.6M numbers):", "", *lines])


def full(root: str, seeds: list[int], output_dir: Path, extra: list[str]) -> str:
    for row in ROWS:
        for seed in seeds:
            train_one([f"experiment={row}", f"data.root={root}", *extra], output_dir, row, seed)
    return paper_report(PAPER, output_dir)


@cli_guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("GRIDCONV_H36M_ROOT"),
                        help="Human3.6M folder (official layout or VideoPose3D npz); $GRIDCONV_H36M_ROOT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.epochs=1")
    args = parser.parse_args(argv)
    for item in list(args.overrides):  # `make reproduce-gridconv ARGS="data.root=/data/h36m"` works too
        if item.startswith("data.root="):
            args.overrides.remove(item)
            args.data_root = item.split("=", 1)[1] or None
    if args.data_root:
        print(full(args.data_root, args.seeds, args.output_dir, args.overrides))
    else:
        print("no Human3.6M root (--data-root / $GRIDCONV_H36M_ROOT): running the synthetic smoke profile")
        # One thread per run, as the spec's reference timings: these small networks issue many tiny ops,
        # and multi-threaded ones slow down several-fold on a CPU shared with other jobs.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            print(smoke(args.seeds, args.output_dir, args.overrides))
        finally:
            torch.set_num_threads(threads)
        print()
        print(paper_report(PAPER, args.output_dir))


if __name__ == "__main__":
    main()
