"""bench.py: MACs per 100-frame 2-person clip as spec §c (D5 8.00 G, D8 20.47 G), and one quick bench run that
prints the ratios, the front-end share and the inference cache check."""

from __future__ import annotations

import pytest
import torch

from common.profiling import count_flops
from ske2grid import bench
from ske2grid.models import create_model


@pytest.mark.parametrize("kw,gmacs", [({"grid_shape": (5, 5)}, 8.00), ({"grid_shape": (6, 6)}, 11.51),
                                      ({"grid_shape": (7, 7)}, 15.67), ({"grid_shape": (8, 8)}, 20.47)])
def test_grid_network_macs_match_spec(kw: dict, gmacs: float) -> None:
    model = create_model("ske2grid", 60, **kw)
    macs = count_flops(model, torch.zeros(1, 2, 100, 17, 3))["macs"]
    assert round(macs / 1e9, 2) == gmacs  # all convolutions; the cascade matmul adds < 0.01 G (§c)


def test_bench_runs_and_prints_targets(capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    records = bench.main(["device=cpu", "frames=8", "batch=1", "repeats=1", "warmup=0", "memory=false"])
    out = capsys.readouterr().out
    assert {r["name"] for r in records} == {"stgcn", "ske2grid_d5", "ske2grid_d8_pls"}
    assert "MAC ratio" in out and "D8 front end (UPT/GIT, training" in out
    assert "cascade matrix cached (not recomputed)" in out
