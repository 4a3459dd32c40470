"""What every reader and writer shares: `DatasetError` and the synthetic-dataset marker file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import UserError

MARKER_NAME = ".osvai_synthetic.json"


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
