"""The Hydra pattern end to end: compose, override, validate, save the resolved config, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.config import TrainerConfig, check_choice, compose, save_resolved, validate, validate_groups
from common.errors import UserError
from common.example.train import CONFIG_DIR, DataConfig, run

REPO = Path(__file__).resolve().parents[2]


def test_compose_experiment_and_profile_order() -> None:
    cfg = compose(CONFIG_DIR, ["experiment=mnist_cnn", "data.root=/x"])
    assert cfg.name == "mnist_cnn" and cfg.data.name == "mnist" and cfg.trainer.epochs == 2
    smoke = compose(CONFIG_DIR, ["experiment=mnist_cnn", "data.root=/x", "profile=smoke"])
    assert smoke.trainer.epochs == 1 and smoke.trainer.max_steps == 4  # the profile wins over the row
    assert smoke.optim.lr == cfg.optim.lr  # ...and changes sizes only


def test_validate_names_the_key() -> None:
    with pytest.raises(UserError, match=r"config trainer\.epochs") as err:  # typed: fails while composing
        compose(CONFIG_DIR, ["trainer.epochs=abc"])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"config trainer\.epochs") as err:
        validate({"epochs": "abc"}, TrainerConfig, "trainer.")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"trainer\.epochz"):
        validate({"epochz": 3}, TrainerConfig, "trainer.")
    with pytest.raises(UserError, match=r"data\.root"):  # mandatory (???) and not given
        validate(compose(CONFIG_DIR, ["experiment=mnist_cnn"]).data, DataConfig, "data.")
    with pytest.raises(UserError, match="choose one of a, b"):
        check_choice("x", "c", ("a", "b"))


@dataclass
class _Run:
    trainer: TrainerConfig
    tag: str


def test_validate_groups_types_each_group_and_names_the_key() -> None:
    run = validate_groups(compose(CONFIG_DIR, ["experiment=mnist_cnn", "data.root=/x"]), _Run, tag="t")
    assert isinstance(run.trainer, TrainerConfig) and run.trainer.epochs == 2 and run.tag == "t"
    with pytest.raises(UserError, match=r"config trainer\.epochz"):
        validate_groups({"trainer": {"epochz": 1}}, _Run, tag="t")
    with pytest.raises(UserError, match="group 'trainer' is missing"):
        validate_groups({}, _Run, tag="t")
    with pytest.raises(TypeError, match="_Run.tag"):  # a non-group field must be given by the caller
        validate_groups({"trainer": {}}, _Run)


def test_trainer_values_are_checked() -> None:
    for bad in ({"log_every": 0}, {"global_batch": -4}, {"eval_every": 0}, {"max_steps": 0}):
        with pytest.raises(UserError, match=f"trainer.{next(iter(bad))}"):
            validate(bad, TrainerConfig, "trainer.")


def test_compose_unknown_key_is_one_line() -> None:
    with pytest.raises(UserError, match="trainer.nope") as err:
        compose(CONFIG_DIR, ["trainer.nope=1"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("trainer.amp=fp8", "trainer.amp"),  # a choice (Enum) outside its values
    ("trainer.selection=best", "trainer.selection"),
    ("schedule.name=linear", "schedule.name"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
    ("logger.wandb_mode=cloud", "logger.wandb_mode"),
    ("+optim.nope=1", "optim.nope"),  # an unknown key, even when added with +
    ("trainer.precise_bn_batches=-1", "trainer.precise_bn_batches"),  # a range, checked right after composing
    ("optim.lr=0", "optim.lr"),
    ("optim.name=nonsense", "optim.name"),  # an open set (timm's optimizers), still checked while composing
])
def test_shared_schemas_fail_at_compose_naming_the_key(override: str, key: str) -> None:
    """The shared structured configs (common.config, ConfigStore `osvai_base`) check every paper's groups."""
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        compose(CONFIG_DIR, [override])
    assert "\n" not in str(err.value) and str(err.value).startswith("config")


def test_every_paper_composes_on_the_shared_schemas() -> None:
    """Each paper's train.yaml holds only its own groups; trainer/optim/schedule/logger come from common."""
    papers = [p.parent.parent.name for p in sorted(REPO.glob("*/configs/train.yaml"))]
    assert len(papers) >= 9, papers  # every paper, not a list that new papers are never added to
    for paper in [*papers, "common/example"]:
        text = (REPO / paper / "configs" / "train.yaml").read_text()
        assert "- osvai_base" in text and "\nlogger:" not in text, paper
        cfg = compose(REPO / paper / "configs", [])
        assert set(cfg.trainer) == set(TrainerConfig.__dataclass_fields__), paper


