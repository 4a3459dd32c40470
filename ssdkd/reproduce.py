"""`make reproduce-ssdkd`: the table rows (3 seeds), or, with no dataset root, the smoke profile.

    python -m ssdkd.reproduce                                            # smoke: synthetic CIFAR-10, CPU minutes
    python -m ssdkd.reproduce cifar10_root=/data/cifar10 teacher_dir=checkpoints/pretrained
    python -m ssdkd.reproduce cifar100_root=/data/cifar100 teacher_dir=... rows=cifar100_wrn40_2_wrn16_1_ssdkd
    make reproduce-ssdkd ARGS="cifar10_root=/data/cifar10 teacher_dir=/ckpt seeds=0"

Keys are ``common.reproduce``'s (roots also from ``$CIFAR10_ROOT`` / ``$CIFAR100_ROOT``; ``seeds`` default the
spec's 3 for rows) plus ``teacher_dir``: the Fast/CMI release folder holding ``<dataset>_<arch>.pth`` (spec d.1).
A row whose teacher is not there is skipped by name (NYUv2: ``nyuv2_root`` and
``<teacher_dir>/nyuv2_deeplabv3_resnet50.pth``; its distillation is our reading of spec d.3, README). The smoke
runs (``paper.yaml``) train a small teacher on synthetic CIFAR-10 pickles, then SSD-KD, Fast-2 and DeepInversion
(2,000 iterations per batch) from the same student init, and print held-out top-1 against t_inv / t_kd / t_total
and samples generated, labelled smoke.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.errors import cli_guard
from common.reproduce import Finished, Plan, Run, load_spec, reproduce

PAPER = "ssdkd"


def full_runs(plan: Plan) -> list[Run]:
    """Selected rows with a root for their dataset and a released teacher; `full_seeds` unless seeds= is given."""
    teacher_dir = Path(plan.options["teacher_dir"]) if plan.options["teacher_dir"] else None
    seeds = plan.seeds if plan.options["seeds"] else [int(s) for s in plan.spec.get("full_seeds", [0])]
    runs: list[Run] = []
    for row in plan.rows:
        dataset = str(row["dataset"])
        root = plan.roots.get(dataset)
        if root is None:
            print(f"skip {row['id']}: no {dataset} root given ({dataset}_root=...)")
            continue
        teacher = None if teacher_dir is None else teacher_dir / f"{dataset}_{row['teacher']}.pth"
        if teacher is None or not teacher.is_file():
            print(f"skip {row['id']}: no teacher {dataset}_{row['teacher']}.pth in teacher_dir={teacher_dir}")
            continue
        runs += [Run(row["id"], [f"experiment={row['id']}", f"data.root={root}",
                                 f"model.teacher_checkpoint={teacher}", *plan.overrides], s) for s in seeds]
    return runs


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """Held-out top-1 (last / best epoch) against t_inv, t_kd, t_total and samples generated, per method."""
    load_spec(PAPER)
    first = json.loads((finished[0].directory / "result.json").read_text())
    lines = [f"SSD-KD smoke: teacher resnet8 trained on synthetic CIFAR-10 pickles, held-out top-1 "
             f"{first['extra']['teacher_top1']:.2f}; students resnet8 from one init, never shown a training image. "
             "SMOKE numbers (CPU, shrunk sizes): not the paper's.", "",
             "| method | top-1 last / best | KD epochs x steps | t_inv (s) | t_kd (s) | t_total (s) "
             "| samples generated | store | device |", "|---|---|---|---|---|---|---|---|---|"]
    for f in finished:
        r = json.loads((f.directory / "result.json").read_text())
        m, e = r["metrics"], r["extra"]
        lines.append(f"| {f.run.name.removeprefix('smoke_')} | {m['top1']:.2f} / {m.get('best_top1', m['top1']):.2f} "
                     f"| {e['kd_epochs']} x {e['kd_steps_per_epoch']} | {m['t_inv']:.1f} | {m['t_kd']:.1f} | "
                     f"{m['t_total']:.1f} | {m['samples_generated']:.0f} | {m['buffer_size']:.0f} | "
                     f"{e['time_accounting']['device']} |")
    return "\n".join(lines)


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", extra={"teacher_dir": None},
                     plan_full=full_runs, summarize_smoke=smoke_summary)


if __name__ == "__main__":
    main()
