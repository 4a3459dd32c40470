"""Parameter counts (spec §c) for every paper.yaml integer, each model built from its experiment config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import common.config  # noqa: F401 - registers the shared schemas (osvai_base) that train.yaml starts with
from ske2grid.models import create_model, model_from_config
from ske2grid.ske2grid import Ske2Grid

PAPER = Path(__file__).resolve().parents[1]
ROWS = yaml.safe_load((PAPER / "paper.yaml").read_text())["rows"]
EXPERIMENTS = sorted(p.stem for p in (PAPER / "configs" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(PAPER / "configs"), version_base=None):
        yield lambda experiment: compose("train", overrides=[f"experiment={experiment}"])


def count(model) -> tuple[int, int]:
    """(trainable, every nn.Parameter of the release incl. index_sel): spec §c's two columns."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    front = next(m for m in model.modules() if isinstance(m, Ske2Grid))
    index_sel = sum(stage.git.index_sel.numel() for stage in front.stages)
    return trainable, sum(p.numel() for p in model.parameters()) + index_sel


@pytest.mark.parametrize("row", [r for r in ROWS if "params" in r], ids=lambda r: r["id"])
def test_param_counts_match_paper_yaml(row: dict, composer) -> None:
    cfg = composer(row["id"])
    with torch.device("meta"):  # shapes only: counting needs no memory or init
        model = model_from_config(cfg.model, cfg.data)
    assert count(model) == (row["params"], row["params_with_index_sel"])


def test_param_breakdown_d5() -> None:
    """§c: conv blocks 4,368,192; data BN 102; UPT 425; GIT 625; head 256·K + K."""
    m = create_model("ske2grid", 60)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(m.blocks) == 4_368_192
    assert n(m.ske2grid.data_bn) == 102
    assert n(m.ske2grid.stages[0].upt) == 425 and n(m.ske2grid.stages[0].git) == 625
    assert n(m.head) == 256 * 60 + 60


@pytest.mark.parametrize("grid,seq,ups,gits", [((6, 6), [17, 25], 1325, 1921), ((7, 7), [17, 25, 36], 3089, 4322),
                                              ((8, 8), [17, 25, 36, 49], 6225, 8418), ((6, 6), [17], 612, 1296),
                                              ((8, 8), [17], 1088, 4096)])
def test_param_upt_git_columns(grid, seq, ups, gits) -> None:
    """§c's UPT and GIT-score columns for every cascade."""
    m = create_model("ske2grid", 60, grid_shape=grid, progressive_joint_seq=seq).ske2grid
    assert sum(s.upt.weight.numel() for s in m.stages) == ups
    assert sum(s.git.theta.numel() for s in m.stages) == gits


def test_param_k120_adds_15420() -> None:
    for grid, seq in [((5, 5), [17]), ((8, 8), [17, 25, 36, 49])]:
        a = count(create_model("ske2grid", 60, grid_shape=grid, progressive_joint_seq=seq))
        b = count(create_model("ske2grid", 120, grid_shape=grid, progressive_joint_seq=seq))
        assert (b[0] - a[0], b[1] - a[1]) == (15_420, 15_420)


def test_param_stgcn_baseline_count() -> None:
    """pyskl ST-GCN (coco, stgcn_spatial, K = 60): counted here from its layers, not a paper value."""
    v, k = 17, 3
    widths = [3, 64, 64, 64, 64, 128, 128, 128, 256, 256, 256]
    total = 2 * v * 3  # data BN
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        total += k * v * v + a * b * k + b * k + 2 * b  # PA, 1x1 conv to K*C_out, BN
        total += b * b * 9 + b + 2 * b  # 9x1 temporal conv + BN
        if i > 0 and a != b:
            total += a * b + b + 2 * b  # 1x1 residual conv + BN
    total += 256 * 60 + 60
    assert sum(p.numel() for p in create_model("stgcn", 60).parameters()) == total


def test_every_row_has_an_experiment_and_back() -> None:
    ids = {r["id"] for r in ROWS if "cited_note" not in r or r["id"] in EXPERIMENTS}
    assert ids == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        cfg = yaml.safe_load((PAPER / "configs" / "experiment" / f"{name}.yaml").read_text())
        assert cfg["name"] == name and cfg["row"] == name


@pytest.mark.parametrize("name", ["ske2grid_d8_pls_ntu120_xsub_3danno", "stgcn_gym_hrnet"])
def test_param_experiments_without_spec_counts_build(name: str, composer) -> None:
    """Rows with no spec count still build from their config (3-D NTU joints, 99 FineGYM classes)."""
    cfg = composer(name)
    with torch.device("meta"):
        model = model_from_config(cfg.model, cfg.data)
    assert model.head.fc.out_features == cfg.data.num_classes
