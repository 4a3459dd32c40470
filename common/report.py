"""Paper targets beside measured results, as Markdown tables.

Reads `<paper>/paper.yaml` (the paper's table rows) and every `result.json` under the outputs
directory (`common.results.ResultRecord`). Prints, per paper: row | metric | paper | ours | delta | status |
selected by (which weights "ours" scored: last epoch, best on held-out, best on test) | official weights,
our eval. Only complete training runs of ours on real data with the full profile and no recipe override fill
"ours" and the status: `reproduced` (within the row's tolerance of the paper's value, or better), `below`,
`not run`, or `unknown` (the paper's value is not known). An official checkpoint evaluated here on real
data fills its own column. Smoke, synthetic and cut-short runs, runs whose budget, optimizer or schedule was
overridden on the command line, and evaluations of our own checkpoints are listed apart; files that are not
records (old format, unreadable) are skipped with a note. A number is shown only if it was read from a file.

    python -m common.report [paper ...] [--outputs outputs]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError, cli_guard
from common.results import ResultRecord, read_record

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPERS = ("scalekd", "kernelwarehouse", "ssdkd", "noah", "afdcd", "ske2grid", "norm", "pste_bnn", "gridconv")


@dataclass
class Row:
    id: str
    metrics: dict[str, float | None]
    table: str = ""
    description: str = ""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def better_high(self, metric: str) -> bool:
        return self.higher_is_better.get(metric, True)


@dataclass
class PaperTable:
    paper: str
    title: str
    rows: list[Row]

    def row(self, row_id: str) -> Row | None:
        return next((r for r in self.rows if r.id == row_id), None)


def load_paper_yaml(paper: str, root: str | os.PathLike = REPO_ROOT) -> PaperTable:
    """Parse `<root>/<paper>/paper.yaml`; a malformed file is a one-line error naming the field."""
    path = Path(root) / paper / "paper.yaml"
    if not path.is_file():
        raise UserError(f"{paper} has no paper.yaml at {path}; this paper is not built yet")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    rows_in = data.get("rows")
    if not isinstance(rows_in, list):
        raise UserError(f"{path}: 'rows' must be a list of table rows")
    defaults_hib = data.get("higher_is_better", {}) or {}
    defaults_tol = data.get("tolerance", {}) or {}
    rows = []
    known = {"id", "metrics", "table", "description", "higher_is_better", "tolerance"}
    for i, r in enumerate(rows_in):
        if not isinstance(r, Mapping) or "id" not in r or not isinstance(r.get("metrics"), Mapping):
            raise UserError(f"{path}: row {i} needs an 'id' and a 'metrics' mapping")
        for k, v in r["metrics"].items():
            if v is not None and not isinstance(v, (int, float)):
                raise UserError(f"{path}: row {r['id']} metric {k} must be a number or null, got {v!r}")
        rows.append(Row(
            id=str(r["id"]),
            metrics={k: (None if v is None else float(v)) for k, v in r["metrics"].items()},
            table=str(r.get("table", "")),
            description=str(r.get("description", "")),
            higher_is_better={**defaults_hib, **(r.get("higher_is_better") or {})},
            tolerance={**defaults_tol, **(r.get("tolerance") or {})},
            extra={k: v for k, v in r.items() if k not in known},
        ))
    return PaperTable(paper=paper, title=str(data.get("paper", paper)), rows=rows)


@dataclass
class Gathered:
    """The result records of one paper, sorted by what they may be used for."""

    ours: dict[str, list[ResultRecord]] = field(default_factory=lambda: defaultdict(list))  # reproductions
    official: dict[str, list[ResultRecord]] = field(default_factory=lambda: defaultdict(list))  # official, our eval
    apart: list[tuple[Path, ResultRecord]] = field(default_factory=list)  # smoke, synthetic, cut short, ...
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # old-format or unreadable files


def _why_apart(r: ResultRecord) -> str:
    """Why a record is not compared with the paper (the first reason that applies)."""
    if r.data == "synthetic":
        return "synthetic data"
    if r.profile == "smoke":
        return "smoke profile"
    if r.kind == "trained" and not r.complete:
        return "cut short"
    if r.kind == "trained" and r.extra.get("recipe_overrides"):
        return "recipe overridden: " + " ".join(map(str, r.extra["recipe_overrides"]))
    if r.kind == "trained" and r.checkpoint != "ours":
        return "trained from official weights"
    if r.kind == "evaluated":
        return "evaluation of our checkpoint"
    return "other"


def gather(outputs: str | os.PathLike, paper: str) -> Gathered:
    """Read every `result.json` under `outputs/<paper>`; files that are not records are skipped, with a note."""
    base = Path(outputs) / paper
    out = Gathered()
    for path in sorted(base.rglob("result.json")) if base.is_dir() else []:
        try:
            record = read_record(path)
        except ValueError as err:
            reason = str(err).removeprefix(f"{path}: ")
            out.skipped.append((path, reason))
            continue
        if record.paper != paper:
            out.skipped.append((path, f"a record of paper {record.paper!r}"))
            continue
        row = str(record.row or record.experiment)
        if record.counts_as_reproduction:
            out.ours[row].append(record)
        elif record.is_official_eval and record.profile == "full":
            out.official[row].append(record)
        else:
            out.apart.append((path, record))
    return out


_SELECTED_BY = {"last": "last epoch", "best_heldout": "best on held-out", "best_test": "best on test"}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _aggregate(values: list[float]) -> tuple[float, str]:
    mean = statistics.fmean(values)
    if len(values) > 1:
        return mean, f"{mean:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"
    return mean, f"{mean:.2f}"


def status(paper_value: float | None, ours: float | None, higher_is_better: bool = True,
           tolerance: float = 0.0) -> str:
    if ours is None:
        return "not run"
    if paper_value is None:
        return "unknown"
    gap = (ours - paper_value) if higher_is_better else (paper_value - ours)
    return "reproduced" if gap >= -tolerance - 1e-9 else "below"


def _cell(records: list[ResultRecord], metric: str) -> tuple[float | None, str]:
    values = [r.metrics[metric] for r in records if metric in r.metrics]
    if not values:
        return None, "—"
    return _aggregate(values)


def _gain(ours: Mapping[str, list[ResultRecord]], row: str, base: str, metric: str) -> tuple[float | None, str]:
    """Ours for a `<metric>_gain` row (`gain_over: <base row>`): mean(row) - mean(base), both complete runs."""
    mine, theirs = _cell(ours.get(row, []), metric)[0], _cell(ours.get(base, []), metric)[0]
    if mine is None or theirs is None:
        return None, "—"
    return mine - theirs, _fmt(mine - theirs)


def paper_report(paper: str, outputs: str | os.PathLike = "outputs",
                 root: str | os.PathLike = REPO_ROOT) -> str:
    """The Markdown report of one paper: the table, then the runs that are not compared with the paper."""
    table = load_paper_yaml(paper, root)
    found = gather(outputs, paper)
    lines = [f"## {table.title}", "",
             "| row | metric | paper | ours | Δ | status | selected by | official weights, our eval |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table.rows:
        for metric, paper_value in row.metrics.items():
            mean, shown = _cell(found.ours.get(row.id, []), metric)
            if metric.endswith("_gain") and row.extra.get("gain_over"):  # the paper gives only a difference
                mean, shown = _gain(found.ours, row.id, str(row.extra["gain_over"]), metric[: -len("_gain")])
            delta = _fmt(mean - paper_value) if mean is not None and paper_value is not None else "—"
            st = status(paper_value, mean, row.better_high(metric), row.tolerance.get(metric, 0.0))
            _, official = _cell(found.official.get(row.id, []), metric)
            shown_paper = "unknown" if paper_value is None else _fmt(paper_value)  # the spec could not find it
            rules = sorted({_SELECTED_BY[r.selection] for r in found.ours.get(row.id, []) if metric in r.metrics})
            if metric.endswith("_gain") and row.extra.get("gain_over"):
                rules = sorted({_SELECTED_BY[r.selection] for rid in (row.id, str(row.extra["gain_over"]))
                                for r in found.ours.get(rid, [])})
            selected = ", ".join(rules) if mean is not None else "—"
            cells = (row.id, metric, shown_paper, shown, delta, st, selected, official)
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    known = {row.id for row in table.rows}
    for label, group in (("ours", found.ours), ("official weights, our eval", found.official)):
        for row_id in sorted(set(group) - known):
            lines.append(f"\nnote: {len(group[row_id])} {label} record(s) for {row_id!r}, which is not a row of "
                         "paper.yaml")
    if found.apart:
        lines += ["", "Smoke runs and other runs not compared with the paper (smoke profile, synthetic data, cut "
                  "short, recipe overridden, or an evaluation of our own checkpoint):", "",
                  "| experiment | kind | data | profile | why apart | metrics | run |", "|---|---|---|---|---|---|---|"]
        for path, r in found.apart:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in r.metrics.items())
            lines.append(f"| {r.experiment} | {r.kind} ({r.checkpoint}) | {r.dataset} ({r.data}) | {r.profile} | "
                         f"{_why_apart(r)} | {shown} | {path.parent.name} |")
    if found.skipped:
        lines += ["", f"Skipped {len(found.skipped)} file(s) that are not result records:"]
        lines += [f"- {path}: {reason}" for path, reason in found.skipped]
    return "\n".join(lines)


def report(papers: Iterable[str] | None = None, outputs: str | os.PathLike = "outputs",
           root: str | os.PathLike = REPO_ROOT) -> str:
    chosen = list(papers) if papers else [p for p in PAPERS if (Path(root) / p / "paper.yaml").is_file()]
    parts = []
    for p in chosen:
        if p not in PAPERS:
            raise UserError(f"unknown paper {p!r}; choose from {', '.join(PAPERS)}")
        parts.append(paper_report(p, outputs, root))
    return "\n\n".join(parts) if parts else "no paper has a paper.yaml yet"


@cli_guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("papers", nargs="*", help="papers to report (default: every built paper)")
    parser.add_argument("--outputs", default="outputs", help="directory holding the runs (default: outputs)")
    args = parser.parse_args(argv)
    print(report(args.papers, args.outputs))


if __name__ == "__main__":
    main()
