"""The host allocator setting that keeps large blocks on the heap (glibc ``mallopt``).

glibc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on
free, so a training step that allocates tensors of tens of MB (KernelWarehouse's per-sample kernels and their
gradients) page-faults all of them again on every step. ``keep_large_allocations_on_heap()`` turns that off
for the whole process (no mmap for large blocks, no trimming of the heap's top): freed memory is reused, as
under jemalloc/tcmalloc. The resident size then stays at the peak of the run instead of shrinking between
steps. It is a no-op where glibc's ``mallopt`` is unavailable (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state = {"applied": False}


def keep_large_allocations_on_heap() -> bool:
    """Apply the setting to this process (and the processes it forks); True where it took effect."""
    if _state["applied"]:
        return True
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    _state["applied"] = ok
    return ok


def heap_kept() -> bool:
    """Whether ``keep_large_allocations_on_heap()`` took effect in this process."""
    return _state["applied"]


def launched_module(argv: list[str] | None = None) -> str | None:
    """The module this interpreter was started with (``python -m pkg.mod`` -> ``"pkg.mod"``), else None."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):
            return arg[2:]
        if not arg.startswith("-") or arg.startswith("-c"):
            return None  # a script or -c: not a module
        i += 2 if arg in ("-X", "-W") else 1  # options that take a separate value
    return None


def apply_for_entry_points(modules: set[str], env_var: str, argv: list[str] | None = None) -> bool:
    """Keep large blocks on the heap when this process was launched as one of ``modules`` (``python -m``,
    torchrun included), unless the environment variable ``env_var`` is ``off``. True where applied."""
    if launched_module(argv) not in modules:
        return False
    if os.environ.get(env_var, "on").strip().lower() in ("off", "0", "false", "no"):
        return False
    return keep_large_allocations_on_heap()
