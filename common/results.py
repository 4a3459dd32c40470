"""The one result record every run writes (`result.json`), for training and evaluation alike.

A record says what was measured *and how it was made*, so that `common.report` can tell our
reproduction from an official checkpoint evaluated here, and a smoke or synthetic run from a real one:

    kind        "trained" (this run trained the weights) | "evaluated" (a checkpoint scored here)
    dataset     the dataset's name ("imagenet", "cifar100", "mnist", ...)
    data        "real" | "synthetic"
    checkpoint  origin of the weights that were scored: "ours" | "official"
    complete    the run reached the end of its budget (False: cut short by max_steps or a stop)
    selection   which weights the metrics belong to: "last" | "best_heldout" | "best_test"
    profile     "full" | "smoke"
    seed, checkpoint_path, git_commit, created, and `extra` (anything else a paper wants to keep)

A trained record also keeps the command line's Hydra overrides (`extra["overrides"]`); those that change the
recipe's budget, optimizer or schedule (`trainer.epochs`, `trainer.iterations`, `trainer.global_batch`, `optim.*`,
`schedule.*`) are listed again in `extra["recipe_overrides"]`, and such a run is not the paper's recipe.

Only `kind=trained, data=real, checkpoint=ours, complete=True, profile=full` without recipe overrides counts as
ours in the report;
`kind=evaluated, checkpoint=official, data=real` has its own column ("official weights, our eval");
everything else is listed apart. An evaluation record (`evaluation_record`) says `complete=True` (the whole
evaluation split was scored) and `selection="last"` (the given weights, as they are).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

KINDS = ("trained", "evaluated")
RECIPE_KEYS = ("trainer.epochs", "trainer.iterations", "trainer.global_batch")  # and every optim.* / schedule.* key
RECIPE_PREFIXES = ("optim.", "schedule.")
DATA = ("real", "synthetic")
ORIGINS = ("ours", "official")
SELECTIONS = ("last", "best_heldout", "best_test")
PROFILES = ("full", "smoke")

_REPO = Path(__file__).resolve().parent.parent


def git_commit(repo: str | os.PathLike = _REPO) -> str | None:
    """The checkout's HEAD commit (with `+dirty` when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


@dataclass
class ResultRecord:
    """What one run measured and how it was made (see the module docstring)."""

    paper: str
    experiment: str
    row: str | None
    kind: Literal["trained", "evaluated"]
    metrics: dict[str, float]
    dataset: str
    data: Literal["real", "synthetic"]
    checkpoint: Literal["ours", "official"]
    complete: bool
    selection: Literal["last", "best_heldout", "best_test"]
    profile: Literal["full", "smoke"]
    seed: int | None = None
    checkpoint_path: str | None = None
    git_commit: str | None = None
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("data", DATA), ("checkpoint", ORIGINS),
                              ("selection", SELECTIONS), ("profile", PROFILES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"result record: {name}={getattr(self, name)!r}, expected one of {allowed}")
        self.metrics = {k: float(v) for k, v in self.metrics.items()}
        self.complete = bool(self.complete)
        if self.git_commit is None:
            self.git_commit = git_commit()
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @property
    def counts_as_reproduction(self) -> bool:
        """A complete training run of ours, on real data, with the full recipe (no recipe overrides)."""
        return (self.kind == "trained" and self.data == "real" and self.checkpoint == "ours"
                and self.complete and self.profile == "full" and not self.extra.get("recipe_overrides"))

    @property
    def is_official_eval(self) -> bool:
        """Official weights scored by our evaluation on real data (the report's own column)."""
        return self.kind == "evaluated" and self.checkpoint == "official" and self.data == "real"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRecord:
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("paper", "experiment", "kind", "metrics", "dataset", "data", "checkpoint",
                               "complete", "selection", "profile") if k not in data]
        if missing:
            raise ValueError(f"result record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def recipe_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides (`key=value`, Hydra's `+key`/`++key`/`~key` too) that change the recipe's budget, optimizer
    or schedule: a run made with one of them is not the experiment's recipe."""
    out = []
    for item in overrides:
        key = str(item).split("=", 1)[0].lstrip("+~")
        if key in RECIPE_KEYS or key.startswith(RECIPE_PREFIXES):
            out.append(str(item))
    return out


def command_line_overrides() -> list[str]:
    """The Hydra app's command-line overrides (`[]` outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return []
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def write_record(run_dir: str | os.PathLike, record: ResultRecord, name: str = "result.json") -> Path:
    """Write `record` atomically as `<run_dir>/<name>` (evaluation runs may use another name)."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record.to_dict(), indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_record(path: str | os.PathLike) -> ResultRecord:
    """Read one record; a file that is not a record raises ValueError naming the path."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable result record ({err})") from None
    try:
        return ResultRecord.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def data_kind(dataset: str, root: str | os.PathLike | None = None) -> Literal["real", "synthetic"]:
    """`synthetic` when the dataset's config name says so (`synthetic*`) or its folder (or a folder directly
    inside it) carries the marker every synthetic writer leaves (`common.data.base.MARKER_NAME`), else `real`.

    The marker catches synthetic data written in a real layout and read under the real dataset's name.
    """
    from common.data.base import MARKER_NAME

    if str(dataset).lower().startswith("synthetic"):
        return "synthetic"
    if root is not None:
        base = Path(root).expanduser()
        folder = base if base.is_dir() else base.parent
        if (folder / MARKER_NAME).is_file() or any((c / MARKER_NAME).is_file() for c in folder.glob("*/")):
            return "synthetic"
    return "real"


def evaluation_record(paper: str, experiment: str, row: str | None, metrics: Mapping[str, float], dataset: str,
                      checkpoint: Literal["ours", "official"], profile: str, checkpoint_path: str | os.PathLike,
                      seed: int | None = None, data_root: str | os.PathLike | None = None,
                      **extra: Any) -> ResultRecord:
    """The record every paper's `eval` entry point writes: a checkpoint scored on a dataset's whole split."""
    return ResultRecord(paper=paper, experiment=experiment, row=row, kind="evaluated", metrics=dict(metrics),
                        dataset=str(dataset), data=data_kind(dataset, data_root), checkpoint=checkpoint,
                        complete=True,
                        selection="last", profile=profile,  # type: ignore[arg-type]
                        seed=seed, checkpoint_path=str(checkpoint_path), extra=dict(extra))
