"""User-facing errors: one line that says what to do, never a deep traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error the user can fix; its message is one line that says what to do."""


def one_line(err: UserError) -> str:
    """The error's own message. A DataLoader worker re-raises it with the worker's traceback in the message
    ("Caught X in DataLoader worker process 0. Original Traceback ..."); its last line is the message."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def cli_guard(fn: F) -> F:
    """Run an entry point; a `UserError` becomes `error: <message>` on stderr and exit code 2.

    Set `OSVAI_TRACEBACK=1` to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if os.environ.get("OSVAI_TRACEBACK") == "1":
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
