"""``make reproduce-<paper>``: run a paper's table rows (or its smoke runs), then print paper vs ours.

    python -m <paper>.reproduce                                   # no dataset root: the smoke runs
    python -m <paper>.reproduce data.root=/data/imagenet          # every trainable row of paper.yaml
    python -m <paper>.reproduce data.root=... rows=a,b seeds=0,1,2 trainer.workers=16
    python -m <paper>.reproduce dry_run=true                      # print the runs, run nothing

Every paper reads the same keys (``common.cli``): ``data.root`` (the root of the paper's first dataset;
``<dataset>_root`` for each dataset of ``reproduce.datasets``; else the environment variable named there),
``rows`` (full runs: paper.yaml row ids, default every row with an experiment), ``seeds`` (default
``reproduce.seeds``), ``output_dir``, ``profile`` (``auto``: smoke without a root, full with one),
``dry_run``; every other ``key=value`` is a Hydra override passed to every run. A paper adds its own keys
(NORM: ``teacher_dir``) through ``extra``.

Each run is ``python -m <paper>.train <overrides> hydra.run.dir=<output_dir>/<paper>/<name>/<time>-s<seed>``
in a subprocess, the same for every paper; an override may name an earlier run's directory as
``{run:<name>}`` (NORM's students point at the teacher the smoke trained first). The ``reproduce:``
section of ``paper.yaml`` says what runs (documented in ``common/README.md``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.cli import parse_overrides, split_list
from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
REPRODUCE_DEFAULTS: dict[str, Any] = {"data.root": None, "rows": None, "seeds": None, "output_dir": "outputs",
                                      "profile": "auto", "dry_run": False}
_REF = re.compile(r"\{run:([A-Za-z0-9_.\-]+)\}")


@dataclass
class Run:
    """One training run: its name (the output folder), its Hydra overrides, its seed."""

    name: str
    overrides: list[str]
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Finished:
    run: Run
    directory: Path
    seconds: float
    metrics: dict[str, float]


@dataclass
class Plan:
    """What ``paper.yaml``'s ``reproduce:`` section says, with the command-line options applied."""

    paper: str
    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    options: dict[str, Any]
    overrides: list[str]
    roots: dict[str, str]
    seeds: list[int]
    smoke: bool


