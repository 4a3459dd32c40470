"""`make reproduce-norm`: the NORM table rows, or a smoke run of the whole pipeline on synthetic data.

    python -m norm.reproduce                                    # smoke: a few CPU minutes, synthetic CIFAR
    python -m norm.reproduce --cifar100-root /data/cifar100     # Tables 1-2 (teachers first, unless given)
    python -m norm.reproduce --cifar100-root ... --teacher-dir /ckpt/cifar_teachers --rows cifar100_vgg13_vgg8
    python -m norm.reproduce --imagenet-root /data/imagenet --teacher-dir /ckpt/torchvision
    make reproduce-norm ARGS="data.root=/data/cifar100 trainer.workers=16"   # Hydra-style, as the Makefile

Any `key=value` argument is a Hydra override passed to every run; `data.root=` is the CIFAR-100 root.

`--teacher-dir` holds released teachers: RepDistiller's `<arch>_vanilla/ckpt_epoch_240.pth` (or
`<arch>.pth`), torchvision `resnet34-333f7ec4.pth` / `resnet50-19c8e357.pth` (or `<arch>.pth`). A CIFAR
teacher that is not there is trained first with its `cifar100_teacher_<arch>` row. The roots may also
come from the environment (`CIFAR100_ROOT`, `IMAGENET_ROOT`). The smoke profile trains a small teacher,
then the student without NORM (plain CE) and with NORM, folds the FT, and prints the table labelled smoke.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from common.config import compose
from common.errors import UserError, cli_guard
from common.report import paper_report

from . import train

PAPER_YAML = Path(__file__).parent / "paper.yaml"
SMOKE_ROW = "cifar100_resnet56_resnet20"  # the cheapest Table-1 pair on a CPU
TEACHER_FILES = {"resnet34": "resnet34-333f7ec4.pth", "resnet50": "resnet50-19c8e357.pth"}


def _rows() -> list[dict[str, Any]]:
    return yaml.safe_load(PAPER_YAML.read_text())["rows"]


def _run(overrides: list[str]) -> tuple[dict[str, float], Path]:
    return train.run(compose(train.CONFIG_DIR, overrides))


def _find_teacher(teacher_dir: Path | None, arch: str) -> Path | None:
    if teacher_dir is None:
        return None
    for cand in (teacher_dir / f"{arch}_vanilla" / "ckpt_epoch_240.pth", teacher_dir / f"{arch}.pth",
                 teacher_dir / TEACHER_FILES.get(arch, "-")):
        if cand.is_file():
            return cand
    return None


def full(cifar_root: str | None, imagenet_root: str | None, teacher_dir: Path | None, rows: list[str] | None,
         output_dir: str, extra: list[str]) -> None:
    """Run the selected student rows (and the CIFAR teacher rows they need) with the paper's recipe."""
    table = [r for r in _rows() if r["role"] == "student" and (rows is None or r["id"] in rows)]
    teachers: dict[str, Path] = {}
    for row in table:
        cifar = row["id"].startswith("cifar100")
        root = cifar_root if cifar else imagenet_root
        if root is None:
            print(f"skip {row['id']}: no {'CIFAR-100' if cifar else 'ImageNet'} root given")
            continue
        arch = row["teacher"]
        if arch not in teachers:
            found = _find_teacher(teacher_dir, arch)
            if found is None and cifar:
                print(f"training teacher {arch} (experiment=cifar100_teacher_{arch})")
                _, run_dir = _run([f"experiment=cifar100_teacher_{arch}", f"data.root={root}",
                                   f"output_dir={output_dir}", *extra])
                found = run_dir / "best.pt"
            if found is None:
                print(f"skip {row['id']}: no {arch} teacher in --teacher-dir ({TEACHER_FILES.get(arch)})")
                continue
            teachers[arch] = found
        print(f"running {row['id']} with teacher {teachers[arch]}")
        _run([f"experiment={row['id']}", f"data.root={root}", f"model.teacher_checkpoint={teachers[arch]}",
              f"output_dir={output_dir}", *extra])
    print(paper_report("norm", Path(output_dir)))


