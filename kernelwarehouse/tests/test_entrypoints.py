"""End-to-end: the real entry points on synthetic ImageNet-format data (a few steps, then resume), eval of
the produced checkpoint, and the one-line errors promised for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMALL = ["profile=smoke", "data.train_per_class=8", "data.val_per_class=2", "trainer.global_batch=8",
         "trainer.max_device_batch=8", "trainer.log_every=1"]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_smoke_then_resume_then_eval(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["experiment=kw1d2x_mobilenetv2_050", *SMALL, f"data.root={tmp_path / 'data'}",
              f"hydra.run.dir={run_dir}", f"output_dir={tmp_path / 'outputs'}"]
    first = run("kernelwarehouse.train", *common, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    tau = state["model"]["model.warehouse_manager.temperature"].item()  # checkpointed with the model
    assert 0.0 < tau < 1.0

    second = run("kernelwarehouse.train", *common, "trainer.max_steps=4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["profile"] == "smoke" and result["metrics"]["steps"] == 4.0
    assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["global_step"] == 4

    evaluated = run("kernelwarehouse.eval", *common, f"checkpoint={run_dir / 'best.pt'}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "(ours checkpoint): loss=" in evaluated.stdout


@pytest.mark.parametrize("args,message", [
    (["experiment=kw1x_resnet18"], "data.root is not set"),
    (["experiment=kw1x_resnet18", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet does not exist"),
    (["experiment=kw1x_resnet18", "profile=smoke", "method.impl=fast"], "method.impl='fast'"),
])
def test_train_bad_inputs_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = run("kernelwarehouse.train", *args, f"hydra.run.dir={tmp_path}", f"output_dir={tmp_path}",
                 f"data.root={tmp_path / 'd'}" if "profile=smoke" in args else "trainer.seed=0")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = run("kernelwarehouse.eval", "experiment=kw1d2x_mobilenetv2_050", *SMALL,
                 f"data.root={tmp_path / 'data'}", f"checkpoint={bad}", f"hydra.run.dir={tmp_path}",
                 f"output_dir={tmp_path}")
    assert result.returncode == 2 and "bad.pth" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = ["experiment=kw1d2x_mobilenetv2_050", *SMALL, "trainer.epochs=50", f"data.root={tmp_path / 'data'}",
            f"hydra.run.dir={run_dir}", f"output_dir={tmp_path / 'outputs'}"]
    sigterm_then_resume("kernelwarehouse.train", args, run_dir, resume_args=("trainer.epochs=1",))
    assert json.loads((run_dir / "result.json").read_text())["kind"] == "trained"


@pytest.mark.parametrize("channels_last", [True, False])
def test_bench_runs_every_candidate_in_one_memory_format(channels_last: bool) -> None:
    """The plain baseline and ours get the same memory format (channels_last by default: the baseline's faster
    CPU format, issue 8), which ``Module.to(memory_format=)`` could not give KW's 5-D warehouses."""
    from kernelwarehouse.bench import candidates_for, parse_args

    opts = parse_args(["batch=2", "size=32", f"channels_last={str(channels_last).lower()}"])
    assert parse_args([])["channels_last"] is True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    candidates = candidates_for("kw1x_resnet18", opts, torch.device("cpu"))
    assert [c.name for c in candidates] == ["resnet18", "kw1x_resnet18"]
    for cand in candidates:
        convs = [m for m in cand.model.modules() if type(m) is torch.nn.Conv2d]
        assert convs and all(m.weight.is_contiguous(memory_format=fmt) for m in convs)
        cand.steps["infer"]()


def test_bench_layers_times_every_kw_layer_in_each_application(capsys: pytest.CaptureFixture[str]) -> None:
    """``layers=true`` times each KW conv layer in every application it is eligible for (the one ``auto`` picks
    among them) beside the plain conv of the same name, and prints the floor that puts on the inference ratio."""
    from kernelwarehouse.bench import main
    from kernelwarehouse.models import create_model
    from kernelwarehouse.warehouse import KWConvNd

    threads = torch.get_num_threads()
    try:
        main(["layers=true", "modes=infer", "batch=2", "size=32", "repeats=1", "warmup=1", "memory=false",
              "macs=false", "threads=1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in out.splitlines()
            if line.startswith("| layer")}
    model = create_model("kw1x_resnet18")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, KWConvNd)}
    assert set(rows) == set(layers)
    paths = ["grouped", "pointwise", "tapwise", "im2col", "mixed"]
    for name, cells in rows.items():
        eligible = layers[name].applications()
        assert cells[2] in eligible and cells[-1] in eligible
        timed = {p for p, cell in zip(paths, cells[4:9]) if cell != "-"}
        assert timed == set(eligible) and all(float(c) > 0 for c in cells[3:10] if c != "-")
    assert "floor from these applications: with the fastest in every KW layer, inference would cost " in out
