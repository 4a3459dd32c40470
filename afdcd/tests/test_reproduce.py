"""Issue item 7: with roots, the rows on local teachers and inits (a baseline needs no teacher); without, the
smoke floor: each run's mIoU beside twice the majority-class mIoU, and a run below it makes
`python -m afdcd.reproduce` exit non-zero with one line naming the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afdcd import reproduce as afdcd_reproduce
from common.reproduce import Finished, Plan, Run


def _finished(tmp_path: Path, name: str, miou: float, majority: float) -> Finished:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "result.json").write_text(json.dumps({"extra": {"majority_mIoU": majority}}))
    return Finished(Run(name, []), directory, 1.0, {"mIoU": miou, "last_mIoU": miou})


def _fake_reproduce(finished: list[Finished]):
    def fake(paper, argv, doc, extra, plan_full, summarize_smoke):
        plan = Plan(paper, {}, [], dict(extra), [], {}, [0], True)
        return summarize_smoke(plan, finished)
    return fake


def test_smoke_floor_met_prints_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [_finished(tmp_path, "smoke_teacher", 60.0, 16.0), _finished(tmp_path, "kd", 32.0, 16.0)]
    monkeypatch.setattr(afdcd_reproduce, "reproduce", _fake_reproduce(runs))
    text = afdcd_reproduce.main([])
    assert "| kd | 32.00 | 32.00 | 16.00 | 32.00 | yes |" in text and "smoke" in text


def test_smoke_run_below_twice_the_majority_class_exits_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OSVAI_TRACEBACK", raising=False)
    runs = [_finished(tmp_path, "smoke_teacher", 60.0, 16.0), _finished(tmp_path, "afdcd", 31.9, 16.0)]
    monkeypatch.setattr(afdcd_reproduce, "reproduce", _fake_reproduce(runs))
    with pytest.raises(SystemExit) as exit_:
        afdcd_reproduce.main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: smoke floor not met (mIoU < 2x the majority-class mIoU): afdcd\n"


def _planned(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    afdcd_reproduce.main([*argv, "dry_run=true"])
    return capsys.readouterr().out


def test_full_rows_take_teachers_and_inits_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CAMVID_ROOT", raising=False)
    teachers, inits = tmp_path / "teachers", tmp_path / "inits"
    teachers.mkdir(), inits.mkdir()
    teacher = teachers / "deeplabv3_resnet101_camvid_best_model.pth"
    init = inits / "resnet18-imagenet.pth"
    rows = "rows=camvid_teacher_deeplabv3_resnet101,camvid_pspnet_resnet18_baseline,camvid_pspnet_resnet18_afdcd"
    # no teacher_dir: the baseline still runs (it needs no teacher), the teacher and Af-DCD rows are skipped
    out = _planned(capsys, "camvid_test_root=/data/camvid", rows)
    runs = [ln for ln in out.splitlines() if ln.startswith("=== ")]
    assert len(runs) == 1 and "experiment=camvid_pspnet_resnet18_baseline" in runs[0]
    assert "skip camvid_teacher_deeplabv3_resnet101: no teacher" in out and "skip camvid_pspnet_resnet18_afdcd" in out
    teacher.touch(), init.touch()
    out = _planned(capsys, "camvid_test_root=/data/camvid", f"teacher_dir={teachers}", f"init_dir={inits}", rows)
    runs = [ln for ln in out.splitlines() if ln.startswith("=== ")]
    assert len(runs) == 3 and all("data.root=/data/camvid" in ln for ln in runs)
    assert f"checkpoint={teacher}" in runs[0]  # the teacher row evaluates the CIRKD checkpoint
    assert f"model.student_init={init}" in runs[1] and "teacher_checkpoint" not in runs[1]
    assert f"model.student_init={init}" in runs[2] and f"model.teacher_checkpoint={teacher}" in runs[2]
