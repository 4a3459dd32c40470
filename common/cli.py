"""One way to read ``key=value`` arguments for every paper's ``reproduce`` and ``bench`` scripts.

``make reproduce-<paper> ARGS="..."`` and ``make bench-<paper> ARGS="..."`` pass Hydra-style overrides; this
module parses them the same way everywhere: a known key takes a value typed like its default (``batch=32``,
``official=/path``, ``rows=a,b``); with ``passthrough`` every other ``key=value`` is kept, in order, as a Hydra
override for the runs (``trainer.workers=16``, ``+extra=1``, ``~key``); anything else is a one-line error.
``-h``/``--help`` prints the script's docstring and the keys with their defaults.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import UserError


def _typed(key: str, text: str, default: Any, prog: str) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{prog}: {key} must be true or false, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise UserError(f"{prog}: {key} must be {'an integer' if isinstance(default, int) else 'a number'}, "
                            f"got {text!r}") from None
    if text.strip().lower() in ("", "null", "none"):
        return None
    return text


def parse_overrides(argv: Sequence[str], defaults: Mapping[str, Any], prog: str, doc: str = "",
                    passthrough: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``(options, hydra_overrides)`` from ``key=value`` arguments (see the module docstring)."""
    options = dict(defaults)
    rest: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            keys = "\n".join(f"  {k}={'' if v is None else v}" for k, v in defaults.items())
            print(f"{doc.strip()}\n\nkeys (key=value):\n{keys}"
                  + ("\nany other key=value is a Hydra override passed to every run" if passthrough else ""))
            sys.exit(0)
        key, sep, value = arg.partition("=")
        if sep and key in options:
            options[key] = _typed(key, value, defaults[key], prog)
        elif passthrough and (sep and key and not key.startswith("-") or arg.startswith("~")):
            rest.append(arg)
        else:
            raise UserError(f"{prog}: unknown argument {arg!r}; use key=value with keys {sorted(defaults)}"
                            + (" or a Hydra override" if passthrough else ""))
    return options, rest


def split_list(value: str | None) -> list[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; None or "" -> []."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
