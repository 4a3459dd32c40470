"""Exact parameter counts of every paper.yaml row (spec c; meta device, no memory), and Table 4's ratios."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from scalekd.models import create_student, create_teacher
from scalekd.viewed import TABLE4, run_viewed_samples, table4_ratios, viewed_samples

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())
ROWS = [r for r in PAPER["rows"] if "params" in r]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_param_count_official_build(row: dict) -> None:
    """`params`: the student's official mmcls build (ViTs keep their unused class token), else the teacher."""
    with torch.device("meta"):
        if row.get("student"):
            kw = {"class_token": True} if row["student"].startswith("vit") else {}
            model = create_student(row["student"], **kw)
        else:
            model = create_teacher(row["teacher"], img_size=row.get("img_size", 224))
    assert _count(model) == row["params"]


@pytest.mark.parametrize("row", [r for r in ROWS if "params_ours" in r], ids=lambda r: r["id"])
def test_param_count_deployed_student(row: dict) -> None:
    with torch.device("meta"):
        assert _count(create_student(row["student"])) == row["params_ours"]


def test_param_counts_differ_from_paper_only_where_flagged() -> None:
    """The paper's printed value (M, 2 decimals) equals ours unless the row explains why (k.2, k.6)."""
    for row in ROWS:
        printed = float(row["params_paper"].rstrip("M"))
        if round(row["params"] / 1e6, 2) != printed:
            assert "note" in row, f"{row['id']}: {row['params']} vs paper {row['params_paper']} with no note"


def test_param_teacher_counts() -> None:
    with torch.device("meta"):
        assert _count(create_teacher("swin_s")) == 49_606_258
        assert _count(create_teacher("swin_b")) == 87_768_224


def test_viewed_samples_table4_ratios() -> None:
    """All four headline ratios of Table 4 follow from its rows (d.5)."""
    ratios = table4_ratios()
    want = PAPER["table4_ratios"]
    assert round(ratios["supervised"], 2) == want["supervised_jft"] == 5.58
    assert round(ratios["self-supervised"], 2) == want["self_supervised_ibot"] == 11.75
    assert round(ratios["cross-modal"], 2) == want["cross_modal_clip"] == 195.39
    assert round(ratios["EVA hybrid"], 2) == want["eva_hybrid_eva02"] == 8.73
    viewed = [round(viewed_samples(*zip(*r[3], strict=True))) for r in TABLE4]
    assert viewed == [1274, 2141, 384, 2183, 4512, 384, 74304, 75030, 384, 3352, 384]


def test_viewed_samples_of_a_run() -> None:
    assert run_viewed_samples(1251 * 300, 1024) == 384_307_200  # ~1.28M x 300 at global batch 1024
    with pytest.raises(ValueError):
        viewed_samples([1.28], [300, 1])
