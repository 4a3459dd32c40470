"""Every paper.yaml row has an experiment with the spec-d recipe; configs validate and build (meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from afdcd.config import build_distiller, check_data, check_method, check_model
from common.config import compose
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ROWS = {r["id"]: r for r in yaml.safe_load((ROOT / "paper.yaml").read_text())["rows"]}
LAMBDAS = {  # spec d table: (l_kd, l_fd, l_ctr, iterations)
    "cityscapes": (1.0, 2e-6, 5e-3, 40000), "voc": (1.0, 1e-6, 5e-3, 40000), "camvid": (1.0, 8e-6, 1e-2, 40000),
    "ade20k": (0.5, 1e-6, 4e-2, 40000), "coco_stuff_164k": (0.5, 5e-6, 5e-3, 80000),
}


def test_one_experiment_per_row():
    assert {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")} == set(ROWS)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_experiment_recipe_validates_and_builds(row_id):
    row = ROWS[row_id]
    cfg = compose(CONFIGS, [f"experiment={row_id}"])
    assert cfg.name == row_id and cfg.row == row_id
    data, model, method = check_data(cfg.data), check_model(cfg.model), check_method(cfg.method)
    assert data.num_classes == row["num_classes"] and model.student == row["model"]
    assert cfg.optim.lr == 0.02 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.schedule.power == 0.9 and cfg.trainer.global_batch == 16
    kd, fd, ctr, iters = LAMBDAS[data.name]
    if row["role"] == "teacher":
        assert cfg.task == "eval" and model.teacher is None
        return
    assert cfg.task == "train" and method.name == row["role"] and method.aux_weight == 0.4
    if row["role"] in ("kd", "afdcd"):
        assert method.kd_weight == kd and method.kd_temperature == 1.0
    if row["role"] == "afdcd":
        assert (method.fm_weight, method.ctr_weight, cfg.trainer.iterations) == (fd, ctr, iters)
        assert cfg.trainer.clip_grad == 15.0 and method.loss.tau == 0.07 and method.loss.groups == 16
        assert (method.loss.crop, method.loss.pool_size) == ((44, 0) if data.name == "camvid" else (None, 4))
        centre = row_id == "cityscapes_deeplabv3_resnet18_afdcd"
        assert method.loss.mask == ("centre" if centre else "random")
        assert method.loss.generator == row["generator"]
    dist = build_distiller(model, method, data.num_classes, device="meta")
    assert sum(p.numel() for p in dist.eval_model().parameters()) == row["params"]
    if row["role"] == "afdcd":
        assert sum(p.numel() for p in dist.loss_module.generator.parameters()) == row["params_generator"]
    else:
        assert dist.loss_module is None


def test_camvid_selection_switch_and_smoke_profile():
    cfg = compose(CONFIGS, ["experiment=camvid_pspnet_resnet18_afdcd"])
    assert (cfg.data.eval_split, cfg.data.selection_split) == ("test", "test")  # the release (spec k.5)
    fixed = compose(CONFIGS, ["experiment=camvid_pspnet_resnet18_afdcd", "data.selection_split=val"])
    assert check_data(fixed.data).selection_split == "val"
    smoke = compose(CONFIGS, ["experiment=cityscapes_deeplabv3_resnet18_afdcd", "profile=smoke"])
    assert smoke.data.crop == [64, 64] and smoke.method.loss.mask == "centre"  # sizes change, the method not


@pytest.mark.parametrize("override,match", [
    ("+method.lambda_fd=1", "method.lambda_fd"),
    ("+method.clip_grad_loss_module=5", "method.clip_grad_loss_module"),  # the clip is trainer.clip_grad (b.4)
    ("method.loss.mask=half", "method.loss.mask='half'"),
    ("method.loss.generator=True", "method.loss.generator"),
    ("method.kd_weight=abc", "method.kd_weight"),
    ("data.selection_split=training", "data.selection_split"),
    ("model.student=deeplabv3_resnet50", "model.student"),
    ("model.teacher_checkpoint=/nonexistent/t.pth", "model.teacher_checkpoint: no file"),
])
def test_bad_config_values_are_one_line(override, match):
    cfg = compose(CONFIGS, ["experiment=camvid_deeplabv3_resnet18_afdcd", override])
    with pytest.raises(UserError, match=match) as err:
        check_method(cfg.method), check_data(cfg.data), check_model(cfg.model)
    assert "\n" not in str(err.value)


def test_teacher_of_wrong_architecture_or_classes_is_refused(tmp_path):
    from afdcd.convert import to_official
    from afdcd.models import create_model

    with torch.device("meta"):
        wrong = create_model("deeplabv3_resnet18", 11)
    path = tmp_path / "teacher.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in to_official(wrong.state_dict(), wrong).items()},
               path)
    cfg = compose(CONFIGS, ["experiment=camvid_deeplabv3_resnet18_afdcd", f"model.teacher_checkpoint={path}"])
    with pytest.raises(UserError, match="holds a deeplabv3_resnet18 model, but deeplabv3_resnet101"):
        build_distiller(check_model(cfg.model), check_method(cfg.method), 11)
