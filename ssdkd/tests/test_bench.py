"""build_bench_runs: three methods on one teacher, same student init, shared timers (no timing asserted)."""

from __future__ import annotations

import pytest
import torch

from ssdkd.bench import bench_configs, build_bench_runs
from ssdkd.datafree import SynthesisStopped
from ssdkd.models import create_model
from ssdkd.ssdkd import SSDKD

TINY = ["trainer.epochs=3", "method.warmup=1", "method.kd_batch_size=4", "method.kd_steps_per_epoch=2",
        "method.synthesis.batch_size=4", "data.train_size=40"]


def test_bench_runs_are_item9s_experiments_on_one_teacher_and_student_init() -> None:
    configs = bench_configs(TINY, deepinv_iterations=3)
    for name in ("ssdkd", "fast2"):  # tiny generators (DeepInversion has none)
        configs[name]["method"]["synthesis"].update(ngf=4, nz=8)
    configs["deepinv2k"]["method"]["kd_steps_per_epoch"] = 8
    configs["fast2"]["method"]["kd_steps_per_epoch"] = 8
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10)
    runs = build_bench_runs(configs, teacher)
    assert set(runs) == {"ssdkd", "fast2", "deepinv2k"}
    inits = [r.student.state_dict() for r in runs.values()]
    assert all(torch.equal(inits[0][k], i[k]) for i in inits[1:] for k in inits[0])
    for run in runs.values():
        assert run.method.teacher is teacher
        for _ in range(2):
            m = run.epoch()
        assert m["t_total"] == m["t_inv"] + m["t_kd"] and m["samples_generated"] > 0
    assert isinstance(runs["ssdkd"].method, SSDKD) and runs["ssdkd"].method.buffer.capacity == 4  # 10% of 40
    assert runs["ssdkd"].method.kd_steps == 2 and runs["fast2"].method.kd_steps == 8
    # the bench's DeepInversion time limit cuts a batch short and adds nothing
    di = runs["deepinv2k"].method
    n = len(di.pool)
    di.synthesizer.should_stop = lambda: True
    with pytest.raises(SynthesisStopped):
        di.run_epoch()
    assert len(di.pool) == n


def test_bench_proportions_of_the_shipped_experiments() -> None:
    configs = bench_configs()
    ssd, fast, di = (configs[n]["method"] for n in ("ssdkd", "fast2", "deepinv2k"))
    assert fast["kd_steps_per_epoch"] == di["kd_steps_per_epoch"] == 4 * ssd["kd_steps_per_epoch"]
    assert di["synthesis"]["iterations"] == 2000
    assert fast["synthesis"] == ssd["synthesis"] and fast["warmup"] == ssd["warmup"]
    assert configs["fast2"]["trainer"] == configs["ssdkd"]["trainer"]


def test_time_to_target_is_the_first_epoch_reaching_it() -> None:
    from ssdkd.bench import time_to_target

    curve = [{"t_total": 1.0, "top1": 10.0}, {"t_total": 2.0, "top1": 50.0}, {"t_total": 3.0, "top1": 40.0}]
    assert time_to_target(curve, 45.0) == 2.0 and time_to_target(curve, 60.0) is None


@pytest.mark.slow  # minutes on a shared CPU
def test_bench_cli_prints_ratios_on_a_given_teacher(tmp_path) -> None:

    from common.testing import require_or_skip, shared_data_dir
    from ssdkd.bench import main

    require_or_skip(shared_data_dir("mnist"), "the real MNIST digits (shared/data/mnist)")
    teacher = tmp_path / "t.pth"
    torch.save({"state_dict": create_model("resnet8", 10).state_dict()}, teacher)
    text = main([f"teacher={teacher}", f"output_dir={tmp_path}", "threads=1", "deepinv_iterations=2", *TINY])
    assert "t_total(Fast-2) / t_total(SSD-KD) =" in text and "DeepInv-2k / SSD-KD" in text
    for name in ("ssdkd", "fast2", "deepinv2k"):
        assert f"| {name} |" in text


@pytest.mark.parametrize("arg", ["repeats=3", "warmup=0", "modes=infer", "macs=false"])
def test_bench_refuses_shared_keys_it_does_not_use(monkeypatch: pytest.MonkeyPatch, arg: str) -> None:
    """`make bench-ssdkd ARGS="repeats=3"` must not be accepted and silently ignored (issue 8 item 5: a key means
    the same for every paper's bench, or is refused by name)."""
    import ssdkd.bench as bench
    from common.errors import UserError

    def started(*args, **kwargs):
        raise RuntimeError("the bench started")

    monkeypatch.setattr(bench, "bench_configs", started)
    with pytest.raises(UserError, match=arg.split("=")[0] + " not used here"):
        bench.main([arg])
    with pytest.raises(RuntimeError, match="the bench started"):  # the keys it uses still reach the bench
        bench.main(["device=cpu", "threads=0", "memory=false"])
