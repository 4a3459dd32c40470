"""convert -> eval round trip: a Fast-Datafree-format student release (`{'state_dict': ..., 'best_acc': ...}` as
its train script saves it) goes through `python -m ssdkd.convert`, and `ssdkd.eval` gives the same numbers on the
release and on the converted file; both records say the weights are official and the data synthetic. Our own
`last.pt` (the whole distiller) evaluates as its student part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import compose
from common.errors import UserError
from common.results import read_record
from ssdkd.convert import main as convert_main
from ssdkd.eval import run as eval_run
from ssdkd.models import create_model
from ssdkd.train import CONFIG_DIR

TINY = ["experiment=cifar10_wrn40_2_wrn16_1_ssdkd", "profile=smoke", "data.train_per_class=1", "data.test_per_class=3",
        "model.student=wrn16_1"]


def test_ssdkd_convert_eval_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = create_model("wrn16_1", 10).eval()
    release = tmp_path / "cifar10-wrn16_1-fast.pth"
    torch.save({"epoch": 220, "arch": "wrn16_1", "best_acc": np.float64(0.9),
                "state_dict": {f"module.{k}": v.clone() for k, v in student.state_dict().items()}}, release)
    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), "--arch", "wrn16_1", "--classes", "10", "--role", "student"])
    saved = torch.load(converted, map_location="cpu", weights_only=True)
    assert saved["origin"] == "official" and saved["paper"] == "ssdkd"
    for k, v in student.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path / name}", f"checkpoint={ckpt}"])
        metrics[name] = eval_run(cfg)
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
    assert metrics["release"] == metrics["converted"]

    ours = tmp_path / "last.pt"  # our run's last.pt holds the distiller: student.*, teacher.*, extra state
    teacher = create_model("resnet8", 10)
    torch.save({"model": {**{f"student.{k}": v for k, v in student.state_dict().items()},
                          **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}},
                "global_step": 3, "epoch": 1}, ours)
    cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path / 'ours'}", f"checkpoint={ours}"])
    assert eval_run(cfg) == metrics["release"]
    assert read_record(next((tmp_path / "ours").rglob("result.json"))).checkpoint == "ours"


def test_convert_names_a_wrong_architecture_and_class_count(tmp_path: Path) -> None:
    release = tmp_path / "t.pth"
    torch.save({"state_dict": create_model("wrn16_1", 100).state_dict()}, release)
    with pytest.raises(UserError, match="100 classes, expected 10"):
        convert_main([str(release), str(tmp_path / "o.pt"), "--arch", "wrn16_1", "--classes", "10"])
    with pytest.raises(UserError, match="expected resnet8, found wrn16_1"):
        convert_main([str(release), str(tmp_path / "o.pt"), "--arch", "resnet8", "--classes", "100"])
    assert not (tmp_path / "o.pt").exists()
