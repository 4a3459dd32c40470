"""The real entry points on a tiny synthetic pickle: train (common loop) -> 10-clip eval, the PLS chain (parent
trained first, then reused; stage-0 pair bit-identical), convert -> eval roundtrip, SIGTERM -> 143 -> resume,
and the one-line errors promised for bad inputs (issue item 10)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import compose
from common.errors import UserError
from common.results import read_record
from ske2grid import eval as s2g_eval
from ske2grid import train as s2g_train
from ske2grid.convert import main as convert_main
from ske2grid.tests.test_convert import official_state

REPO = Path(__file__).resolve().parents[2]
TINY = ["profile=smoke", "data.train_per_class=2", "data.val_per_class=1", "data.test_clips=2", "data.clip_len=12",
        "model.widths=[4,8,8]", "trainer.epochs=1", "trainer.global_batch=8", "trainer.max_device_batch=8",
        "trainer.log_every=1"]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp_path / 'out'}", f"data.root={tmp_path / 'data'}", *extra]


def cfg_of(overrides: list[str]):  # noqa: ANN201
    return compose(s2g_train.CONFIG_DIR, overrides)


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OSVAI_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_then_eval_writes_records(tmp_path: Path) -> None:
    ov = tiny(tmp_path, "experiment=ske2grid_d5_ntu60_xsub_hrnet")
    run_dir = tmp_path / "run"
    metrics = s2g_train.run(cfg_of(ov), run_dir, ov)
    record = read_record(run_dir / "result.json")
    assert record.kind == "trained" and record.data == "synthetic" and record.profile == "smoke"
    assert record.selection == "best_test" and record.extra["test_clips"] == 2
    for key in ("top1", "top5", "mean_class_accuracy", "last_top1", "val1clip_top1"):
        assert key in record.metrics and 0.0 <= record.metrics[key] <= 100.0, key
    assert metrics["top1"] == record.metrics["top1"]
    evaluated = s2g_eval.run(cfg_of([*ov, f"checkpoint={run_dir / 'best.pt'}"]))
    assert evaluated["top1"] == pytest.approx(record.metrics["top1"])  # same weights, same deterministic clips
    rec = read_record(next((tmp_path / "out" / "ske2grid").rglob("eval-*/result.json")))
    assert rec.kind == "evaluated" and rec.checkpoint == "ours" and rec.extra["test_clips"] == 2


def test_pls_trains_the_parent_first_then_reuses_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ov = tiny(tmp_path, "experiment=ske2grid_d6_pls_ntu60_xsub_hrnet")
    s2g_train.run(cfg_of(ov), tmp_path / "d6", ov)
    assert "training it first" in capsys.readouterr().out
    parents = list((tmp_path / "out" / "ske2grid" / "ske2grid_d5_ntu60_xsub_hrnet").glob("*/best.pt"))
    assert len(parents) == 1
    parent = torch.load(parents[0], weights_only=True)["model"]
    child = torch.load(tmp_path / "d6" / "last.pt", weights_only=True)["model"]
    stage0 = [k for k in parent if ".stages.0." in k]
    assert stage0 and all(torch.equal(parent[k], child[k]) for k in stage0)  # frozen: bit-identical
    assert not torch.equal(parent["model.blocks.0.grid_conv.weight"], child["model.blocks.0.grid_conv.weight"])
    assert read_record(tmp_path / "d6" / "result.json").extra["parent_checkpoint"] == str(parents[0])
    s2g_train.run(cfg_of(ov), tmp_path / "d6b", ov)
    assert "reusing the finished parent run" in capsys.readouterr().out


def test_convert_eval_roundtrip(tmp_path: Path) -> None:
    ov = tiny(tmp_path, "experiment=ske2grid_d6_pls_ntu60_xsub_hrnet")
    cfg = cfg_of(ov)
    model = s2g_train.build_model(s2g_train.validate_config(cfg))
    release = tmp_path / "d5tod6_j.pth"
    torch.save({"meta": {"epoch": np.int64(16), "mmcv_version": "1.5.0"}, "state_dict": official_state(model),
                "optimizer": {"state": {}, "param_groups": []}}, release)
    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), *ov])
    saved = torch.load(converted, weights_only=True)
    assert saved["origin"] == "official" and saved["paper"] == "ske2grid"
    for k, v in model.state_dict().items():
        if not k.endswith("index_sel"):
            assert torch.equal(saved["state_dict"][k], v), k
    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        metrics[name] = s2g_eval.run(cfg_of([*ov, f"checkpoint={ckpt}", f"output_dir={tmp_path / name}"]))
        rec = read_record(next((tmp_path / name).rglob("result.json")))
        assert rec.kind == "evaluated" and rec.checkpoint == "official" and not rec.counts_as_reproduction
    assert metrics["release"] == metrics["converted"]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_record(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m ske2grid.train` (gloo, CPU): the global batch of 8 is split 4 + 4, so the
    16 training clips still make 2 optimiser steps; rank 0 alone reports the run's test."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OSVAI_TRACEBACK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ske2grid.train",
           "experiment=ske2grid_d5_ntu60_xsub_hrnet", *tiny(tmp_path), f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = read_record(run_dir / "result.json")
    assert record.kind == "trained" and record.metrics["steps"] == 2.0 and record.extra["test_clips"] == 2
    assert 0.0 <= record.metrics["top1"] <= 100.0
    assert proc.stdout.count("2-clip test top1=") == 1  # one test report: rank 0's


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = ["experiment=stgcn_ntu60_xsub_hrnet", *tiny(tmp_path), "trainer.epochs=40", f"hydra.run.dir={run_dir}"]
    sigterm_then_resume("ske2grid.train", args, run_dir, resume_args=("trainer.epochs=1",))
    assert json.loads((run_dir / "result.json").read_text())["kind"] == "trained"


def _pickle(path: Path, data: object) -> Path:
    path.write_bytes(pickle.dumps(data))
    return path


def _ann(label: int = 0, v: int = 17, score: bool = True) -> dict:
    a = {"frame_dir": "a", "label": label, "total_frames": 5, "img_shape": (1080, 1920),
         "keypoint": np.zeros((1, 5, v, 2), np.float32)}
    if score:
        a["keypoint_score"] = np.ones((1, 5, v), np.float32)
    return a


BAD_PICKLES = [
    ("missing.pkl", None, "not found"),
    ("nosplit.pkl", {"annotations": []}, "'split'"),
    ("wrongsplit.pkl", {"split": {"train": ["a"]}, "annotations": [_ann()]}, "present splits: train"),
    ("joints.pkl", {"split": {"xsub_train": ["a"]}, "annotations": [_ann(v=25)]}, "V=25"),
    ("noscore.pkl", {"split": {"xsub_train": ["a"]}, "annotations": [_ann(score=False)]}, "keypoint_score"),
    ("label.pkl", {"split": {"xsub_train": ["a"]}, "annotations": [_ann(label=60)]}, r"outside \[0, 60\)"),
]


@pytest.mark.parametrize("name,content,message", BAD_PICKLES, ids=[b[0] for b in BAD_PICKLES])
def test_bad_pickles_are_one_line_errors_naming_the_file(tmp_path: Path, name: str, content: object,
                                                         message: str) -> None:
    path = tmp_path / name if content is None else _pickle(tmp_path / name, content)
    out = tmp_path / "out"
    cfg = cfg_of(["experiment=ske2grid_d5_ntu60_xsub_hrnet", f"data.ann_file={path}", f"data.root={tmp_path}",
                  f"output_dir={out}"])
    with pytest.raises(UserError, match=message) as err:
        s2g_train.run(cfg, out / "run", [])
    assert str(path) in str(err.value) and "§f" in str(err.value) and "\n" not in str(err.value)
    assert not (out / "run").exists()  # nothing written before the data is validated


@pytest.mark.parametrize("args,message", [
    (["experiment=ske2grid_d5_ntu60_xsub_hrnet"], "data.root is not set"),
    (["experiment=ske2grid_d5_ntu60_xsub_hrnet", "model.gridd=[5,5]"], "model.gridd"),
    (["experiment=ske2grid_d5_ntu60_xsub_hrnet", "profile=smoke", "model.grid_shape=[4,4]"], "model."),
    (["experiment=ske2grid_d5_ntu60_xsub_hrnet", "profile=smoke", "trainer.selection=released"], "trainer.selection"),
])
def test_bad_config_is_one_line_error(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_module("ske2grid.train", *args, f"hydra.run.dir={tmp_path / 'run'}", f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_key_in_an_experiment_file_is_rejected() -> None:
    cfg = cfg_of(["experiment=ske2grid_d5_ntu60_xsub_hrnet"])
    with pytest.raises(UserError, match="model.grid"):
        from omegaconf import OmegaConf

        OmegaConf.set_struct(cfg, False)
        cfg.model.grid = [5, 5]
        s2g_train.validate_config(cfg)


def test_pls_parent_of_the_wrong_grid_names_the_file(tmp_path: Path) -> None:
    ov = tiny(tmp_path, "experiment=ske2grid_d5_ntu60_xsub_hrnet")
    s2g_train.run(cfg_of(ov), tmp_path / "d5", ov)
    ov8 = tiny(tmp_path, "experiment=ske2grid_d8_pls_ntu60_xsub_hrnet",
               f"method.parent_checkpoint={tmp_path / 'd5' / 'best.pt'}")
    with pytest.raises(UserError, match=r"d5/best.pt has 1 stage\(s\) ending at 5x5.*7x7 \(spec §b.4\)"):
        s2g_train.run(cfg_of(ov8), tmp_path / "d8", ov8)
    assert not (tmp_path / "d8").exists()


def test_smoke_floor_check_fails_below_twice_chance_and_on_a_moved_stage0(tmp_path: Path) -> None:
    from common.reproduce import Finished, Run
    from ske2grid.reproduce import check_floor

    parent, child = tmp_path / "d5", tmp_path / "d6"
    parent.mkdir(), child.mkdir()
    state = {"model.ske2grid.stages.0.git.theta": torch.rand(25, 25), "model.blocks.0.grid_conv.weight": torch.ones(1)}
    torch.save({"model": state}, parent / "best.pt")
    torch.save({"model": {**state, "model.blocks.0.grid_conv.weight": torch.zeros(1)}}, child / "last.pt")
    (child / "result.json").write_text(json.dumps({"extra": {"parent_checkpoint": str(parent / "best.pt")}}))
    runs = [Finished(Run("d5", []), parent, 1.0, {"top1": 24.9}), Finished(Run("d6", []), child, 1.0, {"top1": 25.0})]
    assert check_floor(runs) == ["d5: 10-clip top-1 24.90 < 25.0 (2x chance)"]  # stage 0 unchanged: fine
    moved = {**state, "model.ske2grid.stages.0.git.theta": state["model.ske2grid.stages.0.git.theta"] + 1e-7}
    torch.save({"model": moved}, child / "last.pt")
    assert any("stage-0" in f for f in check_floor(runs[1:]))
