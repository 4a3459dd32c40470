"""Exact parameter counts of the spec's networks, read from gridconv/paper.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.profiling import count_params
from gridconv.models import build_model

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())


def arch_config(model: dict) -> dict:
    cfg = dict(model)
    if "arch" not in cfg:
        cfg["arch"] = "dgridconv" if cfg.pop("dynamic") else "gridconv"
    return cfg


@pytest.mark.parametrize("entry", PAPER["architectures"], ids=lambda e: e["name"])
def test_param_count(entry: dict) -> None:
    assert count_params(build_model(arch_config(entry["model"]))) == entry["params"]


def test_param_counts_of_table_rows_match_architectures() -> None:
    by_model = {(a["model"].get("sgt"), a["model"].get("hidden_size"), a["model"].get("num_blocks"),
                 a["model"].get("dynamic")): a["params"] for a in PAPER["architectures"]}
    for row in PAPER["rows"]:
        sgt = "learnable" if "learnable" in row["id"] else "handcrafted"
        assert by_model[(sgt, 256, 2, True)] == row["params"], row["id"]
