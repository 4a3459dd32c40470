"""The make targets stay runnable: reproduce (smoke profile, tiny sizes) and bench (one tiny step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gridconv import bench, reproduce


def test_reproduce_smoke_runs_every_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reproduce.main(["--output-dir", str(tmp_path), "data.train_frames=1", "data.test_frames=1", "trainer.epochs=1",
                    "model.hidden_size=8", "trainer.global_batch=100"])
    printed = capsys.readouterr().out
    for name, _ in reproduce.SMOKE_MODELS:
        assert f"| {name} |" in printed
    assert "NOT comparable" in printed and "Smoke runs" in printed
    results = sorted(tmp_path.glob("gridconv/*/*/result.json"))
    assert len(results) == len(reproduce.SMOKE_MODELS)
    assert all(json.loads(p.read_text())["profile"] == "smoke" for p in results)


def test_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--hidden", "8", "--steps", "1", "--warmup", "0", "--batch", "8", "--eval-batch", "8",
                "--device", "cpu"])
    printed = capsys.readouterr().out
    assert all(f"| {label} |" in printed for label, _ in bench.VARIANTS)
    assert "D-GridConv / GridConv cost" in printed
