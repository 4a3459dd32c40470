"""Spec i's orderings on the smoke pipeline over three seeds (slow: three teachers and nine students on CPU):
teacher > CE + KD student > CE student on the 3-seed mean, and the Af-DCD student >= the CE + KD student - 0.5."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from afdcd.reproduce import main as reproduce_main


@pytest.mark.slow
def test_three_seed_orderings_of_spec_i(tmp_path: Path) -> None:
    reproduce_main(["seeds=0,1,2", f"output_dir={tmp_path}"])
    by_run: dict[str, list[float]] = {}
    for path in (tmp_path / "afdcd").glob("*/*/result.json"):
        record = json.loads(path.read_text())
        by_run.setdefault(path.parent.parent.name, []).append(record["metrics"]["mIoU"])
    assert all(len(v) == 3 for v in by_run.values()), by_run
    mean = {k: statistics.mean(v) for k, v in by_run.items()}
    teacher, ce = mean["smoke_teacher"], mean["cityscapes_deeplabv3_resnet18_baseline"]
    kd, afdcd = mean["cityscapes_deeplabv3_resnet18_kd"], mean["cityscapes_deeplabv3_resnet18_afdcd_randmask"]
    assert teacher > kd > ce, mean
    assert afdcd >= kd - 0.5, mean
