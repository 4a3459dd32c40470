"""End to end through the real entry points on synthetic data: train a few steps, stop, resume to the
end (same weights as an uninterrupted run), evaluate the checkpoint, lift keypoints; bad inputs give
one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import compose
from common.errors import UserError
from gridconv.train import CONFIG_DIR, run

REPO = Path(__file__).resolve().parents[2]
TINY = ["profile=smoke", "data.train_frames=1", "data.test_frames=1", "trainer.epochs=1",
        "trainer.global_batch=50", "model.hidden_size=8", "trainer.log_every=5"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OSVAI_TRACEBACK"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gridconv_e2e")
    common = [*TINY, "experiment=hrnet_dgridconv_learnable", f"data.root={tmp / 'data'}", f"output_dir={tmp}"]
    whole, parts = tmp / "whole", tmp / "parts"
    first = cli("gridconv.train", *common, f"hydra.run.dir={parts}", "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (parts / "last.pt").is_file()  # cut short by max_steps: a record that says so
    assert json.loads((parts / "result.json").read_text())["complete"] is False
    second = cli("gridconv.train", *common, f"hydra.run.dir={parts}", "trainer.resume=auto")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    third = cli("gridconv.train", *common, f"hydra.run.dir={whole}", "trainer.resume=none")
    assert third.returncode == 0, third.stderr[-2000:]
    return {"whole": whole, "parts": parts, "tmp": tmp}


def test_train_stop_resume_equals_uninterrupted(runs: dict[str, Path]) -> None:
    a = torch.load(runs["whole"] / "last.pt", weights_only=True)
    b = torch.load(runs["parts"] / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] > 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert 1.0 < float(a["model"]["head.attention.temperature"]) < 30.0  # annealed, and saved
    result = json.loads((runs["parts"] / "result.json").read_text())
    assert result["profile"] == "smoke" and result["row"] == "hrnet_dgridconv_learnable"
    assert result["selection"] == "best_heldout" and np.isfinite(result["metrics"]["mpjpe"])
    assert result["kind"] == "trained" and result["data"] == "synthetic" and result["complete"]
    assert not result["extra"]["test_selected"] and len(result["extra"]["per_action_mpjpe"]) == 15
    whole = json.loads((runs["whole"] / "result.json").read_text())
    for key in ("metrics", "selection", "complete", "seed"):
        assert result[key] == whole[key], key
    commands = ("overrides", "recipe_overrides")  # the two runs were started with other command lines
    assert {k: v for k, v in result["extra"].items() if k not in commands} == {
        k: v for k, v in whole["extra"].items() if k not in commands}
    lines = (runs["parts"] / "metrics.jsonl").read_text().splitlines()
    assert any("heldout/mpjpe" in line and "temperature" in line for line in lines)


def test_eval_reproduces_training_result_and_infer_writes_outputs(runs: dict[str, Path]) -> None:
    tmp = runs["tmp"]
    result = json.loads((runs["parts"] / "result.json").read_text())
    ev = cli("gridconv.eval", *TINY, "experiment=hrnet_dgridconv_learnable", f"data.root={tmp / 'data'}",
             f"output_dir={tmp}", f"checkpoint={runs['parts'] / 'best.pt'}", f"hydra.run.dir={tmp / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    record = json.loads((tmp / "eval" / "result.json").read_text())
    assert record["kind"] == "evaluated" and record["checkpoint"] == "ours" and record["data"] == "synthetic"
    assert record["metrics"]["mpjpe"] == pytest.approx(result["metrics"]["mpjpe"], rel=1e-6)
    kps = np.random.default_rng(0).uniform(300, 700, (3, 17, 3))  # COCO x, y, score
    (tmp / "kps.json").write_text(json.dumps([{"keypoints": k.reshape(-1).tolist()} for k in kps]))
    inf = cli("gridconv.infer", str(tmp / "kps.json"), "--layout", "coco", "--checkpoint",
              str(runs["parts"] / "best.pt"), "--image-size", "1280", "720", "--out", str(tmp / "lifted"))
    assert inf.returncode == 0, inf.stderr[-2000:]
    poses = np.load(tmp / "lifted" / "poses3d.npy")
    assert poses.shape == (3, 17, 3) and np.isfinite(poses).all()
    assert (tmp / "lifted" / "skeleton.png").stat().st_size > 1000


def test_full_profile_on_synthetic_data_under_the_real_name_is_not_reported(runs: dict[str, Path]) -> None:
    """data=h36m profile=full pointed at the synthetic writer's folder: the record says synthetic, so the report
    never counts the run as reproduced (issue 8 item 2)."""
    from dataclasses import replace

    from common.results import read_record

    out = runs["tmp"] / "renamed"
    args = [a for a in TINY if a != "profile=smoke"]
    proc = cli("gridconv.train", *args, "experiment=hrnet_dgridconv_learnable", "data=h36m", "data.input=hrnet",
               f"data.root={runs['tmp'] / 'data'}", f"output_dir={runs['tmp']}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_record(out / "result.json")
    assert (record.dataset, record.profile, record.complete) == ("human36m", "full", True)
    assert record.data == "synthetic" and not record.counts_as_reproduction
    # the command line's overrides are kept, and those of the budget and batch marked as a changed recipe
    assert "trainer.epochs=1" in record.extra["overrides"] and "data=h36m" in record.extra["overrides"]
    assert record.extra["recipe_overrides"] == ["trainer.epochs=1", "trainer.global_batch=50"]
    assert not replace(record, data="real").counts_as_reproduction  # even on real data: not the paper's recipe
    assert replace(record, data="real", extra={}).counts_as_reproduction


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    res = cli("gridconv.train", *TINY, "model.sgt=fancy", f"output_dir={tmp_path}",
              f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "model.sgt" in err[0] and err[0].startswith("error:")


@pytest.mark.parametrize("overrides, message", [
    (["+model.bogus=1"], "model.bogus"),
    (["model.padding_mode=[c,x]"], "model.padding_mode"),
    (["trainer.selection=best_on_test"], "trainer.selection"),
    (["profile=full", "data.root=null"], "data.root is not set"),
    (["data.heldout_fraction=1.5"], "data.heldout_fraction"),
])
def test_bad_inputs_name_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.")):  # at compose time or at start-up
        run(compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}", *overrides]), tmp_path / "run")


def test_eval_needs_a_checkpoint(tmp_path: Path) -> None:
    from gridconv.eval import run as eval_run

    cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="checkpoint is not set"):
        eval_run(cfg)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}", f"checkpoint={bad}"])
    with pytest.raises(UserError, match="corrupt"):
        eval_run(cfg)


def test_sigterm_exits_143_saves_and_resume_finishes(tmp_path: Path) -> None:
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [*TINY, "experiment=gt_dgridconv_handcrafted", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path}",
            f"hydra.run.dir={run_dir}", "trainer.epochs=50", "trainer.log_every=1", "trainer.global_batch=20"]
    env = {k: v for k, v in os.environ.items() if k != "OSVAI_TRACEBACK"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gridconv.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["global_step"] >= 1 and saved["epoch"] < 50
    assert not (run_dir / "result.json").exists()
    again = cli("gridconv.train", *args, "trainer.epochs=1")
    assert again.returncode == 0 and (run_dir / "result.json").is_file(), again.stderr[-2000:]
