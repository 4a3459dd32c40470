"""Real-data check (item 9): a resnet8 teacher trained on 8,000 real MNIST digits, then SSD-KD and Fast-2 students
that never see a real image, scored on the 2,000 held-out digits (README table). Bars: teacher >= 95%, SSD-KD
student >= 50%.

    PYTHONPATH=$PWD python -m pytest -m slow ssdkd/tests/test_mnist.py -s     # prints the table
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import compose
from common.testing import require_or_skip, shared_data_dir
from ssdkd.train import CONFIG_DIR, run


@pytest.mark.slow
def test_mnist_teacher_then_ssdkd_and_fast2_students_never_see_a_real_image(tmp_path: Path) -> None:
    root = require_or_skip(shared_data_dir("mnist"), "the real MNIST digits (shared/data/mnist)")
    common = ["experiment=mnist_resnet8_ssdkd", f"data.root={root}", f"output_dir={tmp_path}"]
    ssd, ssd_dir = run(compose(CONFIG_DIR, common))
    teacher = json.loads((ssd_dir / "result.json").read_text())["extra"]["teacher_top1"]
    fast, _ = run(compose(CONFIG_DIR, [*common, "method=fast", "name=mnist_resnet8_fast2",
                                       "method.kd_steps_per_epoch=80", "method.kd_batch_size=64",
                                       "method.synthesis.batch_size=64", "method.warmup=5",
                                       f"model.teacher_checkpoint={ssd_dir / 'teacher' / 'best.pt'}"]))
    print("\n| model | held-out top-1 (%): last / best epoch | t_total (s) | samples generated |\n|---|---|---|---|")
    print(f"| teacher resnet8 (8,000 real digits) | {teacher:.2f} | - | - |")
    for name, m in (("SSD-KD student resnet8", ssd), ("Fast-2 student resnet8", fast)):
        print(f"| {name} | {m['top1']:.2f} / {m['best_top1']:.2f} | {m['t_total']:.1f} | "
              f"{m['samples_generated']:.0f} |")
    assert teacher >= 95.0
    assert ssd["top1"] >= 50.0
