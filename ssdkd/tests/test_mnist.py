"""Real-data check (item 9): a resnet8 teacher trained on 8,000 real MNIST digits, then an SSD-KD student and a
Fast-2 student at SSD-KD's KD budget (the control of spec d.5 item 3: same epochs, inversion and KD steps; the
pool grows, uniform draws, no phi) that never see a real image, scored on the 2,000 held-out digits (README).
Fast-2 at its own 4x KD steps is in `ssdkd.bench`. Bars: within 10 min on 2 cores, teacher >= 95%, SSD-KD >= 50%.

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
    common = [f"data.root={root}", f"output_dir={tmp_path}"]
    ssd, ssd_dir = run(compose(CONFIG_DIR, ["experiment=mnist_resnet8_ssdkd", *common]))
    teacher = json.loads((ssd_dir / "result.json").read_text())["extra"]["teacher_top1"]
    k = compose(CONFIG_DIR, ["experiment=mnist_resnet8_ssdkd"]).method.kd_steps_per_epoch
    fast, _ = run(compose(CONFIG_DIR, ["experiment=mnist_resnet8_fast2", *common, "name=mnist_resnet8_fast2_control",
                                       f"method.kd_steps_per_epoch={k}",
                                       f"model.teacher_checkpoint={ssd_dir / 'teacher' / 'best.pt'}"]))
    print("\n| model | held-out top-1 (%): last / best evaluated epoch | t_inv / t_kd / t_total (s) | samples |\n"
          "|---|---|---|---|")
    print(f"| teacher resnet8 (8,000 real digits) | {teacher:.2f} | - | - |")
    for name, m in (("SSD-KD student resnet8", ssd), (f"Fast-2 student resnet8 at SSD-KD's {k} KD steps/epoch", fast)):
        print(f"| {name} | {m['top1']:.2f} / {m['best_top1']:.2f} | {m['t_inv']:.1f} / {m['t_kd']:.1f} / "
              f"{m['t_total']:.1f} | {m['samples_generated']:.0f} |")
    assert teacher >= 95.0
    assert ssd["top1"] >= 50.0
