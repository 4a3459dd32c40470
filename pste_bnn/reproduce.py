"""`make reproduce-pste_bnn`: the rows of spec e (step 1, then step 2 per row), or the smoke profile.

    python -m pste_bnn.reproduce                                        # smoke: synthetic CIFAR-10 pickles, CPU
    python -m pste_bnn.reproduce data.root=/data/imagenet teacher=/w/resnet34-333f7ec4.pth
    python -m pste_bnn.reproduce imagenet_root=... teacher=... rows=imagenet_r18_step1,imagenet_r18_sparks_tau5
    python -m pste_bnn.reproduce cifar10_root=/data/cifar10 rows=cifar10_resnet18_sparks_tau5   # our reading (d.3)

Keys are `common.reproduce`'s (`data.root` is the ImageNet root; `cifar10_root`; or `$IMAGENET_ROOT` /
`$CIFAR10_ROOT`), plus `teacher`: the torchvision ResNet-34 file the ImageNet rows distil from (d.1). Every
step-2 row starts from its network's step-1 run (`{run:<step-1 row>}/best.pt`), which runs first when the
selection does not name it (spec d.1). Without a root the smoke runs of `paper.yaml` train a narrow Bi-Real
ResNet on synthetic data: step 1, then step 2 as `bnn`, `snn`, `freq` and `sparks-freq`, and print top-1,
size and BOPs, labelled smoke.
"""

from __future__ import annotations

import json
import sys

from common.errors import cli_guard
from common.reproduce import Finished, Plan, Run, load_spec, reproduce, row_dataset

PAPER = "pste_bnn"


def step1_row(row: dict, rows: dict[str, dict]) -> str | None:
    """The step-1 row of the same network and dataset as a step-2 row."""
    for rid, other in rows.items():
        if other.get("quantizer") == "real" and other.get("model") == row.get("model") \
                and other.get("dataset") == row.get("dataset"):
            return rid
    return None


def full_runs(plan: Plan) -> list[Run]:
    """Selected rows on their dataset's root; each step-2 row after the step-1 run of its network."""
    rows = {r["id"]: r for r in load_spec(PAPER)[1]}
    teacher = plan.options["teacher"]
    runs: list[Run] = []
    planned: set[str] = set()
    for row in sorted(plan.rows, key=lambda r: r.get("quantizer") != "real"):  # step 1 rows first
        if row.get("model") is None:
            continue
        dataset = row_dataset(row, plan.spec)
        root = plan.roots.get(dataset)
        if root is None:
            env = plan.spec["datasets"][dataset]
            print(f"skip {row['id']}: no {dataset} root given ({dataset}_root=... or ${env})")
            continue
        base = [f"data.root={root}", *plan.overrides]
        if dataset == "imagenet":
            if not teacher:
                print(f"skip {row['id']}: the ImageNet recipe distils from ResNet-34; pass teacher=/path/resnet34.pth")
                continue
            base.append(f"method.teacher={teacher}")
        if row.get("quantizer") != "real":
            first = step1_row(row, rows)
            if first is None:
                print(f"skip {row['id']}: no step-1 row for its network in paper.yaml")
                continue
            if first not in planned:
                print(f"{row['id']}: step 1 ({first}) runs first")
                runs += [Run(first, [f"experiment={first}", *base], s) for s in plan.seeds[:1]]
                planned.add(first)
            base.append(f"method.init_checkpoint={{run:{first}}}/best.pt")
        runs += [Run(row["id"], [f"experiment={row['id']}", *base], s) for s in plan.seeds]
        planned.add(row["id"])
    return runs


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """Variant, top-1 (best / last epoch), size and BOPs of each smoke run, labelled smoke."""
    lines = ["pste_bnn SMOKE runs on synthetic CIFAR-10-format data (a narrow Bi-Real ResNet, a few epochs): "
             "pipeline check only, NOT the paper's numbers.", "",
             "| run | seed | top-1 (reported: best epoch) | top-1 last epoch | size (bits) | BOPs "
             "| ids changed (last epoch) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for f in finished:
        record = json.loads((f.directory / "result.json").read_text())
        acc = record.get("extra", {}).get("accounting", {})
        last = next((h for h in reversed(_history(f)) if "val/top1" in h), {})
        changed = _last_change(f)
        size = f"{acc['size_bits']:,}" if record["extra"].get("step") == 2 else "real weights"
        bops = acc.get("bops_subbit") if record["extra"].get("step") == 2 else acc.get("bops_1bit")
        lines.append(f"| {f.run.name} | {f.run.seed} | {f.metrics.get('top1', float('nan')):.2f} | "
                     f"{last.get('val/top1', float('nan')):.2f} | {size} | {bops:,} | {changed} | {f.seconds:.0f} |")
    lines += ["", "Size counts the binary 3x3 convs at tau bits per kernel (b.12); BOPs at 32x32 input (1-bit rule "
              "for step 1). top-1 is the best epoch on the test split, as the official model_best (d.1)."]
    return "\n".join(lines)


def _history(f: Finished) -> list[dict]:
    path = f.directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _last_change(f: Finished) -> str:
    path = f.directory / "selection.jsonl"
    if not path.is_file():
        return "-"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [e["changed_total"] for e in entries if e.get("changed_total") is not None]
    return str(values[-1]) if values else "-"


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", extra={"teacher": None},
                     plan_full=full_runs, summarize_smoke=smoke_summary)


if __name__ == "__main__":
    main()
