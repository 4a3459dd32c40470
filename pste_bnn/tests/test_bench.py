"""pste_bnn.bench reads the shared bench keys as every paper's bench does (issue 8 item 5)."""

from __future__ import annotations

from typing import Any

import pytest

import pste_bnn.bench as bench


@pytest.mark.parametrize("modes, expected", [("infer", {"infer"}), ("train", {"train"})])
def test_bench_modes_select_what_is_timed(monkeypatch: pytest.MonkeyPatch, modes: str, expected: set[str]) -> None:
    """`modes=infer` times inference only and `modes=train` training only (the step-2 pairs and the selection
    parts are training steps); the timed steps are stubs here, so nothing is measured."""

    def steps(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"a": lambda: None, "b": lambda: None}

    class Pair:
        def __init__(self) -> None:
            self.model = bench.nn.Identity()

        def __call__(self) -> None:
            return None

    monkeypatch.setattr(bench, "build_bench_pairs", lambda *a, **k: {"snn": Pair(), "sparks": Pair()})
    monkeypatch.setattr(bench, "build_selection_parts", steps)
    monkeypatch.setattr(bench, "build_inference_pair", lambda *a, **k: {"export": lambda: None, "latent": lambda: None})
    monkeypatch.setattr(bench, "print_size_table", lambda *a, **k: None)
    records = bench.main([f"modes={modes}", "threads=0", "repeats=1", "warmup=1", "schedule_points=0", "tau=1"])
    assert {r["mode"] for r in records} == expected
