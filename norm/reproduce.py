"""`make reproduce-norm`: the NORM table rows, or a smoke run of the whole pipeline on synthetic data.

    python -m norm.reproduce                                        # smoke: a few CPU minutes, synthetic CIFAR
    python -m norm.reproduce data.root=/data/cifar100               # Tables 1-2 (teachers first, unless given)
    python -m norm.reproduce cifar100_root=... teacher_dir=/ckpt/cifar_teachers rows=cifar100_vgg13_vgg8
    python -m norm.reproduce imagenet_root=/data/imagenet teacher_dir=/ckpt/torchvision
    make reproduce-norm ARGS="data.root=/data/cifar100 trainer.workers=16"

The keys are ``common.reproduce``'s (``data.root`` is the CIFAR-100 root; ``imagenet_root``; the roots may also
come from ``$CIFAR100_ROOT`` / ``$IMAGENET_ROOT``), plus ``teacher_dir``: released teachers, RepDistiller's
``<arch>_vanilla/ckpt_epoch_240.pth`` (or ``<arch>.pth``), torchvision ``resnet34-333f7ec4.pth`` /
``resnet50-19c8e357.pth`` (or ``<arch>.pth``). A CIFAR teacher that is not there is trained first with its
``cifar100_teacher_<arch>`` row. Any other ``key=value`` is a Hydra override passed to every run. The smoke
runs (``paper.yaml``) train a small teacher, then the student without NORM (plain CE) and with NORM, fold the
FT, and print the table labelled smoke.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.errors import cli_guard
from common.reproduce import Finished, Plan, Run, load_spec, reproduce

PAPER = "norm"
TEACHER_FILES = {"resnet34": "resnet34-333f7ec4.pth", "resnet50": "resnet50-19c8e357.pth"}


def find_teacher(teacher_dir: Path | None, arch: str) -> Path | None:
    if teacher_dir is None:
        return None
    for cand in (teacher_dir / f"{arch}_vanilla" / "ckpt_epoch_240.pth", teacher_dir / f"{arch}.pth",
                 teacher_dir / TEACHER_FILES.get(arch, "-")):
        if cand.is_file():
            return cand
    return None


def full_runs(plan: Plan) -> list[Run]:
    """Selected rows on their dataset's root; each student after its teacher (released, or trained first)."""
    teacher_dir = Path(plan.options["teacher_dir"]) if plan.options["teacher_dir"] else None
    runs: list[Run] = []
    teachers: dict[str, str] = {}
    for row in plan.rows:
        dataset = str(row.get("dataset"))
        root = plan.roots.get(dataset)
        if root is None:
            print(f"skip {row['id']}: no {dataset} root given")
            continue
        base = [f"experiment={row['id']}", f"data.root={root}"]
        if row["role"] != "student":
            runs += [Run(row["id"], [*base, *plan.overrides], s) for s in plan.seeds]
            continue
        arch = row["teacher"]
        if arch not in teachers:
            found = find_teacher(teacher_dir, arch)
            if found is None and dataset == "cifar100":
                name = f"cifar100_teacher_{arch}"
                print(f"teacher {arch}: not in teacher_dir, trained first ({name})")
                runs.append(Run(name, [f"experiment={name}", f"data.root={root}", *plan.overrides], plan.seeds[0]))
                found = Path(f"{{run:{name}}}") / "best.pt"
            if found is None:
                print(f"skip {row['id']}: no {arch} teacher in teacher_dir ({TEACHER_FILES.get(arch, arch + '.pth')})")
                continue
            teachers[arch] = str(found)
        runs += [Run(row["id"], [*base, f"model.teacher_checkpoint={teachers[arch]}", *plan.overrides], s)
                 for s in plan.seeds]
    return runs


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """Teacher, CE student, NORM student (and the FT folded) beside the paper's CIFAR-100 values of that row."""
    from .models import create_model

    rows = {r["id"]: r for r in load_spec(PAPER)[1]}
    by_name = {f.run.name: f for f in finished}
    teacher, baseline, student = (by_name[item["name"]] for item in plan.spec["smoke"])
    row = rows[student.run.name]
    result = json.loads((student.directory / "result.json").read_text())
    extra = {**result, **result.get("extra", {})}

    def acc(f: Finished) -> str:
        return f"{f.metrics['top1']:.2f} / {f.metrics.get('best_top1', float('nan')):.2f}"

    def params(arch: str) -> str:
        return f"{sum(p.numel() for p in create_model(arch, 10).parameters()):,}"

    seconds = sum(f.seconds for f in finished)
    return "\n".join([
        f"NORM smoke run: {row['teacher']} -> {row['student']} on synthetic CIFAR-format data ({seconds:.0f} s). "
        "SMOKE numbers: not comparable with the paper's CIFAR-100 values.",
        "",
        "| setting | paper top-1 (CIFAR-100) | ours top-1 (smoke): last / best epoch | params |",
        "|---|---|---|---|",
        f"| teacher {row['teacher']} (CE) | {row['teacher_top1']:.2f} | {acc(teacher)} | {params(row['teacher'])} |",
        f"| student {row['student']} (CE baseline) | {row['student_baseline_top1']['crd_paper']:.2f} | {acc(baseline)} "
        f"| {params(row['student'])} |",
        f"| student {row['student']} + NORM (N = {row['N']}) | {row['metrics']['top1']:.2f} | {acc(student)} | "
        f"{extra.get('params_train', 0):,} train-time |",
        (f"| ... FT folded into the classifier | {row['metrics']['top1']:.2f} | "
         f"{student.metrics['top1_folded']:.2f} | {extra.get('params_deployed', 0):,} deployed |"
         if "top1_folded" in student.metrics else
         f"| ... FT not folded: a BN-ReLU follows it in {row['student']} (spec b.5), it deploys with the FT | "
         f"{row['metrics']['top1']:.2f} | — | — |"),
        "",
        f"teacher checked before distilling: top-1 {extra.get('teacher_top1', float('nan')):.2f}; params are for "
        "the smoke models (10 classes).",
    ])


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", extra={"teacher_dir": None},
                     plan_full=full_runs, summarize_smoke=smoke_summary)


if __name__ == "__main__":
    main()
