"""convert -> eval round trip: a segmentation network saved under the official keys (a plain state dict, as the
release writes it) goes through ``python -m afdcd.convert`` and ``afdcd.eval`` and scores exactly what the
network itself scores on the same split; the records say the weights are official. Our own best.pt evaluates
as ours. The smoke profile's synthetic Cityscapes layout and 1/8-width network keep it to seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from afdcd.convert import main as convert_main
from afdcd.convert import to_official
from afdcd.eval import run as eval_run
from afdcd.models import create_model
from afdcd.train import CONFIG_DIR, build_sets, parse, prepare_data, segmentation_task
from common.config import compose
from common.dist import DistEnv
from common.engine import eval_loader
from common.errors import UserError
from common.results import read_record
from common.tasks import EvalContext

TINY = ["experiment=cityscapes_deeplabv3_resnet18_baseline", "profile=smoke", "data.synthetic_images=[16,6]",
        "data.synthetic_size=[40,56]", "trainer.workers=0"]


def _cfg(tmp_path: Path, *extra: str):
    return compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}", *extra])


def test_afdcd_convert_eval_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("deeplabv3_resnet18", 5, width=0.125).eval()
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    official = tmp_path / "kd_deeplabv3_resnet18_citys_best_model.pth"
    torch.save(dict(to_official(net.state_dict(), net)), official)
    converted = tmp_path / "converted.pt"
    convert_main([str(official), str(converted), "--model", "deeplabv3_resnet18", "--num-classes", "5"])

    cfg = _cfg(tmp_path, f"checkpoint={converted}")
    metrics, out = eval_run(cfg)
    record = read_record(out / "result.json")
    assert record.checkpoint == "official" and record.kind == "evaluated" and record.data == "synthetic"

    r = parse(cfg)
    env = DistEnv()
    prepare_data(r.data, env)
    _, eval_set, _ = build_sets(r.data, train=False)
    task = segmentation_task(r)
    want = task.evaluate(net, eval_loader(eval_set, 1, env, 0, task.collate), EvalContext(env))
    assert metrics == pytest.approx(want, abs=0)
    assert 0 < metrics["mIoU"] <= 100

    # the official file directly gives the same numbers
    direct, _ = eval_run(_cfg(tmp_path, f"checkpoint={official}"))
    assert direct == pytest.approx(want, abs=0)


def test_eval_refuses_another_architecture_or_class_count(tmp_path: Path) -> None:
    net = create_model("pspnet_resnet18", 5, width=0.125)
    path = tmp_path / "psp.pth"
    torch.save(dict(to_official(net.state_dict(), net)), path)
    with pytest.raises(UserError, match="pspnet_resnet18 model, but deeplabv3_resnet18"):
        eval_run(_cfg(tmp_path, f"checkpoint={path}"))
    with pytest.raises(UserError, match="has 5 classes, but the dataset has 4"):
        eval_run(_cfg(tmp_path, f"checkpoint={path}", "model.student=pspnet_resnet18", "data.num_classes=4",
                      "data.root=" + str(tmp_path / "data4")))
