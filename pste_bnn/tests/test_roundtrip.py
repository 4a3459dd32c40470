"""convert -> eval round trip: an official-format SNN step-2 checkpoint (`module.` names, patterns without the
quantizer's memory / step buffers, optimizer and epoch beside it, as `train.py::save_checkpoint`) goes through
`python -m pste_bnn.convert` and `pste_bnn.eval` gives the same numbers as evaluating the release directly; the
records say the weights are official; the export scores like the latent network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import compose
from common.errors import UserError
from common.results import read_record
from pste_bnn.config import build_network, parse
from pste_bnn.convert import main as convert_main
from pste_bnn.eval import run as eval_run
from pste_bnn.train import CONFIG_DIR

TINY = ["profile=smoke", "method=snn", "method.tau=3", "data.train_per_class=1", "data.test_per_class=4"]


def test_pste_convert_eval_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}"])
    net = build_network(*parse(cfg))
    with torch.no_grad():
        for _, conv in net.binary_convs():
            conv.weight.normal_(0, 0.05)
    official = {f"module.{k}": v.clone() for k, v in net.state_dict().items()
                if not k.endswith(("binarize.memory", "binarize.step"))}
    release = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 256, "state_dict": official, "best_top1_acc": np.float64(62.1),
                "optimizer": {"state": {}, "param_groups": []}}, release)

    converted = tmp_path / "converted.pt"
    convert_main([str(release), str(converted), *TINY, f"output_dir={tmp_path}"])
    saved = torch.load(converted, map_location="cpu", weights_only=True)
    assert saved["origin"] == "official" and saved["tau"] == 3
    for k, v in net.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k

    metrics = {}
    for name, ckpt in (("release", release), ("converted", converted)):
        run_cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path / name}", f"checkpoint={ckpt}",
                                       f"export={tmp_path / name / 'export.pt'}"])
        metrics[name] = eval_run(run_cfg)
        record = read_record(next((tmp_path / name).rglob("result.json")))
        assert record.kind == "evaluated" and record.checkpoint == "official" and record.data == "synthetic"
        assert record.extra["accounting"]["tau"] == 3
    assert metrics["release"] == metrics["converted"]
    assert metrics["release"]["top1_export"] == metrics["release"]["top1"]
    export = torch.load(tmp_path / "release" / "export.pt", weights_only=True)
    assert all(layer["ids"].numel() == 8 for layer in export["layers"].values())


def test_convert_refuses_another_tau_and_bad_usage(tmp_path: Path) -> None:
    cfg = compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}"])
    net = build_network(*parse(cfg))
    release = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, release)
    with pytest.raises(SystemExit) as err:
        convert_main([str(release), str(tmp_path / "out.pt"), "profile=smoke", "method=snn", "method.tau=4"])
    assert err.value.code == 2 and not (tmp_path / "out.pt").exists()
    with pytest.raises(UserError, match="tau=3"):
        from pste_bnn.convert import convert_file

        convert_file(release, tmp_path / "out.pt", ["profile=smoke", "method=snn", "method.tau=4"])
    with pytest.raises(SystemExit):
        convert_main([str(release)])
