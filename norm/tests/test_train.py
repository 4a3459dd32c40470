"""End to end through the real entry point (a few steps, then resume), recipes, and bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common.config import ScheduleConfig, compose, validate
from common.engine import build_scheduler
from common.errors import UserError
from common.testing import fixture_dir
from norm.models import create_model
from norm.schedules import official_lr
from norm.train import CONFIG_DIR, parse, run

REPO = Path(__file__).resolve().parents[2]
ROWS = yaml.safe_load((REPO / "norm" / "paper.yaml").read_text())["rows"]
TINY = ["profile=smoke", "data.train_per_class=4", "data.test_per_class=2", "data.image_size=16",
        "trainer.global_batch=8"]


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "norm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_smoke_entry_point_trains_resumes_and_deploys(tmp_path: Path) -> None:
    args = ["experiment=cifar100_resnet56_resnet20", *TINY, f"output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    first = _train([*args, "trainer.max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "run" / "teacher" / "best.pt").is_file()  # no teacher checkpoint: trained first
    second = _train([*args, "trainer.max_steps=3"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["row"] == "cifar100_resnet56_resnet20" and result["profile"] == "smoke"
    assert result["metrics"]["steps"] == 3 and "teacher_top1" in result["extra"]
    assert result["kind"] == "trained" and result["data"] == "synthetic" and result["complete"] is False
    assert result["extra"]["params_deployed"] == sum(p.numel() for p in create_model("resnet20", 10).parameters())
    plain = create_model("resnet20", 10)
    plain.load_state_dict(torch.load(tmp_path / "run" / "deployed.pt", weights_only=True))
    # norm.eval: accuracy before and after folding agree, and the export is the plain network
    from norm.eval import run as evaluate_run

    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20", *TINY, f"output_dir={tmp_path}",
                               f"checkpoint={tmp_path / 'run' / 'best.pt'}", f"export={tmp_path / 'dep.pt'}"])
    metrics = evaluate_run(cfg)
    assert metrics["top1_folded"] == metrics["top1_unfolded"]
    # after 3 steps the eval-mode logits are huge (BN statistics barely moved): compare relatively
    assert metrics["loss_folded"] == pytest.approx(metrics["loss_unfolded"], rel=1e-4, abs=1e-4)
    plain.load_state_dict(torch.load(tmp_path / "dep.pt", weights_only=True))


def test_every_row_has_an_experiment_with_the_paper_recipe() -> None:
    for row in ROWS:
        cfg = compose(CONFIG_DIR, [f"experiment={row['id']}"])
        r = parse(cfg)
        assert cfg.row == row["id"]
        if row["role"] == "teacher":
            assert (r.method.name, r.model.student, r.trainer.epochs) == ("ce", row["model"], 240)
            assert list(r.schedule.milestones) == [150, 180, 210]
        elif row["id"].startswith("cifar100"):
            assert (r.model.student, r.model.teacher, r.method.n) == (row["student"], row["teacher"], row["N"])
            assert (r.trainer.epochs, r.trainer.global_batch, r.optim.weight_decay) == (241, 64, 5e-4)
            assert r.optim.lr == (0.01 if row["student"] in ("mobilenetv2", "shufflev1", "shufflev2") else 0.05)
            assert create_model(row["teacher"], 100).num_features == row["teacher_channels"]
        else:
            assert (r.trainer.epochs, r.trainer.global_batch, r.optim.lr, r.optim.weight_decay) == (101, 256, 0.1,
                                                                                                 1e-4)
            assert r.data.name == "imagenet" and r.method.multiplier.reference_epochs == 101


def _lr_per_epoch(schedule: str, epochs: int, lr: float) -> list[float]:
    sched_cfg = validate(compose(CONFIG_DIR, [f"schedule={schedule}"]).schedule, ScheduleConfig)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, sched_cfg, epochs, steps_per_epoch=10)
    out = []
    for e in range(epochs):
        sched.step(e)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_lr_schedules_match_the_official_ones() -> None:
    ours = _lr_per_epoch("cifar_student", 241, 0.05)
    assert ours == pytest.approx([official_lr(e, 0.05, "step", 240, (150, 180, 210)) for e in range(241)])
    teacher = _lr_per_epoch("cifar_teacher", 240, 0.05)  # official epochs 1..240 = ours 0..239
    assert teacher == pytest.approx([official_lr(e + 1, 0.05, "step", 240, (150, 180, 210)) for e in range(240)])
    cos = _lr_per_epoch("imagenet_cosine", 101, 0.1)
    official = [official_lr(e, 0.1, "cos", 100, iters_per_epoch=5005) for e in range(101)]
    assert max(abs(a - b) for a, b in zip(cos, official)) < 0.0017  # documented in schedule/imagenet_cosine
    path = fixture_dir("norm") / "schedules.pt"
    if path.is_file():
        assert ours == pytest.approx(torch.load(path, weights_only=True)["lr_cifar_step_0.05"])


@pytest.mark.parametrize("override, message", [
    (["data.root=null", "profile=full"], "data.root is not set"),
    (["method.n=0"], "method.n=0"),
    (["method.ce_weight=abc"], "method.ce_weight"),
    (["model.student=resnet19"], "model.student='resnet19'"),
    (["data.name=svhn"], "data.name='svhn'"),
])
def test_bad_config_is_a_one_line_error(override: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20", f"output_dir={tmp_path}", *override])
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        run(cfg)
    assert "\n" not in str(err.value)


def test_missing_teacher_and_wrong_dataset_path(tmp_path: Path) -> None:
    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20", "data=synthetic_cifar",
                               "data.train_per_class=2", "data.test_per_class=1", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="model.teacher_checkpoint is not set"):
        run(cfg)
    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20", f"data.root={tmp_path / 'nope'}",
                               f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        run(cfg)
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"\x80\x02garbage")
    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20", *TINY, f"model.teacher_checkpoint={bad}",
                               f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="corrupt"):
        run(cfg)


def test_official_cosine_formula() -> None:
    assert official_lr(0, 0.1, "cos", 100, iters_per_epoch=5005) == 0.1
    assert math.isclose(official_lr(50, 0.1, "cos", 100, iters_per_epoch=1), 0.05 * (1 + math.cos(math.pi)))


def test_reproduce_full_mode_runs_a_row_with_a_released_teacher(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from common.data import write_synthetic_cifar
    from norm.reproduce import main as reproduce

    root = write_synthetic_cifar(tmp_path / "cifar", 100, train_per_class=1, test_per_class=1)
    (tmp_path / "teachers" / "resnet56_vanilla").mkdir(parents=True)
    torch.save({"model": create_model("resnet56", 100).state_dict(), "epoch": 240},  # RepDistiller layout
               tmp_path / "teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth")
    reproduce([f"data.root={root}", f"teacher_dir={tmp_path / 'teachers'}", "rows=cifar100_resnet56_resnet20",
               f"output_dir={tmp_path / 'out'}", "trainer.epochs=1",
               "trainer.max_steps=1", "trainer.global_batch=16", "trainer.workers=0", "trainer.log_every=1"])
    out = capsys.readouterr().out
    assert "| cifar100_resnet56_resnet20 | top1 | 71.35 |" in out  # the paper-vs-ours table
    result = json.loads(next((tmp_path / "out").rglob("result.json")).read_text())
    assert result["profile"] == "full" and result["row"] == "cifar100_resnet56_resnet20"
    assert result["kind"] == "trained" and not result["complete"]  # cut short by max_steps: never "ours"


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = ["experiment=cifar100_teacher_resnet56", *TINY, "trainer.epochs=50", "trainer.log_every=1",
            f"output_dir={tmp_path}", f"hydra.run.dir={run_dir}"]
    sigterm_then_resume("norm.train", args, run_dir, resume_args=("trainer.epochs=1",))
