"""build_bench_runs: three methods on one teacher, same student init, shared timers (no timing asserted)."""

from __future__ import annotations

import pytest
import torch

from ssdkd.bench import build_bench_runs

from .conftest import TinyNet


def test_bench_runs_share_teacher_and_student_init() -> None:
    torch.manual_seed(0)
    teacher = TinyNet(4)
    runs = build_bench_runs(teacher, lambda: TinyNet(4, width=4), num_classes=4, image_size=8, train_size=400,
                            epochs=3, warmup=1, scale=0.05, nz=8, ngf=4, deepinv_iterations=3)
    assert set(runs) == {"ssdkd", "fast2", "deepinv2k"}
    inits = [r.student.state_dict() for r in runs.values()]
    assert all(torch.equal(inits[0][k], i[k]) for i in inits[1:] for k in inits[0])
    for run in runs.values():
        assert run.method.teacher is teacher
        for _ in range(2):
            m = run.epoch()
        assert m["t_total"] == m["t_inv"] + m["t_kd"] and m["samples_generated"] > 0
    assert runs["ssdkd"].method.kd_steps == 5 and runs["fast2"].method.kd_steps == 20
    assert runs["ssdkd"].method.buffer.capacity == 2


def test_time_to_target_is_the_first_epoch_reaching_it() -> None:
    from ssdkd.bench import time_to_target

    curve = [{"t_total": 1.0, "top1": 10.0}, {"t_total": 2.0, "top1": 50.0}, {"t_total": 3.0, "top1": 40.0}]
    assert time_to_target(curve, 45.0) == 2.0 and time_to_target(curve, 60.0) is None


@pytest.mark.slow  # minutes on a shared CPU
def test_bench_cli_prints_ratios_on_a_given_teacher(tmp_path) -> None:

    from common.testing import require_or_skip, shared_data_dir
    from ssdkd.bench import main
    from ssdkd.models import create_model

    require_or_skip(shared_data_dir("mnist"), "the real MNIST digits (shared/data/mnist)")
    teacher = tmp_path / "t.pth"
    torch.save({"state_dict": create_model("resnet8", 10).state_dict()}, teacher)
    text = main([f"teacher={teacher}", "epochs=2", "kd_warmup=1", "scale=0.02", "deepinv_iterations=2",
                 f"output_dir={tmp_path}", "threads=1"])
    assert "t_total(Fast-2) / t_total(SSD-KD) =" in text and "DeepInv-2k / SSD-KD" in text
    for name in ("ssdkd", "fast2", "deepinv2k"):
        assert f"| {name} |" in text
