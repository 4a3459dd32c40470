"""convert -> eval round trip: an official-format NORM student (our weights under the official RepDistiller
names, with the unused official tensors, saved as the official script does) goes through
``python -m norm.convert`` and ``norm.eval`` gives the same numbers as evaluating the release directly; the
result records say the weights are official."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import compose
from common.results import read_record
from norm.convert import checkpoint_filter_fn
from norm.convert import main as convert_main
from norm.eval import run as eval_run
from norm.models import NORMStudent, create_model
from norm.train import CONFIG_DIR

TINY = ["experiment=cifar100_resnet32x4_resnet8x4", "profile=smoke", "data.train_per_class=1",
        "data.test_per_class=2", "data.image_size=16", "trainer.global_batch=8"]


def official_names(student: NORMStudent) -> dict[str, str]:
    """Our key -> the official one: backbone keys lose `net.`, the FT is `layer31` / `layer32` (spec b.6)."""
    out = {}
    for key in student.state_dict():
        out[key] = (key.replace("ft.expand.", "layer31.", 1).replace("ft.contract.", "layer32.", 1)
                    .removeprefix("net."))
    return out


def test_norm_convert_eval_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    c_t = create_model("resnet32x4", 10).num_features
    student = NORMStudent(create_model("resnet8x4", 10, norm_variant=True), c_t, 2).eval()
    names = official_names(student)
    official = {names[k]: v.clone() for k, v in student.state_dict().items()}
    official |= {"alpha": torch.ones(4), "layer21.0.weight": torch.ones(2, 2)}  # unused official tensors
    assert checkpoint_filter_fn(official, student).keys() == student.state_dict().keys()
    release = tmp_path / "S_resnet8x4_T_resnet32x4_best.pth"
    torch.save({"epoch": 240, "model": official, "best_acc": np.float64(76.1)}, release)

    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), "--arch", "resnet8x4", "--teacher-channels", str(c_t)])
    saved = torch.load(converted, map_location="cpu", weights_only=True)
    assert saved["origin"] == "official"
    for k, v in student.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path / name}", f"checkpoint={ckpt}"])
        metrics[name] = eval_run(cfg)
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
        assert not record.counts_as_reproduction
    assert metrics["release"] == metrics["converted"]
