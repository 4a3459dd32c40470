"""The README's make targets: a paper not built yet says so in one line and fails; built ones dispatch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*args: str) -> subprocess.CompletedProcess:
    # -o: treat the install stamp as up to date, so the test never re-installs the environment
    return subprocess.run(["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", *args],
                          capture_output=True, text=True, timeout=60)


def test_unbuilt_paper_says_so_and_fails() -> None:
    # every listed paper is built now: a paper directory without entry points stands in for an unbuilt one
    for target in ("reproduce-unbuilt_paper", "bench-unbuilt_paper"):
        proc = _make(target, "PAPERS=unbuilt_paper")
        assert proc.returncode != 0
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and ("not built yet" in lines[0] or "no benchmark yet" in lines[0])


BUILT = sorted(p.parent.name for p in REPO.glob("*/reproduce.py") if p.parent.name != "common")


@pytest.mark.parametrize("paper", BUILT)
def test_built_paper_targets_run_its_modules(paper: str) -> None:
    for target, module in ((f"reproduce-{paper}", f"-m {paper}.reproduce"), (f"bench-{paper}", f"-m {paper}.bench")):
        proc = _make("-n", target, "ARGS=data.root=/x")
        assert proc.returncode == 0 and f"{module} data.root=/x" in proc.stdout
        assert (REPO / paper / (target.split("-")[0] + ".py")).is_file()
