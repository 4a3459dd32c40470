"""`make reproduce-afdcd`: the Af-DCD table rows, or the smoke runs of the whole pipeline on synthetic data.

    python -m afdcd.reproduce                       # smoke: teacher, then CE, CE + KD, Af-DCD students (CPU)
    python -m afdcd.reproduce data.root=/data/cityscapes teacher_dir=/ckpt/cirkd init_dir=/ckpt/imagenet
    python -m afdcd.reproduce camvid_test_root=/data/camvid rows=camvid_pspnet_resnet18_afdcd seeds=0,1,2
    make reproduce-afdcd ARGS="data.root=/data/cityscapes teacher_dir=... trainer.workers=16"

The keys are ``common.reproduce``'s (``data.root`` is the Cityscapes root; ``<dataset>_root`` for
cityscapes_val, voc_val, camvid_test, ade20k_val, coco_stuff_164k_val, or ``$CITYSCAPES_ROOT`` ...), plus
``teacher_dir`` (the CIRKD teachers ``deeplabv3_resnet101_<citys|pascal_aug|camvid|ade20k|coco_stuff_164k>
_best_model.pth``) and ``init_dir`` (the CSAIL ImageNet inits ``resnet18-imagenet.pth``,
``mobilenetv2-imagenet.pth``). Teacher rows evaluate their checkpoint; a student row whose teacher is not in
``teacher_dir`` is skipped with a line saying so (baseline rows need none). The smoke summary prints each
run's mIoU beside the majority-class mIoU; a run below twice that floor makes the command fail (exit 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.errors import UserError, cli_guard
from common.reproduce import Finished, Plan, Run, reproduce

PAPER = "afdcd"
TEACHER_FILES = {"cityscapes_val": "citys", "voc_val": "pascal_aug", "camvid_test": "camvid",
                 "ade20k_val": "ade20k", "coco_stuff_164k_val": "coco_stuff_164k"}
INIT_FILES = {"resnet18": "resnet18-imagenet.pth", "mobilenetv2": "mobilenetv2-imagenet.pth"}
FLOOR = 2.0  # each smoke run must reach this multiple of the majority-class mIoU (issue item 7)


def full_runs(plan: Plan) -> list[Run]:
    """Selected rows on their dataset's root: teacher rows evaluate, student rows train on the local teacher."""
    teacher_dir = Path(plan.options["teacher_dir"]).expanduser() if plan.options["teacher_dir"] else None
    init_dir = Path(plan.options["init_dir"]).expanduser() if plan.options["init_dir"] else None
    runs: list[Run] = []
    for row in plan.rows:
        dataset = str(row.get("dataset"))
        root = plan.roots.get(dataset)
        if root is None:
            print(f"skip {row['id']}: no {dataset} root given")
            continue
        teacher = teacher_dir / f"deeplabv3_resnet101_{TEACHER_FILES[dataset]}_best_model.pth" if teacher_dir else None
        if row["role"] != "baseline" and (teacher is None or not teacher.is_file()):  # a baseline needs none
            print(f"skip {row['id']}: no teacher {teacher or 'deeplabv3_resnet101_..._best_model.pth'} "
                  "(set teacher_dir=)")
            continue
        base = [f"experiment={row['id']}", f"data.root={root}"]
        if row["role"] == "teacher":
            runs.append(Run(row["id"], [*base, f"checkpoint={teacher}", *plan.overrides], plan.seeds[0]))
            continue
        init = init_dir / INIT_FILES[row["model"].split("_", 1)[1]] if init_dir else None
        extra = [f"model.student_init={init}"] if init is not None and init.is_file() else []
        if not extra:
            print(f"{row['id']}: no ImageNet init in init_dir; the student starts from random weights")
        if row["role"] != "baseline":
            extra.append(f"model.teacher_checkpoint={teacher}")
        runs += [Run(row["id"], [*base, *extra, *plan.overrides], s) for s in plan.seeds]
    return runs


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """Each run's selected and last mIoU beside twice the majority-class mIoU (the floor); records failures."""
    lines = ["| run | mIoU (best) | mIoU (last) | majority-class mIoU | floor (2x) | met | time (s) |",
             "|---|---|---|---|---|---|---|"]
    failed = []
    for f in finished:
        record = json.loads((f.directory / "result.json").read_text())
        majority = float(record.get("extra", {}).get("majority_mIoU", float("nan")))
        miou = f.metrics.get("mIoU", float("nan"))
        met = miou >= FLOOR * majority
        failed += [] if met else [f.run.name]
        lines.append(f"| {f.run.name} | {miou:.2f} | {f.metrics.get('last_mIoU', float('nan')):.2f} | "
                     f"{majority:.2f} | {FLOOR * majority:.2f} | {'yes' if met else 'NO'} | {f.seconds:.0f} |")
    teacher_miou = [json.loads((f.directory / "result.json").read_text()).get("extra", {}).get("teacher_mIoU")
                    for f in finished]
    seen = next((t for t in teacher_miou if t is not None), None)
    if seen is not None:
        lines.append(f"\nteacher checked before distilling: mIoU {seen:.2f}")
    lines.append(f"total {sum(f.seconds for f in finished):.0f} s (smoke: synthetic data, 1/8-width networks)")
    plan.options["_floor_failed"] = failed
    return "\n".join(lines)


@cli_guard
def main(argv: list[str] | None = None) -> str:
    options = {"teacher_dir": None, "init_dir": None}
    holder: dict[str, Plan] = {}

    def summary(plan: Plan, finished: list[Finished]) -> str:
        holder["plan"] = plan
        return smoke_summary(plan, finished)

    text = reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", extra=options,
                     plan_full=full_runs, summarize_smoke=summary)
    failed = holder["plan"].options.get("_floor_failed") if "plan" in holder else None
    if failed:
        raise UserError(f"smoke floor not met (mIoU < {FLOOR:g}x the majority-class mIoU): {', '.join(failed)}")
    return text


if __name__ == "__main__":
    main()
