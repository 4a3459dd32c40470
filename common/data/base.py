"""What every reader and writer shares: `DatasetError` and the synthetic-dataset marker file."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.errors import UserError

MARKER_NAME = ".osvai_synthetic.json"

F = TypeVar("F", bound=Callable[..., Any])


class DatasetError(UserError):
    """A dataset is missing, laid out wrongly or corrupt; the message names the path and what to do."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The record a synthetic writer left in `folder`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, record: dict[str, Any]) -> None:
    """Write the marker atomically; it is written last, so an interrupted writer is simply run again."""
    tmp = folder / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, folder / MARKER_NAME)


def main_process_first(writer: F) -> F:
    """Run a synthetic writer on each node's first process before the others (torch's process group, if
    one is initialised): they wait at a barrier, then call it and find the marker, so torchrun ranks never
    write one folder at once. Every rank must call the writer (as every rank builds its datasets)."""

    @functools.wraps(writer)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return writer(*args, **kwargs)
        first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
        if not first:
            dist.barrier()
        try:
            return writer(*args, **kwargs)
        finally:
            if first:
                dist.barrier()

    return wrapped  # type: ignore[return-value]
