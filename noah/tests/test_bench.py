"""noah.bench on a tiny setting: both heads timed in one run, ratios and the MAC-share budget printed."""

from __future__ import annotations

import pytest

from noah.bench import main


def test_bench_times_both_heads_and_prints_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    records = main(["models=resnet18", "batch=2", "size=64", "repeats=1", "warmup=1", "threads=1", "memory=false"])
    assert {(r["mode"], r["name"]) for r in records} == {(m, f"resnet18 {h}") for m in ("train", "infer")
                                                         for h in ("baseline", "noah")}
    macs = {r["name"]: r["macs"] for r in records}
    assert macs["resnet18 noah"] > macs["resnet18 baseline"]
    out = capsys.readouterr().out
    assert "NOAH adds s =" in out and "infer: NOAH step =" in out and "budget" in out


def test_bench_unknown_model_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["models=resnet19"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown models ['resnet19']" in err and len(err.strip().splitlines()) == 1


def test_entry_points_keep_large_allocations_on_the_heap() -> None:
    """python -m noah.<entry> applies common.allocator's setting (NOAH_HEAP=off opts out); importing noah does not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    probe = "import noah, common.allocator as a; print(a.heap_kept())"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=repo)
    assert plain.stdout.strip() == "False"
    from common.allocator import launched_module
    from noah import ENTRY_POINTS

    assert ENTRY_POINTS == {"noah.train", "noah.eval", "noah.bench", "noah.reproduce"}
    assert launched_module(["python", "-m", "noah.bench", "threads=2"]) in ENTRY_POINTS
