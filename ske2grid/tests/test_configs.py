"""Every paper.yaml row has an experiment that composes and validates; every PLS parent exists and ends where its
child's newest stage starts (spec §b.4); the default selection is the released one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import compose
from ske2grid.train import CONFIG_DIR, validate_config

ROWS = yaml.safe_load((Path(__file__).parents[1] / "paper.yaml").read_text())["rows"]


def _cfg(experiment: str):  # noqa: ANN202
    return compose(CONFIG_DIR, [f"experiment={experiment}", "data.root=/data/pyskl"])


@pytest.mark.parametrize("row", [r["id"] for r in ROWS if r.get("experiment", r["id"]) is not None])
def test_every_row_composes_and_its_pls_parent_fits(row: str) -> None:
    cfg = _cfg(row)
    c = validate_config(cfg)
    assert cfg.name == row and cfg.row == row
    assert str(c.trainer.selection) == "best_test" and c.trainer.epochs == 80 and c.optim.weight_decay == 5e-4
    if c.method.parent:
        parent = validate_config(_cfg(c.method.parent))
        seq = c.model.progressive_joint_seq
        assert parent.model.progressive_joint_seq + [parent.model.grid_shape[0] * parent.model.grid_shape[1]] == seq
        assert parent.data == c.data
