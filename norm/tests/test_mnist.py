"""Real-data check: a teacher trained on 8,000 real MNIST digits, then a student that sees 500 labelled digits
trained with CE alone, with NORM and with NORM+CRD, all scored on the 2,000 held-out digits (README table).

    PYTHONPATH=$PWD python -m pytest -m slow norm/tests/test_mnist.py -s     # prints the table
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import compose
from common.testing import require_or_skip, shared_data_dir
from norm.train import CONFIG_DIR, run

STUDENTS = {"CE only": ["method=ce"], "NORM": ["method=norm"],
            # the CIFAR recipe's noise ratio K/n = 16384/50000 on 500 digits; K >> n breaks the NCE estimator
            "NORM+CRD": ["method=norm_crd", "method.crd.nce_k=164"]}


def _run(overrides: list[str]) -> tuple[dict[str, float], Path]:
    return run(compose(CONFIG_DIR, overrides))


def _complete(out: Path) -> bool:
    """The run's own record says the whole recipe ran (result.json's `complete`)."""
    return json.loads((out / "result.json").read_text())["complete"] is True


@pytest.mark.slow
def test_mnist_real_digits_teacher_then_ce_norm_and_norm_crd_students(tmp_path: Path) -> None:
    root = require_or_skip(shared_data_dir("mnist"), "the real MNIST digits (shared/data/mnist)")
    common = [f"data.root={root}", f"output_dir={tmp_path}", "trainer.log_every=1000"]
    teacher, teacher_dir = _run(["experiment=mnist_teacher_resnet20", *common])
    results = {"teacher ResNet20 (8,000 digits)": teacher}
    complete = {"teacher ResNet20 (8,000 digits)": _complete(teacher_dir)}
    for label, method in STUDENTS.items():
        metrics, out = _run(["experiment=mnist_resnet20_resnet8", *method, f"name=mnist_{method[0][7:]}",
                             f"model.teacher_checkpoint={teacher_dir / 'best.pt'}", *common])
        results[f"student ResNet8, 500 digits, {label}"] = metrics
        complete[f"student ResNet8, 500 digits, {label}"] = _complete(out)
        if label != "CE only":  # the FT folds into the classifier without changing a prediction
            assert metrics["top1_folded"] == metrics["top1"]
    print("\n| model | held-out top-1 (%): last epoch | best epoch |\n|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['top1']:.2f} | {m['best_top1']:.2f} |")
    assert teacher["top1"] >= 97.0
    for name, m in results.items():
        assert complete[name] and m["best_top1"] - m["top1"] <= 10.0, name  # no run ends far below its best
        if name.startswith("student"):
            assert 60.0 <= m["top1"] < teacher["top1"], name  # learns from 500 digits; the teacher is strongest
