"""One Hydra experiment per paper.yaml row with the recipe of spec d.1-d.5; every row composes and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import common.config  # noqa: F401  (registers the shared schemas, osvai_base)
from common.report import load_paper_yaml
from noah.models import create_model, family_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROWS = load_paper_yaml("noah").rows


def compose_row(row_id: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=[f"experiment={row_id}", *overrides])


@pytest.fixture(scope="module")
def composed() -> dict:
    """Every row's config, composed in one Hydra context (composition is the slow part)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return {r.id: compose(config_name="train", overrides=[f"experiment={r.id}"]) for r in ROWS}


def test_every_row_has_exactly_one_experiment() -> None:
    files = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert files == {r.id for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_experiment_recipe(row, composed: dict) -> None:
    cfg = composed[row.id]
    assert cfg.name == cfg.row == row.id
    assert cfg.model.name == row.extra["model"] and cfg.method.head == row.extra["head"]
    fam = family_of(cfg.model.name)
    if row.extra["dataset"] == "coco":
        assert cfg.data.name == "coco" and cfg.method.loss in ("bce", "asl") and cfg.data.num_classes == 80
    elif fam in ("resnet", "mobilenetv2", "mobilenetv3", "shufflenetv2"):  # d.1
        assert cfg.optim.name == "sgd" and not cfg.optim.nesterov and cfg.schedule.per_step is False
        assert cfg.trainer.label_smoothing == 0 and cfg.trainer.mixup == 0 and cfg.trainer.ema_decay is None
        assert cfg.optim.no_decay_1d == (fam in ("mobilenetv3", "shufflenetv2"))
        assert (cfg.trainer.epochs, cfg.trainer.global_batch, cfg.optim.lr) == {
            "resnet": (100, 256, 0.1), "mobilenetv2": (150, 256, 0.05), "mobilenetv3": (150, 256, 0.05),
            "shufflenetv2": (240, 1024, 0.5)}[fam]
    elif fam in ("deit", "pvt"):  # d.2 / d.3
        assert cfg.optim.name == "adamw" and cfg.optim.lr == 5e-4 and cfg.optim.base_batch == 512
        assert cfg.recipe.repeated_aug == 3 and cfg.optim.no_decay_1d
        assert cfg.trainer.mixup == 0.8 and cfg.trainer.cutmix == 1.0
        assert cfg.recipe.ema_evaluate is False
        assert (cfg.trainer.ema_decay is None) == (fam == "pvt")
    else:  # d.4
        assert list(cfg.data.mean) == [0.5, 0.5, 0.5] and cfg.trainer.clip_grad == 1.0
        assert cfg.trainer.ema_decay == 0.99992 and cfg.recipe.ema_evaluate is True
        assert cfg.optim.lr == 7e-4 and cfg.optim.lr_scaling == "none" and cfg.schedule.warmup_epochs == 20


@pytest.mark.parametrize("row_id", ["noah_mobilenetv3_small", "deit_tiny_050_patch16_224", "coco_noah_vit_large"])
def test_experiment_builds_its_model(row_id: str, composed: dict) -> None:
    cfg = composed[row_id]
    m = cfg.method
    with torch.device("meta"):
        model = create_model(cfg.model.name, head=m.head, num_classes=cfg.data.num_classes,
                             img_size=cfg.data.image_size, pre_logits=cfg.model.pre_logits,
                             **({k: m[k] for k in ("head_num", "key_ratio", "head_dropout", "head_split", "kv_split")}
                                if m.head == "noah" else {}))
    assert model.num_classes == cfg.data.num_classes


def test_smoke_profile_changes_sizes_only() -> None:
    full, smoke = compose_row("noah_resnet18"), compose_row("noah_resnet18", "profile=smoke")
    assert smoke.data.name == "synthetic" and smoke.data.root.endswith("noah_synthetic_imagenet")
    assert smoke.method == full.method and smoke.model == full.model
    assert smoke.data.image_size // 32 >= 4  # the head still sees >= 4x4 positions
