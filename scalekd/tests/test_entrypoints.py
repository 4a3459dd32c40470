"""Entry points: convert -> eval round trip, SIGTERM -> 143 -> exact resume, and one test per bad-input message."""

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
from common.results import read_record
from common.testing import REPO_ROOT
from scalekd import eval as skd_eval
from scalekd import train as skd_train
from scalekd.convert import main as convert_main
from scalekd.models import create_teacher
from scalekd.tests.smoke_models import CAPS, STUDENT, TEACHER, TINY_DATA
from scalekd.train import CONFIG_DIR, build_student, parse

ROW = ["experiment=swinl_resnet50", "profile=smoke", *TEACHER, *STUDENT, *CAPS, *TINY_DATA]


def _overrides(tmp: Path, *more: str) -> list[str]:
    return [*ROW, f"output_dir={tmp / 'out'}", f"data.root={tmp / 'data'}", *more]


def _teacher_file(tmp: Path, **kwargs: object) -> Path:
    """A small Swin teacher saved as one of our runs' best.pt ({"model": state_dict, "metrics": ...})."""
    cfg = compose(CONFIG_DIR, _overrides(tmp))
    teacher = create_teacher("swin", num_classes=10, **{**dict(cfg.model.teacher_kwargs), **kwargs})
    path = tmp / "teacher_best.pt"
    torch.save({"model": teacher.state_dict(), "epoch": 1, "metrics": {"top1": 10.0}}, path)
    return path


def test_scalekd_convert_eval_roundtrip(tmp_path: Path) -> None:
    """An official mmengine distillation file (student.backbone.* / head.fc.*, teacher, CAPs, dead linear,
    numpy meta) -> python -m scalekd.convert -> scalekd.eval: the same student and the same metrics."""
    overrides = _overrides(tmp_path)
    student = build_student(parse(compose(CONFIG_DIR, overrides)))
    ours = student.state_dict()
    official = {("student.head." + k) if k.startswith("fc.") else f"student.backbone.{k}": v.clone()
                for k, v in ours.items()}
    official |= {"teacher.backbone.patch_embed.projection.weight": torch.zeros(32, 3, 2, 2),
                 "distill_losses.loss_fmd_s3.projector_0.pos_embed": torch.zeros(1, 128, 4, 4),
                 "linear.weight": torch.zeros(4, 4)}
    release = tmp_path / "swin-l_distill_res50_official.pth"
    torch.save({"meta": {"epoch": np.int64(300), "mmcls_version": "1.0.0rc6"}, "state_dict": official}, release)

    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), *overrides])
    saved = torch.load(converted, map_location="cpu", weights_only=True)
    assert saved["origin"] == "official" and saved.keys() >= {"state_dict", "paper", "source"}
    assert saved["state_dict"].keys() == ours.keys()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in ours.items())

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        metrics[name] = skd_eval.run(compose(CONFIG_DIR, [*overrides, f"checkpoint={ckpt}",
                                                          f"output_dir={tmp_path / name}"]))
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
    assert metrics["release"] == metrics["converted"]


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = [*_overrides(tmp_path, f"model.teacher_checkpoint={_teacher_file(tmp_path)}"), "trainer.epochs=50",
            f"hydra.run.dir={run_dir}", "trainer.log_every=1"]
    sigterm_then_resume("scalekd.train", args, run_dir, resume_args=("trainer.epochs=1",))
    record = json.loads((run_dir / "result.json").read_text())
    assert record["kind"] == "trained" and record["extra"]["viewed_samples"] == record["metrics"]["steps"] * 4


@pytest.mark.slow
def test_torchrun_two_processes_scalekd_smoke(tmp_path: Path) -> None:
    """The documented 2-process run: torchrun (gloo, CPU) trains the ScaleKD smoke student for an epoch; one
    result.json (rank 0) with the global batch's viewed samples and the teacher checked on the sharded eval."""
    run_dir = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "OSVAI_TRACEBACK")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalekd.train",
           *_overrides(tmp_path, f"model.teacher_checkpoint={_teacher_file(tmp_path)}", "trainer.epochs=1",
                       "trainer.device=cpu", f"hydra.run.dir={run_dir}")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    record = json.loads((run_dir / "result.json").read_text())
    assert record["kind"] == "trained" and record["extra"]["method"] == "scalekd"
    assert record["extra"]["global_batch"] == 4 and record["metrics"]["steps"] == 5  # 20 images / global batch 4
    assert record["extra"]["viewed_samples"] == 20 and "teacher_top1" in record["extra"]
    assert out.count("viewed samples: 20 ") == 1  # printed by rank 0 only


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the path / key and what was expected; nothing written
# ---------------------------------------------------------------------------------------------------


def _run_train(tmp: Path, *more: str) -> None:
    skd_train.run(compose(CONFIG_DIR, _overrides(tmp, *more)))


def test_bad_input_missing_imagenet_root_exits_2_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_imagenet"
    cmd = [sys.executable, "-m", "scalekd.train", "experiment=swinl_resnet50", f"data.root={missing}",
           "model.teacher_checkpoint=swin_l.pth", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(missing) in result.stderr and "{train,val}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list((tmp_path / "run").rglob("*.pt")) and not (tmp_path / "run" / "result.json").exists()


def test_bad_input_malformed_imagenet_root(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    (root / "training").mkdir(parents=True)
    with pytest.raises(UserError, match=r"train does not exist \(folders present: \['training'\]\)"):
        skd_train.run(compose(CONFIG_DIR, ["experiment=swinl_resnet50", f"data.root={root}",
                                           "model.teacher_checkpoint=x.pth", f"output_dir={tmp_path / 'o'}"]))
    assert not (tmp_path / "o").exists()


def test_bad_input_teacher_checkpoint_absent(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"checkpoint .*nope\.pth does not exist"):
        _run_train(tmp_path, f"model.teacher_checkpoint={tmp_path / 'nope.pth'}")
    assert not (tmp_path / "out").exists()


def test_bad_input_teacher_of_another_architecture_names_the_key_and_shapes(tmp_path: Path) -> None:
    wrong = _teacher_file(tmp_path, embed_dim=48, num_heads=[2, 4, 8, 16])  # a wider Swin than the row's
    with pytest.raises(UserError) as err:
        _run_train(tmp_path, f"model.teacher_checkpoint={wrong}")
    msg = str(err.value)
    assert "does not fit the model" in msg and "patch_embed.proj.weight (48, 3, 2, 2) vs model (32, 3, 2, 2)" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_bad_input_unknown_config_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config method\.s3\.heads"):
        compose(CONFIG_DIR, [*_overrides(tmp_path), "method.s3.heads=3"])
    cfg = compose(CONFIG_DIR, _overrides(tmp_path))
    cfg.model._set_flag("struct", False)
    cfg.model.teacher_ckpt = "x.pth"  # a typo inside an experiment file
    with pytest.raises(UserError, match=r"config model\.teacher_ckpt"):
        parse(cfg)


def test_bad_input_cap_grid_differs_from_teacher_grid(tmp_path: Path) -> None:
    """The smoke student's S3 is 4x4, the teacher's stage-3 grid 8x8: only the v1 CAP maps one onto the other."""
    with pytest.raises(UserError, match=r"CAP grid 8x8 \(teacher\) != student S3 grid 4x4 with cap_variant=v2"):
        _run_train(tmp_path, f"model.teacher_checkpoint={_teacher_file(tmp_path)}", "method.cap_variant=v2")
