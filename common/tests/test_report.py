"""The paper-vs-ours report reads numbers, never invents them."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UserError
from common.report import main, paper_report, status, write_result

PAPER_YAML = """
paper: Toy Paper (2099)
tolerance: {top1: 0.2}
rows:
  - id: resnet_a
    table: Table 1
    metrics: {top1: 70.0}
  - id: resnet_b
    metrics: {top1: 75.0, mpjpe: 40.0}
    higher_is_better: {mpjpe: false}
  - id: unknown_row
    metrics: {top1: null}
"""


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    root, outputs = tmp_path / "repo", tmp_path / "outputs"
    (root / "norm").mkdir(parents=True)
    (root / "norm" / "paper.yaml").write_text(PAPER_YAML)
    for i, v in enumerate((69.9, 70.1)):  # two seeds of row a
        d = outputs / "norm" / "resnet_a" / f"run{i}"
        d.mkdir(parents=True)
        write_result(d, "norm", "resnet_a", "resnet_a", "full", {"top1": v}, seed=i)
    d = outputs / "norm" / "resnet_b" / "run"
    d.mkdir(parents=True)
    write_result(d, "norm", "resnet_b", "resnet_b", "full", {"top1": 74.0, "mpjpe": 39.5})
    d = outputs / "norm" / "smoke_x" / "run"
    d.mkdir(parents=True)
    write_result(d, "norm", "smoke_x", "resnet_a", "smoke", {"top1": 12.5})
    return root, outputs


def test_status_rules() -> None:
    assert status(70.0, 69.9, tolerance=0.2) == "reproduced"
    assert status(70.0, 69.7, tolerance=0.2) == "below"
    assert status(40.0, 39.0, higher_is_better=False) == "reproduced"
    assert status(40.0, 41.0, higher_is_better=False) == "below"
    assert status(None, 50.0) == "unknown" and status(70.0, None) == "not run"


def test_report_table(tmp_path: Path) -> None:
    root, outputs = _setup(tmp_path)
    text = paper_report("norm", outputs, root)
    lines = text.splitlines()
    assert lines[0] == "## Toy Paper (2099)"
    assert "| resnet_a | top1 | 70.00 | 70.00 ± 0.14 (n=2) | 0.00 | reproduced |" in lines
    assert "| resnet_b | top1 | 75.00 | 74.00 | -1.00 | below |" in lines
    assert "| resnet_b | mpjpe | 40.00 | 39.50 | -0.50 | reproduced |" in lines
    assert "| unknown_row | top1 | unknown | — | — | not run |" in lines
    # the smoke run is listed apart and does not count as the row's result
    assert any("smoke_x" in line and "top1=12.500" in line for line in lines)
    assert text.count("12.5") == 1


def test_report_errors(tmp_path: Path, capsys) -> None:
    root, outputs = _setup(tmp_path)
    (root / "norm" / "paper.yaml").write_text("rows:\n  - id: a\n    metrics: {top1: high}\n")
    with pytest.raises(UserError, match="metric top1 must be a number or null"):
        paper_report("norm", outputs, root)
    with pytest.raises(UserError, match="not built yet"):
        paper_report("gridconv", outputs, root)
    with pytest.raises(SystemExit) as ex:
        main(["nosuchpaper", "--outputs", str(outputs)])
    assert ex.value.code == 2 and "unknown paper" in capsys.readouterr().err
