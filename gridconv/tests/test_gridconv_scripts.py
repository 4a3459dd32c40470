"""The make targets stay runnable: reproduce (smoke profile, tiny sizes) and bench (one tiny round)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gridconv import bench, reproduce

SMOKE_RUNS = [r["name"] for r in yaml.safe_load((Path(reproduce.__file__).parent / "paper.yaml").read_text())
              ["reproduce"]["smoke"]]


def test_reproduce_smoke_runs_every_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reproduce.main([f"output_dir={tmp_path}", "data.train_frames=1", "data.test_frames=1", "trainer.epochs=1",
                    "model.hidden_size=8", "trainer.global_batch=100"])
    printed = capsys.readouterr().out
    assert len(SMOKE_RUNS) == 4
    for name in SMOKE_RUNS:
        assert f"| {name} |" in printed
    assert "Smoke runs" in printed and "not run" in printed  # the paper table stays unfilled by smoke runs
    results = sorted(tmp_path.glob("gridconv/*/*/result.json"))
    assert len(results) == len(SMOKE_RUNS)
    records = [json.loads(p.read_text()) for p in results]
    assert all(r["profile"] == "smoke" and r["data"] == "synthetic" and r["kind"] == "trained" for r in records)


def test_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    records = bench.main(["hidden=8", "repeats=1", "warmup=0", "batch=8", "eval_batch=8", "device=cpu",
                          "memory=false", "macs=false"])
    printed = capsys.readouterr().out
    labels = {label for label, _ in bench.VARIANTS}
    assert {(r["mode"], r["name"]) for r in records} == {(m, n) for m in ("train", "infer") for n in labels}
    assert all(r["throughput"] > 0 for r in records)
    assert all(label in printed for label in labels)
