"""The paper-vs-ours report reads result records, never invents a number, and counts as a reproduction only
a complete training run of ours on real data with the full recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import UserError
from common.report import gather, main, paper_report, status
from common.results import ResultRecord, data_kind, evaluation_record, read_record, write_record

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


def _record(row: str, metrics: dict[str, float], **how: Any) -> ResultRecord:
    made = dict(kind="trained", dataset="cifar100", data="real", checkpoint="ours", complete=True,
                selection="last", profile="full", seed=0, git_commit="abc")
    made.update(how)
    return ResultRecord(paper="norm", experiment=row, row=row, metrics=metrics, **made)


def _write(outputs: Path, run: str, record: ResultRecord) -> Path:
    return write_record(outputs / "norm" / record.experiment / run, record)


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    root, outputs = tmp_path / "repo", tmp_path / "outputs"
    (root / "norm").mkdir(parents=True)
    (root / "norm" / "paper.yaml").write_text(PAPER_YAML)
    for i, v in enumerate((69.9, 70.1)):  # two seeds of row a
        _write(outputs, f"run{i}", _record("resnet_a", {"top1": v}, seed=i))
    _write(outputs, "run", _record("resnet_b", {"top1": 74.0, "mpjpe": 39.5}, selection="best_heldout"))
    return root, outputs


def test_report_status_rules() -> None:
    assert status(70.0, 69.9, tolerance=0.2) == "reproduced"
    assert status(70.0, 69.7, tolerance=0.2) == "below"
    assert status(40.0, 39.0, higher_is_better=False) == "reproduced"
    assert status(40.0, 41.0, higher_is_better=False) == "below"
    assert status(None, 50.0) == "unknown" and status(70.0, None) == "not run"


def test_report_table_of_reproductions(tmp_path: Path) -> None:
    root, outputs = _setup(tmp_path)
    lines = paper_report("norm", outputs, root).splitlines()
    assert lines[0] == "## Toy Paper (2099)"
    assert "| resnet_a | top1 | 70.00 | 70.00 ± 0.14 (n=2) | 0.00 | reproduced | last epoch | — |" in lines
    assert "| resnet_b | top1 | 75.00 | 74.00 | -1.00 | below | best on held-out | — |" in lines
    assert "| resnet_b | mpjpe | 40.00 | 39.50 | -0.50 | reproduced | best on held-out | — |" in lines
    assert "| unknown_row | top1 | unknown | — | — | not run | — | — |" in lines


def test_report_puts_each_kind_of_record_in_its_place(tmp_path: Path) -> None:
    root, outputs = tmp_path / "repo", tmp_path / "outputs"
    (root / "norm").mkdir(parents=True)
    (root / "norm" / "paper.yaml").write_text(PAPER_YAML)
    kinds = {
        "official_eval": evaluation_record("norm", "resnet_a", "resnet_a", {"top1": 71.25}, "cifar100",
                                           "official", "full", "released.pth"),
        "synthetic_full": _record("resnet_a", {"top1": 91.5}, dataset="synthetic_cifar", data="synthetic"),
        "smoke": _record("resnet_a", {"top1": 12.5}, dataset="synthetic_cifar", data="synthetic",
                         profile="smoke"),
        "cut_short": _record("resnet_a", {"top1": 80.5}, complete=False),
        "recipe_overridden": _record("resnet_a", {"top1": 70.5}, extra={"overrides": ["trainer.epochs=5"],
                                                                        "recipe_overrides": ["trainer.epochs=5"]}),
        "our_eval": evaluation_record("norm", "resnet_a", "resnet_a", {"top1": 82.5}, "cifar100", "ours",
                                      "full", "best.pt"),
        "official_eval_synthetic": evaluation_record("norm", "resnet_a", "resnet_a", {"top1": 33.5},
                                                     "synthetic_cifar", "official", "full", "released.pth"),
    }
    for run, record in kinds.items():
        _write(outputs, run, record)
    old = outputs / "norm" / "resnet_a" / "old" / "result.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"paper": "norm", "experiment": "resnet_a", "row": "resnet_a", "profile": "full", '
                   '"metrics": {"top1": 99.0}, "seed": null}')  # the old format: no provenance
    torn = outputs / "norm" / "resnet_a" / "torn" / "result.json"
    torn.parent.mkdir(parents=True)
    torn.write_text('{"paper": "norm", "metr')

    found = gather(outputs, "norm")
    assert not found.ours  # none of these is a reproduction
    assert [r.metrics["top1"] for r in found.official["resnet_a"]] == [71.25]
    assert sorted(p.parent.name for p, _ in found.apart) == sorted(
        ["synthetic_full", "smoke", "cut_short", "recipe_overridden", "our_eval", "official_eval_synthetic"])
    assert sorted(p.parent.name for p, _ in found.skipped) == ["old", "torn"]

    text = paper_report("norm", outputs, root)
    lines = text.splitlines()
    # the official weights have their own column; the row stays "not run" for us
    assert "| resnet_a | top1 | 70.00 | — | — | not run | — | 71.25 |" in lines
    assert "reproduced" not in text and "below" not in text
    apart = {line.split("|")[-2].strip(): line for line in lines if line.startswith("| resnet_a | ")
             and line.count("|") == 8}
    assert "synthetic data" in apart["synthetic_full"] and "91.500" in apart["synthetic_full"]
    assert "smoke" in apart["smoke"] and "cut short" in apart["cut_short"]
    assert "evaluation of our checkpoint" in apart["our_eval"]
    assert "recipe overridden: trainer.epochs=5" in apart["recipe_overridden"]
    assert any("old/result.json: result record lacks" in line for line in lines)
    assert any("torn/result.json: not a readable result record" in line for line in lines)
    assert "99.0" not in text  # the old-format number is never shown


def test_report_never_counts_official_eval_or_synthetic_full_run_as_reproduced(tmp_path: Path) -> None:
    root, outputs = tmp_path / "repo", tmp_path / "outputs"
    (root / "norm").mkdir(parents=True)
    (root / "norm" / "paper.yaml").write_text(PAPER_YAML)
    # both would "reproduce" row a (70.0) by value
    _write(outputs, "official", evaluation_record("norm", "resnet_a", "resnet_a", {"top1": 75.0}, "cifar100",
                                                  "official", "full", "released.pth"))
    _write(outputs, "synthetic", _record("resnet_a", {"top1": 75.0}, dataset="synthetic_cifar",
                                         data="synthetic"))
    text = paper_report("norm", outputs, root)
    assert "| resnet_a | top1 | 70.00 | — | — | not run | — | 75.00 |" in text.splitlines()
    assert "reproduced" not in text
    # and the record itself says so
    for path in (outputs / "norm" / "resnet_a").rglob("result.json"):
        assert not read_record(path).counts_as_reproduction


def test_report_record_fields_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data='fake'"):
        _record("resnet_a", {"top1": 1.0}, data="fake")
    assert data_kind("synthetic_cifar") == "synthetic" and data_kind("imagenet") == "real"
    rec = evaluation_record("norm", "e", None, {"top1": 1}, "mnist", "official", "full", "x.pth", note="n")
    assert rec.kind == "evaluated" and rec.data == "real" and rec.extra == {"note": "n"}
    path = write_record(tmp_path, rec)
    assert read_record(path) == rec


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


def test_report_data_kind_sees_synthetic_data_in_a_real_layout(tmp_path: Path) -> None:
    from common.data import write_synthetic_cifar

    root = tmp_path / "cifar"
    write_synthetic_cifar(root, num_classes=10, train_per_class=1, test_per_class=1)
    assert data_kind("cifar100", root) == "synthetic"  # named like the real set, written by our writer
    assert data_kind("cifar100", tmp_path / "elsewhere") == "real"


def test_report_gain_rows_are_differences_of_our_runs(tmp_path: Path) -> None:
    """A row that gives only a gain (`metrics: {mAP_gain: 3.6}`, `gain_over: <base row>`): ours = row - base."""
    root, outputs = tmp_path / "repo", tmp_path / "outputs"
    (root / "norm").mkdir(parents=True)
    (root / "norm" / "paper.yaml").write_text(
        "paper: Gains\nrows:\n  - id: base\n    metrics: {mAP: null}\n"
        "  - id: method\n    metrics: {mAP: null, mAP_gain: 3.6}\n    gain_over: base\n")
    text = paper_report("norm", outputs, root)
    assert "| method | mAP_gain | 3.60 | — | — | not run |" in text
    _write(outputs, "r0", _record("base", {"mAP": 80.0}))
    _write(outputs, "r1", _record("method", {"mAP": 83.5}))
    text = paper_report("norm", outputs, root)
    assert "| method | mAP_gain | 3.60 | 3.50 | -0.10 |" in text


def test_recipe_overrides_are_the_budget_batch_optimizer_and_schedule_keys() -> None:
    from common.results import recipe_overrides

    given = ["experiment=row", "data.root=/d", "trainer.epochs=5", "+trainer.iterations=9", "trainer.seed=1",
             "trainer.global_batch=8", "optim.lr=0.1", "++schedule.warmup_epochs=0", "trainer.workers=2",
             "model.teacher_checkpoint=/t.pth", "optimizer_note=x"]
    assert recipe_overrides(given) == ["trainer.epochs=5", "+trainer.iterations=9", "trainer.global_batch=8",
                                       "optim.lr=0.1", "++schedule.warmup_epochs=0"]