def load_spec(paper: str, root: Path = REPO_ROOT) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(reproduce section, rows)`` of ``<paper>/paper.yaml``; a malformed section is a one-line error."""
    path = root / paper / "paper.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    spec = data.get("reproduce")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("smoke"), list):
        raise UserError(f"{path}: needs a 'reproduce:' section with a 'smoke:' list (see common/README.md)")
    datasets = spec.get("datasets")
    if not isinstance(datasets, Mapping) or not datasets:
        raise UserError(f"{path}: reproduce.datasets must map each dataset to the environment variable of its root")
    for i, item in enumerate(spec["smoke"]):
        if not isinstance(item, Mapping) or "name" not in item or not isinstance(item.get("overrides"), list):
            raise UserError(f"{path}: reproduce.smoke[{i}] needs a 'name' and an 'overrides' list")
    return dict(spec), list(data.get("rows", []))


def row_experiment(row: Mapping[str, Any]) -> str | None:
    """The experiment file a row trains with: its ``experiment`` field, default its id; null: not trained."""
    return row.get("experiment", row["id"])


def row_dataset(row: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    return str(row.get("dataset") or next(iter(spec["datasets"])))


def make_plan(paper: str, argv: Sequence[str], extra: Mapping[str, Any] | None = None, doc: str = "",
              root: Path = REPO_ROOT) -> Plan:
    """Parse the arguments against ``paper.yaml``: roots, rows, seeds, smoke or full."""
    spec, rows = load_spec(paper, root)
    datasets = dict(spec["datasets"])
    defaults = {**REPRODUCE_DEFAULTS, **{f"{d}_root": None for d in datasets}, **(extra or {})}
    options, overrides = parse_overrides(argv, defaults, f"{paper}.reproduce", doc or __doc__ or "", passthrough=True)
    first = next(iter(datasets))
    roots = {}
    for dataset, env in datasets.items():
        given = options[f"{dataset}_root"] or (options["data.root"] if dataset == first else None)
        value = given or (os.environ.get(str(env)) if env else None)
        if value:
            roots[dataset] = str(value)
    known = {r["id"] for r in rows}
    chosen = split_list(options["rows"])
    unknown = [r for r in chosen if r not in known]
    if unknown:
        raise UserError(f"{paper}.reproduce: unknown rows {unknown}; rows are the ids in {paper}/paper.yaml")
    try:
        seeds = [int(s) for s in split_list(options["seeds"])] or [int(s) for s in spec.get("seeds", [0])]
    except ValueError:
        given = options["seeds"]
        raise UserError(f"{paper}.reproduce: seeds must be integers, e.g. seeds=0,1,2; got {given!r}") from None
    if options["profile"] not in ("auto", "smoke", "full"):
        raise UserError(f"{paper}.reproduce: profile must be auto, smoke or full, got {options['profile']!r}")
    smoke = options["profile"] == "smoke" or (options["profile"] == "auto" and not roots)
    if options["profile"] == "full" and not roots:
        raise UserError(f"{paper}.reproduce: profile=full needs a dataset root: data.root=... or "
                        + " / ".join(f"${env}" for env in dict.fromkeys(datasets.values()) if env))
    selected = [r for r in rows if (r["id"] in chosen if chosen else row_experiment(r) is not None)]
    return Plan(paper, spec, selected, options, overrides, roots, seeds, smoke)


def smoke_runs(plan: Plan) -> list[Run]:
    """The ``reproduce.smoke`` runs, each seed, in order, with the smoke environment."""
    env = {str(k): str(v) for k, v in (plan.spec.get("smoke_env") or {}).items()}
    return [Run(str(item["name"]), [*map(str, item["overrides"]), *plan.overrides], seed, env)
            for seed in plan.seeds for item in plan.spec["smoke"]]


def full_runs(plan: Plan) -> list[Run]:
    """One run per selected row (with a root for its dataset) and seed: ``experiment=<row> data.root=<root>``."""
    runs = []
    for row in plan.rows:
        experiment, dataset = row_experiment(row), row_dataset(row, plan.spec)
        if experiment is None:
            print(f"skip {row['id']}: no experiment trains this row (paper.yaml experiment: null)")
            continue
        if dataset not in plan.roots:
            env = plan.spec["datasets"][dataset]
            print(f"skip {row['id']}: no {dataset} root given ({dataset}_root=... or ${env})")
            continue
        runs += [Run(row["id"], [f"experiment={experiment}", f"data.root={plan.roots[dataset]}", *plan.overrides],
                     seed) for seed in plan.seeds]
    return runs


def command(plan: Plan, run: Run, directory: Path, done: Mapping[str, Path]) -> list[str]:
    """The subprocess command line of one run; ``{run:<name>}`` becomes that earlier run's directory."""
    def resolve(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in done:
                raise UserError(f"{plan.paper}.reproduce: run {run.name} refers to {{run:{m.group(1)}}}, which has "
                                "not run before it (order the runs in paper.yaml)")
            return str(done[m.group(1)])
        return _REF.sub(sub, text)

    seed_key = str(plan.spec.get("seed_key", "trainer.seed"))
    return [sys.executable, "-m", f"{plan.paper}.train", *map(resolve, run.overrides), f"{seed_key}={run.seed}",
            f"output_dir={plan.options['output_dir']}", f"hydra.run.dir={directory}"]


def check_runs(plan: Plan, runs: Sequence[Run]) -> None:
    """Compose every run's config before any run starts, so that a wrong key or value (a mistyped reproduce key
    is passed on as a Hydra override) fails here in one line, under ``dry_run=true`` too, and not in the first
    subprocess after earlier runs trained. ``{run:<name>}`` stands for a directory made later: any path does."""
    from common.config import compose

    config_dir = REPO_ROOT / plan.paper / "configs"
    seen: set[tuple[str, ...]] = set()
    for run in runs:
        overrides = tuple(_REF.sub(lambda m: f"/{m.group(1)}", o) for o in run.overrides)
        if overrides in seen:
            continue
        seen.add(overrides)
        try:
            compose(config_dir, overrides)
        except UserError as err:
            raise UserError(f"{plan.paper}.reproduce: run {run.name}: {err}") from None


def execute(plan: Plan, runs: Sequence[Run]) -> list[Finished]:
    """Run each training in a subprocess, in order; stop at the first failure with a one-line error."""
    finished: list[Finished] = []
    done: dict[str, Path] = {}
    out = Path(plan.options["output_dir"])
    for run in runs:
        directory = out / plan.paper / run.name / f"{time.strftime('%Y%m%d-%H%M%S')}-s{run.seed}"
        cmd = command(plan, run, directory, done)
        print(f"=== {run.name} (seed {run.seed}): {' '.join(cmd[1:])}", flush=True)
        done[run.name] = directory
        if plan.options["dry_run"]:
            continue
        t0 = time.time()
        env = {**os.environ, **run.env, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        if code != 0:
            raise UserError(f"{plan.paper}.reproduce: run {run.name} failed (exit {code}); its log is above")
        result = directory / "result.json"
        metrics = json.loads(result.read_text()).get("metrics", {}) if result.is_file() else {}
        finished.append(Finished(run, directory, time.time() - t0, metrics))
    return finished


def smoke_table(finished: Sequence[Finished], metrics: Sequence[str] | None = None,
                columns: Mapping[str, Callable[[str], str]] | None = None) -> str:
    """Markdown table of the smoke runs by name: each metric as mean +- std over seeds, and the wall time."""
    by_name: dict[str, list[Finished]] = {}
    for f in finished:
        by_name.setdefault(f.run.name, []).append(f)
    keys = list(metrics or sorted({k for f in finished for k in f.metrics}))
    extra = dict(columns or {})
    head = ["run", *extra, *keys, "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in by_name.items():
        cells = [name, *(fn(name) for fn in extra.values())]
        cells += [_mean_std([f.metrics[k] for f in group if k in f.metrics]) for k in keys]
        lines.append("| " + " | ".join(cells + [_mean_std([f.seconds for f in group], 0)]) + " |")
    return "\n".join(lines)


def _mean_std(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reproduce(paper: str, argv: Sequence[str], *, doc: str = "", extra: Mapping[str, Any] | None = None,
              plan_full: Callable[[Plan], list[Run]] = full_runs,
              summarize_smoke: Callable[[Plan, list[Finished]], str] | None = None) -> str:
    """The whole job: plan, run, then the smoke summary (if smoke) and ``common.report``'s paper table."""
    from common.report import paper_report

    plan = make_plan(paper, argv, extra, doc)
    if plan.smoke:
        envs = dict.fromkeys(plan.spec["datasets"].values())  # datasets may share one root variable
        print("no dataset root (data.root=... or " + " / ".join(f"${e}" for e in envs if e)
              + f"): the smoke runs of {paper}/paper.yaml, on synthetic data; never compared with the paper")
        runs = smoke_runs(plan)
    else:
        runs = plan_full(plan)
    check_runs(plan, runs)
    finished = execute(plan, runs)
    if plan.options["dry_run"]:
        return ""
    text = ""
    if plan.smoke and finished:
        summary = summarize_smoke(plan, finished) if summarize_smoke else smoke_table(finished)
        text += f"Smoke runs ({paper}, synthetic data, NOT the paper's numbers):\n\n{summary}\n\n"
    text += paper_report(paper, plan.options["output_dir"])
    print(text)
    return text
