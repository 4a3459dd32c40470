"""convert -> eval round trip: an official-format release (our model's weights under the official key names,
pickled with numpy scalars and an argparse namespace as official training scripts do) goes through
``python -m kernelwarehouse.convert`` and ``kernelwarehouse.eval`` gives the same numbers as evaluating the
release directly; the result records say the weights are official."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from common.config import validate
from common.results import read_record
from kernelwarehouse import eval as kw_eval
from kernelwarehouse.convert import checkpoint_filter_fn, compose_config
from kernelwarehouse.convert import main as convert_main
from kernelwarehouse.train import DataConfig, MethodConfig, ModelConfig, build_model
from kernelwarehouse.warehouse import KWLinear

SMALL = ["experiment=kw1x_resnet18", "profile=smoke", "data.train_per_class=1", "data.val_per_class=2",
         "trainer.max_device_batch=8"]


def official_names(model: torch.nn.Module) -> dict[str, str]:
    """Our key -> the official one (torchvision ResNet names; a KW linear layer wraps a KWConv1d as ``.conv``)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, KWLinear)]
    out = {}
    for key in model.state_dict():
        if key.endswith("warehouse_manager.temperature"):
            continue  # ours only: the official files carry no tau
        new = key
        for path in linear:
            new = re.sub(rf"^{re.escape(path)}\.(attention\.|bias$)", rf"{path}.conv.\1", new)
        out[key] = new
    return out


def test_kernelwarehouse_convert_eval_roundtrip(tmp_path: Path) -> None:
    overrides = [*SMALL, f"output_dir={tmp_path / 'out'}", f"data.root={tmp_path / 'data'}"]
    cfg = compose_config(overrides)
    model = build_model(validate(cfg.model, ModelConfig, "model."), validate(cfg.data, DataConfig, "data."),
                        validate(cfg.method, MethodConfig, "method."))
    names = official_names(model)
    official = {names[k]: v.clone() for k, v in model.state_dict().items() if k in names}
    assert checkpoint_filter_fn(official, model).keys() == set(names)  # pure: official names -> ours
    release = tmp_path / "kw1x_resnet18_official.pth"
    torch.save({"model": official, "epoch": np.int64(299), "max_accuracy": np.float64(73.67),
                "args": argparse.Namespace(model="kw_resnet18")}, release)

    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), *overrides])
    saved = torch.load(converted, map_location="cpu", weights_only=True)  # our format: weights_only reads it
    assert saved["origin"] == "official"
    model.warehouse_manager.set_temperature(0.0)
    for k, v in model.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        metrics[name] = kw_eval.run(compose_config([*overrides, f"checkpoint={ckpt}",
                                                    f"output_dir={tmp_path / name}"]))
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
        assert not record.counts_as_reproduction
    assert metrics["release"] == metrics["converted"]
