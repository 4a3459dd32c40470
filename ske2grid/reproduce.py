"""``make reproduce-ske2grid``: the paper's rows on pyskl pickles, or the smoke runs with their floor.

    python -m ske2grid.reproduce data.root=/data/pyskl                      # every row (PLS chains in order)
    python -m ske2grid.reproduce data.root=/data/pyskl rows=ske2grid_d8_pls_ntu60_xsub_hrnet   # D5->D6->D7->D8
    python -m ske2grid.reproduce                                            # no data: the smoke runs + floor
    python -m ske2grid.reproduce dry_run=true                               # the commands, nothing run

``data.root`` (or ``$PYSKL_ROOT``) is the folder holding the pyskl pickles; every protocol of ``paper.yaml`` reads
its pickle from it. A PLS row trains its parent first when no finished run of it is found (``ske2grid.train``),
so one row reproduces its whole chain. Without a root, the smoke runs of ``paper.yaml`` train ST-GCN, D5 and
D5->D6 PLS at small width on the synthetic pickle; the command exits non-zero unless every model's 10-clip
top-1 reaches twice chance and the D6 run kept D5's stage-0 UPT/GIT pair bit-identical (issue item 8). Smoke
numbers are labelled smoke and never compared with the paper's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from common.errors import cli_guard
from common.reproduce import Finished, Plan, load_spec, reproduce, smoke_table

PAPER = "ske2grid"
FLOOR_X_CHANCE = 2.0


def stage0_identical(parent: Path, child: Path) -> bool:
    """The child's stage-0 UPT/GIT tensors equal the parent's best checkpoint bit for bit."""
    a = torch.load(parent, map_location="cpu", weights_only=True)["model"]
    b = torch.load(child, map_location="cpu", weights_only=True)["model"]
    keys = [k for k in a if ".stages.0." in k]
    return bool(keys) and all(k in b and torch.equal(a[k], b[k]) for k in keys)


def check_floor(finished: Sequence[Finished], num_classes: int = 8) -> list[str]:
    """Failures of the smoke floor: 10-clip top-1 below 2x chance; a PLS child whose stage-0 pair moved."""
    floor = FLOOR_X_CHANCE * 100.0 / num_classes
    failures = [f"{f.run.name}: 10-clip top-1 {f.metrics.get('top1', float('nan')):.2f} < {floor:.1f} (2x chance)"
                for f in finished if not f.metrics.get("top1", 0.0) >= floor]
    for f in finished:  # a PLS child's record names the parent checkpoint it started from
        record = f.directory / "result.json"
        parent = json.loads(record.read_text()).get("extra", {}).get("parent_checkpoint") if record.is_file() else None
        if parent is not None and not stage0_identical(Path(parent), f.directory / "last.pt"):
            failures.append(f"{f.run.name}: the frozen stage-0 UPT/GIT pair differs from its parent's {parent}")
    return failures


def expand_root(argv: Sequence[str]) -> list[str]:
    """``data.root=X`` is the pyskl folder of every dataset (unless a ``<dataset>_root=`` is given)."""
    roots = [a.split("=", 1)[1] for a in argv if a.startswith("data.root=")]
    if not roots:
        return list(argv)
    datasets = load_spec(PAPER)[0]["datasets"]
    given = {a.split("=", 1)[0] for a in argv}
    return [*argv, *(f"{d}_root={roots[-1]}" for d in datasets if f"{d}_root" not in given)]


@cli_guard
def main(argv: list[str] | None = None) -> str:
    failures: list[str] = []

    def summarize(plan: Plan, finished: list[Finished]) -> str:
        failures.extend(check_floor(finished))
        verdict = "floor met" if not failures else "FLOOR NOT MET: " + "; ".join(failures)
        table = smoke_table(finished, ["top1", "top5", "mean_class_accuracy", "val1clip_top1"])
        return f"{table}\n\n{verdict} (10-clip top-1 >= {FLOOR_X_CHANCE:g}x chance; PLS stage 0 bit-identical)"

    text = reproduce(PAPER, expand_root(sys.argv[1:] if argv is None else argv), doc=__doc__ or "",
                     summarize_smoke=summarize)
    if failures:
        print("error: the smoke floor is not met: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)
    return text


if __name__ == "__main__":
    main()
