"""End-to-end: the real entry points on synthetic data in the real formats (a few steps, then resume), eval of the
produced checkpoint, the MS-COCO multi-label path, SIGTERM, and the one-line errors promised for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import compose
from common.errors import UserError
from noah import eval as noah_eval
from noah import train as noah_train
from noah.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
# ShuffleNetV2-0.5x (the official file's width) at 64 px: the cheapest CNN host on CPU
SMALL = ["model.name=shufflenetv2_050", "profile=smoke", "data.image_size=64", "trainer.global_batch=8",
         "trainer.max_device_batch=8", "trainer.log_every=1", "trainer.precise_bn_batches=1"]
NOAH_CNN = ["experiment=noah_shufflenetv2_100", *SMALL, "data.train_per_class=4", "data.val_per_class=2"]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OSVAI_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_smoke_then_resume_then_eval(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*NOAH_CNN, f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", f"output_dir={tmp_path / 'o'}"]
    first = run("noah.train", *common, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["global_step"] == 2

    second = run("noah.train", *common, "trainer.max_steps=4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["profile"] == "smoke" and result["metrics"]["steps"] == 4.0 and result["data"] == "synthetic"
    assert result["complete"] is False  # cut by max_steps

    evaluated = run("noah.eval", *common, f"checkpoint={run_dir / 'best.pt'}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "(ours checkpoint): loss=" in evaluated.stdout


def test_coco_multilabel_finetunes_from_imagenet_weights(tmp_path: Path) -> None:
    """The MS-COCO path in process: synthetic COCO-format data, ASL, NOAH on the host, started from another K's
    weights (head dropped; those come from a run with repeated augmentation), mAP and the random-score reference
    in the record."""
    pre = tmp_path / "pre"
    noah_train.run(compose(CONFIG_DIR, [*NOAH_CNN, f"data.root={tmp_path / 'img'}", f"output_dir={pre}",
                                        "trainer.max_steps=1", "recipe.repeated_aug=3"]))  # + DeiT's sampler
    ckpt = next(pre.rglob("last.pt"))
    out = tmp_path / "coco"
    metrics = noah_train.run(compose(CONFIG_DIR, [
        "experiment=coco_noah_resnet101", *SMALL, "data=synthetic_coco", f"data.root={tmp_path / 'coco_data'}",
        "data.train_images=16", "data.val_images=8", f"model.pretrained={ckpt}", f"output_dir={out}",
        "trainer.max_steps=2"]))
    assert {"mAP", "loss", "prevalence"} <= metrics.keys()
    assert 0.0 <= metrics["mAP"] <= 100.0 and 0.0 < metrics["prevalence"] <= 30.0
    record = json.loads(next(out.rglob("result.json")).read_text())
    assert record["dataset"] == "coco" and record["data"] == "synthetic"


def test_train_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = [*NOAH_CNN, "trainer.epochs=50", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
            f"output_dir={tmp_path / 'o'}"]
    sigterm_then_resume("noah.train", args, run_dir, resume_args=("trainer.epochs=1",))
    assert json.loads((run_dir / "result.json").read_text())["kind"] == "trained"


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_on_stderr_with_exit_2(tmp_path: Path) -> None:
    result = run("noah.train", "experiment=noah_resnet18", "data.root=/nonexistent/imagenet",
                 f"hydra.run.dir={tmp_path}", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "/nonexistent/imagenet" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("overrides,message", [
    (["experiment=noah_resnet18"], "data.root is not set"),
    (["experiment=noah_resnet18", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["experiment=coco_noah_resnet101", "data.root=/nonexistent/coco"], "/nonexistent/coco"),
    (["experiment=noah_resnet18", "trainer.epochz=3"], "epochz"),
    (["experiment=noah_resnet18", "method.head_nun=3"], "head_nun"),
    ([*NOAH_CNN, "method.head_num=3"], "multiples of head_num"),  # k = 256 into 3 groups (b.1)
    ([*NOAH_CNN, "method.key_ratio=1.5"], "key_ratio"),
    ([*NOAH_CNN, "method.loss=asl"], "method.loss='asl'"),
    (["experiment=noah_mixer_s16_224", "profile=smoke", "recipe.ema_evaluate=true"], "recipe.ema_evaluate"),
])
def test_train_bad_inputs_name_the_key_or_path(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        noah_train.run(compose(CONFIG_DIR, [*overrides, f"output_dir={tmp_path}"]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_malformed_imagenet_root_names_the_layout(tmp_path: Path) -> None:
    (tmp_path / "imagenet" / "train").mkdir(parents=True)  # no val/
    with pytest.raises(UserError, match="val"):
        noah_train.run(compose(CONFIG_DIR, ["experiment=noah_resnet18", f"data.root={tmp_path / 'imagenet'}",
                                            f"output_dir={tmp_path}"]))


def test_eval_checkpoints_absent_corrupt_or_of_another_architecture(tmp_path: Path) -> None:
    base = [*NOAH_CNN, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path}"]
    with pytest.raises(UserError, match="absent.pth does not exist"):
        noah_eval.run(compose(CONFIG_DIR, [*base, f"checkpoint={tmp_path / 'absent.pth'}"]))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth"):
        noah_eval.run(compose(CONFIG_DIR, [*base, f"checkpoint={bad}"]))
    from noah.models import create_model

    other = tmp_path / "other.pth"  # a NOAH ShuffleNetV2-1.0x release for the 0.5x row: shapes named
    torch.save({"state_dict": {"module." + k.removeprefix("backbone."): v for k, v in
                               create_model("shufflenetv2_100", num_classes=10).state_dict().items()},
                "epoch": 1, "best_acc": 0.0}, other)
    with pytest.raises(UserError, match=r"shape mismatch: .*vs model") as err:
        noah_eval.run(compose(CONFIG_DIR, [*base, f"checkpoint={other}"]))
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("result.json"))  # nothing written
