"""afdcd.train end to end on the common loop (smoke sizes): the Af-DCD losses, the loss module outside the
student checkpoint, SIGTERM -> 143 -> exact resume, and the promised one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afdcd.convert import to_official
from afdcd.models import create_model
from afdcd.train import CONFIG_DIR, run
from common.checkpoint import load_checkpoint
from common.config import compose
from common.errors import UserError
from common.results import read_record

REPO = Path(__file__).resolve().parents[2]
TINY = ["profile=smoke", "data.synthetic_images=[32,4]", "data.synthetic_size=[40,40]", "data.crop=[32,32]",
        "trainer.workers=0", "trainer.log_every=1"]


def _teacher(tmp_path: Path) -> Path:
    """An official-format small teacher (DeepLabV3-R18 at 1/4 width, 5 classes)."""
    torch.manual_seed(1)
    net = create_model("deeplabv3_resnet18", 5, width=0.25)
    path = tmp_path / "teacher.pth"
    torch.save(dict(to_official(net.state_dict(), net)), path)
    return path


def _afdcd(tmp_path: Path, teacher: Path) -> list[str]:
    # 32x32 crops -> 4x4 maps: one 4x4 patch, unpooled (the smoke profile's pool 0)
    return ["experiment=cityscapes_deeplabv3_resnet18_afdcd_randmask", *TINY, "model.teacher=deeplabv3_resnet18",
            f"model.teacher_checkpoint={teacher}", f"output_dir={tmp_path}"]


def test_afdcd_run_trains_every_term_and_saves_the_student_only(tmp_path: Path) -> None:
    cfg = compose(CONFIG_DIR, [*_afdcd(tmp_path, _teacher(tmp_path)), "trainer.iterations=3",
                               "trainer.eval_every_steps=2"])
    metrics, out = run(cfg)
    rec = read_record(out / "result.json")
    assert rec.complete and rec.profile == "smoke" and rec.data == "synthetic" and metrics["steps"] == 3
    assert {"mIoU", "last_mIoU", "pixAcc"} <= set(metrics)
    assert {"teacher_mIoU", "majority_mIoU", "params_loss_module"} <= set(rec.extra)
    logged = (out / "metrics.jsonl").read_text()
    for name in ("loss_ce", "loss_aux", "loss_kd", "loss_fm", "loss_ctr"):
        assert name in logged
    best = load_checkpoint(out / "best.pt")["model"]
    assert best and not any(k.startswith(("loss_module", "teacher", "student.")) for k in best)


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = [*_afdcd(tmp_path, _teacher(tmp_path)), "trainer.iterations=400", f"hydra.run.dir={run_dir}"]
    sigterm_then_resume("afdcd.train", args, run_dir, resume_args=("trainer.iterations=3",))
    assert read_record(run_dir / "result.json").complete


@pytest.mark.parametrize("over,match", [
    (["data.root=/nonexistent/cityscapes", "data.synthetic=false"], "/nonexistent/cityscapes"),
    (["data.root=null"], "data.root is not set"),
    (["model.teacher_checkpoint=null"], "model.teacher_checkpoint is not set"),
    (["+trainer.iterationz=3"], "iterationz"),
    (["task=infer"], "task='infer'"),
])
def test_bad_inputs_are_one_line_errors(tmp_path: Path, over: list[str], match: str) -> None:
    argv = [*_afdcd(tmp_path, _teacher(tmp_path)), *over]
    with pytest.raises(UserError, match=match) as err:
        run(compose(CONFIG_DIR, argv))
    assert "\n" not in str(err.value)


def test_wrong_teacher_class_count_is_refused_before_any_write(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("deeplabv3_resnet18", 7, width=0.25)
    path = tmp_path / "t7.pth"
    torch.save(dict(to_official(net.state_dict(), net)), path)
    out = tmp_path / "outs"
    proc = subprocess.run([sys.executable, "-m", "afdcd.train", *_afdcd(out, path)], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "has 7 classes, but the dataset has 5" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    written = [p.name for p in (out / "afdcd").rglob("*") if p.is_file() and ".hydra" not in p.parts]
    assert not [n for n in written if n.endswith(".pt") or n in ("config.yaml", "result.json")], written


def test_mobilenetv2_row_smoke_trains_at_its_smoke_width(tmp_path: Path) -> None:
    """The MBV2 row runs under profile=smoke too (1/8 width: c4 = 40 channels, M = 8 groups of 5)."""
    argv = ["experiment=cityscapes_deeplabv3_mobilenetv2_afdcd", *TINY, "model.teacher=deeplabv3_resnet18",
            f"model.teacher_checkpoint={_teacher(tmp_path)}", f"output_dir={tmp_path}", "trainer.iterations=2",
            "trainer.eval_every_steps=2"]
    metrics, out = run(compose(CONFIG_DIR, argv))
    assert read_record(out / "result.json").complete and metrics["steps"] == 2
    best = load_checkpoint(out / "best.pt")["model"]
    assert best["head.aspp.b0.0.weight"].shape[1] == 40
