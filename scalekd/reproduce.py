"""`make reproduce-scalekd`: the Table 3 / d.1 rows on ImageNet, or the smoke runs on synthetic JPEGs.

    python -m scalekd.reproduce                                     # smoke: teacher, CE, KD, ScaleKD (CPU minutes)
    python -m scalekd.reproduce data.root=/data/imagenet teacher_dir=/ckpt rows=swinl_resnet50,baseline_resnet50
    make reproduce-scalekd ARGS="data.root=/data/imagenet teacher_dir=/ckpt trainer.workers=16"

The keys are ``common.reproduce``'s (``data.root`` or ``$IMAGENET_ROOT``; rows, seeds, output_dir, profile,
dry_run) plus ``teacher_dir``: the released teachers under their official names (``TEACHER_FILES``) or as
``<teacher>.pth``. A distillation row whose teacher is not there is skipped with a line saying so. Every run
prints and records its viewed samples; the summary sets ScaleKD's budget beside Table 4's counterparts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.errors import cli_guard
from common.reproduce import Finished, Plan, Run, reproduce, row_experiment

from .viewed import table4_lines, viewed_samples

PAPER = "scalekd"
TEACHER_FILES = {"swin_s": "swin_small_patch4_window7_224-cc7a01c9.pth",
                 "swin_b": "swin_base_patch4_window7_224_22kto1k-f967f799.pth",
                 "swin_l": "swin_large_patch4_window7_224_22kto1k-5f0996db.pth",
                 "eva_l14": "eva-l-p14_mim-in21k-pre_3rdparty_in1k-196px_20221213-b730c7e7.pth"}


def find_teacher(teacher_dir: str | None, arch: str) -> Path | None:
    if not teacher_dir:
        return None
    for name in (TEACHER_FILES.get(arch, "-"), f"{arch}.pth"):
        if (Path(teacher_dir) / name).is_file():
            return Path(teacher_dir) / name
    return None


def full_runs(plan: Plan) -> list[Run]:
    """Each selected row on the ImageNet root; distillation rows with their teacher from teacher_dir."""
    root = plan.roots.get("imagenet")
    runs: list[Run] = []
    for row in plan.rows:
        experiment = row_experiment(row)
        if experiment is None:
            print(f"skip {row['id']}: an evaluation row (python -m scalekd.eval experiment={row['id']} checkpoint=...)")
            continue
        args = [f"experiment={experiment}", f"data.root={root}"]
        if row.get("teacher") and row.get("student"):
            found = find_teacher(plan.options["teacher_dir"], row["teacher"])
            if found is None:
                print(f"skip {row['id']}: no {row['teacher']} teacher in teacher_dir "
                      f"({TEACHER_FILES.get(row['teacher'], row['teacher'] + '.pth')})")
                continue
            args.append(f"model.teacher_checkpoint={found}")
        runs += [Run(row["id"], [*args, *plan.overrides], s) for s in plan.seeds]
    return runs


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """Teacher and the three students at the last evaluation, against 2x chance, with viewed samples."""
    lines = ["ScaleKD SMOKE runs: synthetic ImageNet-format JPEGs (10 classes, 64 px), small Swin teacher, small "
             "ResNet student; NOT comparable with the paper.", "",
             "| run | method | top-1, last evaluation | floor (2x chance) | met | viewed samples | time (s) |",
             "|---|---|---|---|---|---|---|"]
    viewed = 0
    for f in finished:
        record = json.loads((f.directory / "result.json").read_text())
        extra = record.get("extra", {})
        chance = 100.0 / 10
        top1 = f.metrics.get("top1", float("nan"))
        viewed = extra.get("viewed_samples", 0)
        method = extra.get("method", "ce")
        label = {"ce": "CE alone" if "teacher" not in f.run.name else "teacher (CE)", "kd": "logit KD",
                 "scalekd": "ScaleKD: 4 CAPs, both views, TPP, KD"}[method]
        lines.append(f"| {f.run.name} | {label} | {top1:.2f} | {2 * chance:.0f} | "
                     f"{'yes' if top1 >= 2 * chance else 'NO'} | {viewed:,} | {f.seconds:.0f} |")
    total = sum(f.seconds for f in finished)
    lines += ["", f"total wall {total:.0f} s (this machine, its load at the time)", "",
              f"Viewed samples (d.5, paper Table 4): ScaleKD on IN-1K views 1.28 M x 300 = "
              f"{viewed_samples([1.28], [300]):.0f} M; each smoke student viewed {viewed:,} "
              "(optimizer steps x global batch).", *table4_lines(),
              "The 195x pair compares a CLIP ViT-B/16 with a ScaleKD ViT-B/14 student, not two ViT-B/16s."]
    return "\n".join(lines)


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", extra={"teacher_dir": None},
                     plan_full=full_runs, summarize_smoke=smoke_summary)


if __name__ == "__main__":
    main()