def smoke(output_dir: str, epochs: int, image_size: int, extra: list[str]) -> None:
    """Teacher, student without NORM, student with NORM on synthetic CIFAR-format data, then the table."""
    row = next(r for r in _rows() if r["id"] == SMOKE_ROW)
    sizes = ["profile=smoke", f"output_dir={output_dir}", f"data.image_size={image_size}", "trainer.log_every=1000",
             *extra]
    t0 = time.time()
    # the deeper teacher learns slower: it gets twice the students' epochs (step decays at the same fractions)
    teacher, teacher_dir = _run([f"experiment=cifar100_teacher_{row['teacher']}", f"trainer.epochs={2 * epochs}",
                                 f"schedule.milestones={_milestones(2 * epochs)}", *sizes])
    sizes += [f"trainer.epochs={epochs}", f"schedule.milestones={_milestones(epochs)}"]
    baseline, _ = _run([f"experiment={SMOKE_ROW}", "method=ce", f"name={SMOKE_ROW}_baseline", "row=null", *sizes])
    norm, norm_dir = _run([f"experiment={SMOKE_ROW}", f"model.teacher_checkpoint={teacher_dir / 'best.pt'}",
                           *sizes])
    result = json.loads((norm_dir / "result.json").read_text())
    elapsed = time.time() - t0

    paper = {"teacher": row["teacher_top1"], "baseline": row["student_baseline_top1"]["crd_paper"],
             "norm": row["metrics"]["top1"]}
    lines = [
        f"NORM smoke run: {row['teacher']} -> {row['student']} on synthetic CIFAR-format data (10 classes, "
        f"{image_size} px, {epochs} epochs, {elapsed:.0f} s). SMOKE numbers: not comparable with the paper's "
        "CIFAR-100 values, and NORM is not expected to beat the baseline at this scale (spec i).",
        "",
        "| setting | paper top-1 (CIFAR-100) | ours top-1 (smoke): last / best epoch | params |",
        "|---|---|---|---|",
        f"| teacher {row['teacher']} (CE) | {paper['teacher']:.2f} | {_acc(teacher)} (smoke) | "
        f"{_params(row['teacher'])} |",
        f"| student {row['student']} (CE baseline) | {paper['baseline']:.2f} | {_acc(baseline)} (smoke) | "
        f"{_params(row['student'])} |",
        f"| student {row['student']} + NORM (N = {row['N']}) | {paper['norm']:.2f} | {_acc(norm)} (smoke) | "
        f"{result.get('params_train', 0):,} train-time |",
        f"| ... FT folded into the classifier | {paper['norm']:.2f} | {norm.get('top1_folded', float('nan')):.2f} "
        f"(smoke) | {result.get('params_deployed', 0):,} deployed |",
        "",
        f"teacher checked before distilling: top-1 {result.get('teacher_top1', float('nan')):.2f}; params are "
        "for the smoke models (10 classes).",
    ]
    print("\n".join(lines))
    print()
    print(paper_report("norm", Path(output_dir)))


def _milestones(epochs: int) -> list[int]:
    """The CIFAR recipe's step decays (after 151/181/211 of 241 epochs) at the same fractions of a short run."""
    return [round(epochs * m / 241) for m in (151, 181, 211)]


def _acc(metrics: dict[str, float]) -> str:
    return f"{metrics['top1']:.2f} / {metrics.get('best_top1', float('nan')):.2f}"


def _params(arch: str) -> str:
    from .models import create_model

    return f"{sum(p.numel() for p in create_model(arch, 10).parameters()):,}"


@cli_guard
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar100-root", default=os.environ.get("CIFAR100_ROOT"))
    p.add_argument("--imagenet-root", default=os.environ.get("IMAGENET_ROOT"))
    p.add_argument("--teacher-dir", type=Path, default=None, help="released teacher checkpoints")
    p.add_argument("--rows", nargs="*", default=None, help="paper.yaml row ids (default: all)")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--smoke-epochs", type=int, default=8)
    p.add_argument("--smoke-image-size", type=int, default=16)
    args, rest = p.parse_known_args(argv)
    extra = []
    for a in rest:
        if "=" not in a or a.startswith("-"):
            raise UserError(f"unknown argument {a!r}; use the options of --help or Hydra overrides key=value")
        if a.startswith("data.root="):
            args.cifar100_root = a.split("=", 1)[1]
        else:
            extra.append(a)
    known = {r["id"] for r in _rows()}
    for r in args.rows or []:
        if r not in known:
            raise UserError(f"--rows {r}: not a row of norm/paper.yaml; choose from {', '.join(sorted(known))}")
    if args.cifar100_root is None and args.imagenet_root is None:
        smoke(args.output_dir, args.smoke_epochs, args.smoke_image_size, extra)
    else:
        full(args.cifar100_root, args.imagenet_root, args.teacher_dir, args.rows, args.output_dir, extra)


if __name__ == "__main__":
    main()
