"""Test helpers shared by every paper: fixture discovery for golden tests.

Golden fixtures live in `$OSVAI_FIXTURES` (a directory holding `*.pt` files, or one directory per
paper) or, by default, in `../shared/fixtures/<paper>` next to the repository. A user's clone has no
`../shared`: there the golden tests skip with one line. CI sets `OSVAI_REQUIRE_FIXTURES=1`, and then a
missing fixture directory fails instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The `shared/` directory beside the checkout (may not exist)."""
    return REPO_ROOT.parent / "shared"


def fixture_dir(paper: str) -> Path:
    """Where `paper`'s golden fixtures are looked for."""
    env = os.environ.get("OSVAI_FIXTURES")
    if env:
        root = Path(env).expanduser()
        return root / paper if (root / paper).is_dir() else root
    return shared_dir() / "fixtures" / paper


def fixtures_required() -> bool:
    return os.environ.get("OSVAI_REQUIRE_FIXTURES", "") not in ("", "0")


def golden_files(paper: str, pattern: str = "*.pt") -> list[Any]:
    """pytest parameters, one per fixture file of `paper` (sorted); ids are the file names.

    With no fixture directory the single parameter is skipped with a one-line reason, or, when
    `OSVAI_REQUIRE_FIXTURES=1`, fails.
    """
    import pytest

    directory = fixture_dir(paper)
    files = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if files:
        return [pytest.param(f, id=f.name) for f in files]
    reason = f"no golden fixtures for {paper} in {directory} (set OSVAI_FIXTURES to their directory)"
    if fixtures_required():
        # Fails collection, so CI can never pass by skipping.
        raise FileNotFoundError(reason + "; OSVAI_REQUIRE_FIXTURES=1 forbids skipping")
    return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason))]


def shared_data_dir(name: str) -> Path | None:
    """`../shared/data/<name>` when present, else None (tests then skip unless fixtures are required)."""
    path = shared_dir() / "data" / name
    return path if path.is_dir() else None


def require_or_skip(path: Path | None, what: str) -> Path:
    """Return `path`, or skip the calling test (fail under OSVAI_REQUIRE_FIXTURES=1) with one line."""
    import pytest

    if path is not None and path.exists():
        return path
    reason = f"{what} not found (expected beside the checkout in ../shared)"
    if fixtures_required():
        pytest.fail(reason)
    pytest.skip(reason)


def sigterm_then_resume(module: str, args: list[str], run_dir: Path, resume_args: tuple[str, ...] = (),
                        timeout: float = 600) -> tuple[str, str]:
    """The SIGTERM contract of a train entry point, as every paper's `sigterm` test checks it.

    Start `python -m <module> <args>` (its `hydra.run.dir` must be `run_dir`), send SIGTERM once it has
    logged a step, and require exit code 143 with a `last.pt` and no `result.json`; then run it again with
    `trainer.resume=auto` (plus `resume_args`) and require that it finishes with a `result.json`.
    Returns the two runs' combined outputs.
    """
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "OSVAI_TRACEBACK"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 143, first[-3000:]
    assert (run_dir / "last.pt").is_file() and not (run_dir / "result.json").exists(), first[-3000:]
    done = subprocess.run([*cmd, "trainer.resume=auto", *resume_args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    second = done.stdout + done.stderr
    assert done.returncode == 0, second[-3000:]
    assert "resumed from" in second and (run_dir / "result.json").is_file(), second[-3000:]
    return first, second
