"""Exact parameter counts of every paper.yaml row (spec c.1-c.3), and the README's printed values beside them."""

from __future__ import annotations

import pytest
import torch

from common.report import load_paper_yaml
from noah.models import create_model
from noah.noah import NOAH

ROWS = [r for r in load_paper_yaml("noah").rows if r.extra.get("params") is not None]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_every_imagenet_row_has_an_exact_count() -> None:
    imagenet = [r for r in load_paper_yaml("noah").rows if r.extra.get("dataset") == "imagenet"]
    assert len(imagenet) == 52 and all(isinstance(r.extra.get("params"), int) for r in imagenet)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_param_count(row) -> None:
    with torch.device("meta"):  # shapes only: the 86M-parameter hosts build in a fraction of a second
        model = create_model(row.extra["model"], head=row.extra["head"])
    assert count(model) == row.extra["params"]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_param_readme_value_beside_the_exact_count(row) -> None:
    """Rows without a note print the exact count rounded to 0.01M; rows with a note are the README misprints."""
    printed = f"{row.extra['params'] / 1e6:.2f}M"
    if row.extra.get("params_note"):
        assert printed != row.extra["params_readme"], "a noted discrepancy that is not one"
    else:
        assert printed == row.extra["params_readme"]


@pytest.mark.parametrize(("c", "k", "n", "r"), [(512, 1000, 4, 0.5), (2048, 1000, 4, 0.125), (1280, 1000, 8, 0.25),
                                                (384, 1000, 4, 0.5), (40, 6, 8, 0.2)])
def test_param_head_formula(c: int, k: int, n: int, r: float) -> None:
    """Spec b.3/h.1: NOAH has C*K + 2*N*K parameters, (2N - 1)*K more than a linear head."""
    with torch.device("meta"):
        head = NOAH(c, k, head_num=n, key_ratio=r)
    assert count(head) == c * k + 2 * n * k
    assert count(head) - (c * k + k) == (2 * n - 1) * k


def test_param_noah_minus_baseline_is_the_head_difference() -> None:
    """Spec c.2 notes: NOAH-DeiT = baseline - 2D (no class token, one pos_embed row fewer) + (2N - 1)K."""
    with torch.device("meta"):
        for name, d in (("deit_small_patch16_224", 384), ("pvt_tiny_050", 256)):
            base, noah = create_model(name, head="baseline"), create_model(name, head="noah")
            assert count(noah) - count(base) == -2 * d + 7 * 1000
