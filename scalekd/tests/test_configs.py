"""Every paper.yaml row has an experiment file that composes, names its row, and builds its method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from common.config import compose
from common.errors import UserError
from scalekd.distiller import distiller_from_config
from scalekd.models import create_student, create_teacher

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ROWS = yaml.safe_load((ROOT / "paper.yaml").read_text())["rows"]


def test_one_experiment_per_row() -> None:
    files = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    assert files == {r["id"] for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_experiment_composes_with_the_rows_models(row: dict) -> None:
    cfg = compose(CONFIG_DIR, [f"experiment={row['id']}"])
    assert cfg.name == cfg.row == row["id"]
    assert cfg.model.teacher == row.get("teacher", cfg.model.teacher)
    if row.get("student"):
        assert cfg.model.student == row["student"]
    if "teacher" in row and row.get("student"):
        assert cfg.method.name == "scalekd" and cfg.method.teacher_train_mode is True  # released default (b.5)
    assert cfg.trainer.mixup == cfg.trainer.cutmix == 0.0


@pytest.mark.parametrize("row_id", ["swinl_resnet50", "swinl_vit_s16", "swinl_swin_t", "eva_vit_b14",
                                    "trad_swins_resnet50"])
def test_experiment_builds_its_distiller(row_id: str) -> None:
    """CAP widths/grids from the dry run (meta device) match the released configs (d.1, d.2)."""
    cfg = compose(CONFIG_DIR, [f"experiment={row_id}"])
    with torch.device("meta"):
        model = distiller_from_config(cfg.method, create_student(cfg.model.student), create_teacher(cfg.model.teacher))
    s3, s4 = model.distill.mimic_s3.cap_spatial, model.distill.mimic_s4.cap_spatial
    want = {"swinl_resnet50": ((1024, 768, (14, 14), (14, 14)), (2048, 1536, (7, 7), (7, 7))),
            "swinl_vit_s16": ((384, 768, (14, 14), (14, 14)), (384, 1536, (7, 7), (14, 14))),
            "swinl_swin_t": ((384, 768, (14, 14), (14, 14)), (768, 1536, (7, 7), (7, 7))),
            "eva_vit_b14": ((768, 1024, (16, 16), (16, 16)), (768, 1024, (16, 16), (16, 16))),
            "trad_swins_resnet50": ((1024, 384, (14, 14), (14, 14)), (2048, 768, (7, 7), (7, 7)))}[row_id]
    got = tuple((c.student_dims, c.teacher_dims, c.query_hw, c.pos_hw) for c in (s3, s4))
    assert got == want
    assert (model.distill.kd_alpha is None) == (cfg.method.kd is None)


def test_unknown_method_key_is_one_line() -> None:
    method = OmegaConf.create({"s3": {"alpha": [0.1, 0.1], "heads": 3}})
    with torch.device("meta"), pytest.raises(UserError, match="heads"):
        distiller_from_config(method, create_student("resnet50"), create_teacher("swin_s"))
    with pytest.raises(UserError, match="experiment"):
        compose(CONFIG_DIR, ["experiment=no_such_row"])


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_experiment_fits_the_typed_schemas(row: dict) -> None:
    """Every row validates against common's trainer/optim/schedule schemas and ScaleKD's own groups."""
    from scalekd.train import parse

    r = parse(compose(CONFIG_DIR, [f"experiment={row['id']}"]))
    assert r.trainer.mixup == 0.0 and r.optim.name in ("adamw", "lamb", "sgd")
    if r.schedule.warmup_epochs:  # per-iteration warmup from the recipe's start lr, then cosine after it
        assert 0 < r.schedule.warmup_lr < r.optim.lr and r.schedule.warmup_prefix
    assert r.eval_on_ema is False or r.trainer.ema_decay == 0.9999


def test_no_decay_keys_reach_the_optimizer_groups() -> None:
    """AdamW rows: no weight decay on 1-D params and on *.pos_embed, the CAPs' included (d.2); others decay."""
    from common.engine import build_optimizer
    from scalekd.tests.smoke_models import CAPS, STUDENT, TEACHER
    from scalekd.train import build_method, parse

    r = parse(compose(CONFIG_DIR, ["experiment=swinl_vit_s16", "profile=smoke", *TEACHER, *STUDENT, *CAPS]))
    assert r.no_decay_keys == ["pos_embed", "cls_token", "absolute_pos_embed", "relative_position_bias_table"]
    method = build_method(r, create_teacher("swin", num_classes=10, **r.model.teacher_kwargs))
    opt = build_optimizer(method, r.optim, r.trainer.global_batch)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert decay[id(names["distill.mimic_s3.cap_spatial.pos_embed"])] == 0.0
    assert decay[id(names["distill.mimic_s3.cap_spatial.proj_student.0.weight"])] == r.optim.weight_decay
    assert decay[id(names["student.conv1.weight"])] == r.optim.weight_decay
    assert not any(n.startswith("teacher.") for n in names) and len(decay) == len(names)
