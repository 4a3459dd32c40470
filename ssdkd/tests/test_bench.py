"""build_bench_runs: three methods on one teacher, same student init, shared timers (no timing asserted)."""

from __future__ import annotations

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
