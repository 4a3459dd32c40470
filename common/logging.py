"""Run logging: console progress, `metrics.jsonl`, PNG training curves, and wandb when asked.

wandb is `disabled` unless the config says `offline` or `online`; tests and default runs never
reach the network.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.errors import UserError

T = TypeVar("T")
WANDB_MODES = ("disabled", "offline", "online")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterator[T]:
    """tqdm progress with throughput and ETA on the main process; a plain iterator elsewhere."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                     mininterval=1.0, file=sys.stderr, disable=None))


class RunLogger:
    """Writes one JSON object per `log()` call to `<run_dir>/metrics.jsonl` (main process only).

    `wandb_mode` is one of disabled / offline / online; the same metrics go to wandb when enabled.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 is_main: bool = True, wandb_mode: str = "disabled", project: str = "osvai-repro",
                 name: str | None = None) -> None:
        if wandb_mode not in WANDB_MODES:
            raise UserError(f"logger.wandb.mode={wandb_mode!r}: use one of {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        self._t0 = time.time()
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=project, name=name, dir=str(self.run_dir), mode=wandb_mode,
                                     config=dict(config or {}), reinit=True)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.is_main:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        if step is not None:
            record["step"] = step
        record["time"] = round(time.time() - self._t0, 3)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def close(self, plot: bool = True) -> None:
        if not self.is_main:
            return
        if plot and self.path.exists():
            plot_curves(self.path, self.run_dir / "curves.png")
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """One panel per numeric metric against `step` (losses, lr, accuracy ...), written as a PNG."""
    records = [r for r in read_jsonl(jsonl) if "step" in r]
    keys = sorted({k for r in records for k, v in r.items()
                   if k not in ("step", "time", "epoch") and isinstance(v, (int, float))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return Path(png)
