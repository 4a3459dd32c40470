"""Every README row has an experiment that composes, validates, and carries the official recipe;
profile=smoke changes sizes only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from common.config import compose
from common.engine import build_scheduler
from gridconv.train import CONFIG_DIR, lr_at_epoch, validate_config

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
    assert (c.trainer.global_batch, c.trainer.epochs, c.trainer.selection) == (200, 100, "best_heldout")
    # the official stepped decay, lr x 0.96 after epoch 0 and every 10th epoch, as the loop's scheduler runs it
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=c.optim.lr)
    sched = build_scheduler(opt, c.schedule, c.trainer.epochs, steps_per_epoch=7)
    lrs = []
    for epoch in range(c.trainer.epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([lr_at_epoch(e, 1e-3, 0.96, 10) for e in range(c.trainer.epochs)], rel=1e-12)
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
    assert smoke.method.anneal_epochs / smoke.trainer.epochs <= 0.3  # still anneals within the run
