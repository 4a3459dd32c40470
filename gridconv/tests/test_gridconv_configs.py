"""Every README row has an experiment that composes, validates, and carries the official recipe;
profile=smoke changes sizes only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import compose
from gridconv.train import CONFIG_DIR, validate_config

ROWS = [r["id"] for r in yaml.safe_load((CONFIG_DIR.parent / "paper.yaml").read_text())["rows"]
        if r["dataset"] == "human36m"]


def test_every_human36m_row_has_an_experiment() -> None:
    assert sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")) == sorted(ROWS)


@pytest.mark.parametrize("row", ROWS)
def test_experiment_recipe(row: str) -> None:
    cfg = compose(CONFIG_DIR, [f"experiment={row}", "data.root=/nowhere"])
    c = validate_config(cfg)
    assert cfg.row == row and cfg.name == row
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adam", 1e-3, 0.0)
    assert (c.train.global_batch, c.train.epochs, c.schedule.gamma, c.schedule.decay_every) == (200, 100, 0.96, 10)
    assert (c.method.max_temperature, c.method.anneal_epochs) == (30.0, 10.0)
    assert (c.model.arch, c.model.hidden_size, c.model.num_blocks, c.model.grid_shape) == ("dgridconv", 256, 2, [5, 5])
    assert c.model.sgt == ("learnable" if "learnable" in row else "handcrafted")
    assert c.data.input == row.split("_")[0]
    assert c.model.padding_mode == (["c", "r"] if row.startswith("gt") else ["c", "z"])
    assert c.model.sgt_mode == "frozen" and c.model.sgt_prior == "standard" and c.model.dropout == 0.25


@pytest.mark.parametrize("row", ROWS)
def test_smoke_profile_changes_sizes_only(row: str, tmp_path: Path) -> None:
    full = validate_config(compose(CONFIG_DIR, [f"experiment={row}", "data.root=/nowhere"]))
    smoke = validate_config(compose(CONFIG_DIR, [f"experiment={row}", "profile=smoke", f"output_dir={tmp_path}"]))
    for group in ("optim", "schedule"):
        assert getattr(full, group) == getattr(smoke, group)
    same_model = {k: v for k, v in vars(full.model).items() if k != "hidden_size"}
    assert same_model == {k: v for k, v in vars(smoke.model).items() if k != "hidden_size"}
    assert smoke.data.name == "synthetic" and smoke.data.input == full.data.input
    assert smoke.method.max_temperature == full.method.max_temperature
    assert smoke.method.anneal_epochs / smoke.train.epochs <= 0.3  # still anneals within the run
