"""convert -> eval round trip: an official-format CNN release (``main.py``'s container: DDP ``module.`` keys, the
official head names, an optimizer state and numpy scalars) goes through ``python -m noah.convert`` and
``noah.eval`` gives the same numbers as evaluating the release directly; the records say the weights are
official. Fine-tuning the release to another class count drops the head keys with one log line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import compose, validate
from common.results import read_record
from noah import eval as noah_eval
from noah.convert import load_weights
from noah.convert import main as convert_main
from noah.train import CONFIG_DIR, DataConfig, MethodConfig, ModelConfig, build_model

SMALL = ["experiment=noah_shufflenetv2_100", "model.name=shufflenetv2_050", "profile=smoke", "data.image_size=64",
         "data.train_per_class=1", "data.val_per_class=2", "trainer.max_device_batch=8"]


def official_release(model: torch.nn.Module) -> dict:
    """Our weights under the official names (ShuffleNetV2 = torchvision keys, NOAH at ``head``), as main.py saves."""
    sd = {("module." + k[len("backbone."):] if k.startswith("backbone.") else "module." + k): v.clone()
          for k, v in model.state_dict().items()}
    return {"state_dict": sd, "epoch": np.int64(240), "acc": np.float64(70.7), "best_acc": np.float64(70.72),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.5, "momentum": 0.9}]}}


def test_noah_convert_eval_roundtrip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    overrides = [*SMALL, f"output_dir={tmp_path / 'out'}", f"data.root={tmp_path / 'data'}"]
    cfg = compose(CONFIG_DIR, overrides)
    build = (validate(cfg.model, ModelConfig, "model."), validate(cfg.data, DataConfig, "data."),
             validate(cfg.method, MethodConfig, "method."))
    model = build_model(*build)
    release = tmp_path / "model_best.pth.tar"
    torch.save(official_release(model), release)

    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), *overrides])
    saved = torch.load(converted, map_location="cpu", weights_only=True)  # our format: weights_only reads it
    assert saved["origin"] == "official" and saved["paper"] == "noah"
    assert saved["state_dict"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        metrics[name] = noah_eval.run(compose(CONFIG_DIR, [*overrides, f"checkpoint={ckpt}",
                                                           f"output_dir={tmp_path / name}"]))
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
        assert not record.counts_as_reproduction
    assert metrics["release"] == metrics["converted"] and 0.0 <= metrics["release"]["top1"] <= 100.0

    other = build_model(build[0], DataConfig(**{**vars(build[1]), "num_classes": 7}), build[2])
    fresh_head = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("head.")}
    with caplog.at_level(logging.WARNING, logger="noah.convert"):
        assert load_weights(other, release, finetune=True) == "official"
    assert "dropped 4 head keys" in caplog.text
    assert all(torch.equal(other.state_dict()[k], v) for k, v in fresh_head.items())  # head kept fresh
    assert torch.equal(other.state_dict()["backbone.conv5.0.weight"], model.state_dict()["backbone.conv5.0.weight"])