def test_entry_point_errors_and_saved_config(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "common.example.train", f"output_dir={tmp_path}"]
    bad_type = subprocess.run(base + ["trainer.epochs=abc"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad_type.returncode == 2
    assert bad_type.stderr.strip().splitlines()[-1].startswith("error: config trainer.epochs")
    assert "Traceback" not in bad_type.stderr
    bad_data = subprocess.run(base + ["experiment=mnist_cnn", f"data.root={tmp_path / 'none'}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
    assert bad_data.returncode == 2 and "Traceback" not in bad_data.stderr
    assert str(tmp_path / "none") in bad_data.stderr.strip().splitlines()[-1]


def test_wrong_optimizer_name_fails_before_anything_is_written(tmp_path: Path) -> None:
    """`optim.name` is a str (any timm optimizer), so the schema's types do not catch a wrong one: it must still
    fail while composing, in one line, before Hydra makes a run directory or a dataset is built."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "common.example.train", "experiment=mnist_cnn", "data.root=/x",
                           f"output_dir={out}", "optim.name=nonsense"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: config optim.name='nonsense'")
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    for name in ("sgd", "adamw", "lamb", "lookahead_adamw", "SGD"):  # timm's names, its lookahead prefix, any case
        assert compose(CONFIG_DIR, [f"optim.name={name}"]).optim.name == name


@pytest.mark.parametrize("paper", sorted(p.parent.parent.name for p in REPO.glob("*/configs/train.yaml")))
def test_wrong_value_in_a_papers_own_group_fails_before_anything_is_written(
        paper: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A paper's own groups (model/data/method) are not in the ConfigStore: `hydra_main(check=...)` runs the
    paper's validation on the composed config before Hydra makes the run directory, so a wrong value there fails
    in one line, exit 2, with nothing written, as a wrong shared-group value does (issue 8 item 4)."""
    import importlib

    cfg = compose(REPO / paper / "configs", [])
    key = next(f"data.{k}" for k, v in cfg.data.items() if isinstance(v, int) and not isinstance(v, bool))
    train = importlib.import_module(f"{paper}.train")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{paper}.train", f"output_dir={out}", f"{key}=abc"])
    with pytest.raises(SystemExit) as stop:
        train.main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err] and err.startswith(f"error: config {key}"), err
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_run_saves_resolved_config_and_result(tmp_path: Path) -> None:
    cfg = compose(CONFIG_DIR, ["profile=smoke", f"output_dir={tmp_path}"])
    metrics = run(cfg)
    (run_dir,) = (tmp_path / "common" / "default").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == f"{tmp_path}/data/synthetic_imagefolder_10"  # interpolations resolved
    assert saved["trainer"]["max_steps"] == 4
    result = yaml.safe_load((run_dir / "result.json").read_text())
    assert result["profile"] == "smoke" and result["metrics"]["top1"] == pytest.approx(metrics["top1"])
    save_resolved(cfg, tmp_path / "again")
    assert (tmp_path / "again" / "config.yaml").exists()


def test_a_shared_trainer_option_a_paper_ignores_is_refused_by_name() -> None:
    from common.config import CLASSIFICATION_OPTIONS, refuse_unused_trainer_options

    refuse_unused_trainer_options(TrainerConfig(), CLASSIFICATION_OPTIONS, "unused")  # defaults pass
    with pytest.raises(UserError, match=r"^config trainer.mixup=0.8: pose regression does not use it"):
        refuse_unused_trainer_options(TrainerConfig(mixup=0.8), CLASSIFICATION_OPTIONS, "pose regression does "
                                      "not use it")
    from omegaconf import OmegaConf

    raw = OmegaConf.create({"cutmix": 1.0})  # a raw DictConfig group reads the same
    with pytest.raises(UserError, match=r"trainer.cutmix=1.0"):
        refuse_unused_trainer_options(raw, CLASSIFICATION_OPTIONS, "unused")


@pytest.mark.parametrize("paper", ["gridconv", "afdcd", "ske2grid", "pste_bnn", "ssdkd", "scalekd", "norm"])
def test_papers_that_ignore_label_smoothing_refuse_it(paper: str, tmp_path: Path) -> None:
    """The shared trainer.label_smoothing is read by classification with mixup (KW, NOAH; NORM with mixup only):
    every other paper's train refuses it in one line, before any data is read."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", f"{paper}.train", "trainer.label_smoothing=0.1",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config trainer.label_smoothing=0.1: "), proc.stderr
    assert not any(tmp_path.iterdir())  # refused before Hydra makes the run directory
