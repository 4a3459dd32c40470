"""Every paper.yaml row has an experiment file that composes, names its row and models, and validates; a few
build their method object end to end (smoke sizes); bad config values are one-line errors."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from common.config import compose
from common.errors import UserError
from ssdkd.datafree import DataFreeKD, DeepInversionSynthesizer
from ssdkd.distiller import buffer_capacity, build_method, build_real_kd, validate_method
from ssdkd.models import create_model
from ssdkd.ssdkd import SSDKD

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
PAPER = yaml.safe_load((ROOT / "paper.yaml").read_text())
ROWS = PAPER["rows"]


@functools.lru_cache(maxsize=1)
def _all_rows() -> dict:
    """Every row composed inside one Hydra context (initialising Hydra per row costs ~0.3 s each)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return {r["id"]: hydra_compose(config_name="train", overrides=[f"experiment={r['id']}"]) for r in ROWS}


def test_one_experiment_per_row() -> None:
    files = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    assert files - {f for f in files if f.startswith("mnist_")} == {r["id"] for r in ROWS}  # + the real-data check


def test_rows_are_labelled() -> None:
    for r in ROWS:
        assert ("copied" in r) == ("(copied)" in r["source"]), r["id"]
        if "ssdkd" in r["id"] and r["dataset"] != "nyuv2":
            assert r["metrics"]["top1"] is None  # SSD-KD's values are unknown (spec k.6): never invented
    assert all(e.get("copied") for e in PAPER["literature"])


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_experiment_composes_and_validates(row: dict) -> None:
    cfg = _all_rows()[row["id"]]
    assert cfg.name == cfg.row == row["id"]
    assert cfg.model.teacher == row["teacher"] and cfg.model.student == row["student"]
    assert cfg.data.name == row["dataset"]
    m = OmegaConf.to_container(cfg.method, resolve=True)
    validate_method(m)
    if m["name"] in ("ssdkd", "fast", "deepinv"):
        assert m["temperature"] == 20.0  # spec b.9 item 1
    if m["name"] == "ssdkd" and row["dataset"] != "nyuv2":
        cap = buffer_capacity(m["store"], cfg.data.train_size)
        assert cap == round(500 * int(row["id"].rsplit("scale", 1)[1])) if "scale" in row["id"] else cap == 5000


def _tiny(cfg):
    t = create_model(cfg.model.teacher, cfg.data.num_classes).eval().requires_grad_(False)
    return t, create_model(cfg.model.student, cfg.data.num_classes)


@pytest.mark.parametrize("row_id", ["cifar10_wrn40_2_wrn16_1_ssdkd", "cifar100_wrn40_2_wrn16_1_fast5",
                                    "cifar10_wrn40_2_wrn16_1_deepinv2k", "cifar100_wrn40_2_wrn16_1_ssdkd_no_priority"])
def test_experiment_builds_its_method(row_id: str) -> None:
    cfg = compose(CONFIG_DIR, [f"experiment={row_id}", "profile=smoke"])
    teacher, student = _tiny(cfg)
    method = build_method(cfg, teacher, student)
    if "ssdkd" in row_id:
        assert isinstance(method, SSDKD) and method.buffer.capacity == 5000
        assert method.cfg.use_priority == ("no_priority" not in row_id)
        assert method.synthesizer.batch_size == 32  # the smoke profile shrinks sizes, not the method
    elif "deepinv" in row_id:
        assert isinstance(method.synthesizer, DeepInversionSynthesizer) and method.synthesizer.iterations == 2000
    else:
        assert method.synthesizer.g_steps == 5 and method.synthesizer.lr_g == 3e-3 and method.kd_steps == 40  # smoke


def test_real_kd_builds_a_balanced_subset() -> None:
    cfg = compose(CONFIG_DIR, ["experiment=cifar10_wrn40_2_wrn16_1_kd_real10"])
    teacher, student = _tiny(cfg)
    labels = torch.arange(10).repeat_interleave(20)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    m = build_real_kd(cfg, teacher, student, images, labels)
    assert isinstance(m, DataFreeKD) and len(m.pool) == 20 and m.kd_steps == 1 and m.synthesizer is None


@pytest.mark.parametrize("override,match", [
    ("+method.phi.lambda=1", "unknown config key method.phi.lambda"),
    ("method.phi.div_form=log", "div_form"),
    ("method.store.scale=2.0", "scale"),
    ("method.synthesis.g_steps=0", "g_steps"),
    ("method.name=cmi", "method.name"),
    ("optim.lr=-1", "optim.lr"),
])
def test_bad_config_values_are_one_line(override: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:  # at composition (shared schemas) or when built
        cfg = compose(CONFIG_DIR, ["experiment=cifar10_wrn40_2_wrn16_1_ssdkd", "profile=smoke", override])
        build_method(cfg, *_tiny(cfg))
    assert "\n" not in str(err.value)


def test_smoke_view_never_flips_one_synthetic_class_into_another() -> None:
    """The smoke's synthetic CIFAR classes are gratings at 0/45/90/135 degrees: a horizontal flip turns 45 into 135
    (class 1 into class 3), which capped a flipping teacher at ~80% (README). The smoke view must not flip."""
    import numpy as np

    from common.data.synthetic import class_images
    from ssdkd.datafree import NORMALIZE_DICT, Normalizer
    from ssdkd.distiller import inversion_augment

    def spectrum(images: np.ndarray) -> np.ndarray:  # mean power spectrum of the grey images (phase-free)
        grey = images.astype(np.float32).mean(axis=-1)
        power = np.abs(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2
        return power.mean(axis=0).ravel() / np.linalg.norm(power.mean(axis=0))

    rng = np.random.default_rng(0)
    one, three = (class_images(np.full(64, c), 10, 32, rng) for c in (1, 3))
    assert spectrum(one) @ spectrum(three) < 0.5  # apart as drawn
    assert spectrum(one[:, :, ::-1]) @ spectrum(three) > 0.9  # one flip away from each other
    cfg = compose(CONFIG_DIR, ["experiment=cifar10_wrn40_2_wrn16_1_ssdkd", "profile=smoke"])
    assert cfg.data.hflip is False
    assert inversion_augment(cfg.data, Normalizer(**NORMALIZE_DICT["cifar10"])).flip is False
