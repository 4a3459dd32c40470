"""The entry points on common's Trainer: step 1 -> step 2, exact resume, SIGTERM, the lr decay, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import compose
from common.errors import UserError
from pste_bnn.train import CONFIG_DIR, parse, run

TINY = ["profile=smoke", "data.train_per_class=4", "data.test_per_class=2", "trainer.global_batch=8",
        "trainer.max_device_batch=8", "trainer.epochs=2", "trainer.log_every=1", "method.tau=2"]


def _run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[dict[str, float], Path]:
    if "method=sparks" in overrides:
        overrides = [*overrides, "method.selection.iters=3"]
    return run(compose(CONFIG_DIR, [*TINY, f"output_dir={tmp_path}", f"name={name}", *overrides]))


@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("step1")
    metrics, out = _run(tmp, "s1", ["method=step1"])
    assert metrics["steps"] == 10 and (out / "best.pt").is_file()
    return out / "best.pt"


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("variant", ["bnn", "snn", "fixed", "sparks"])
def test_step2_from_step1_writes_record_accounting_and_export(step1: Path, tmp_path: Path, variant: str) -> None:
    metrics, out = _run(tmp_path, variant, [f"method={variant}", f"method.init_checkpoint={step1}",
                                            "trainer.max_steps=3"])
    record = json.loads((out / "result.json").read_text())
    assert record["kind"] == "trained" and record["data"] == "synthetic" and record["profile"] == "smoke"
    assert record["extra"]["step1_metrics"]["top1"] == torch.load(step1, weights_only=True)["metrics"]["top1"]
    acc = record["extra"]["accounting"]
    assert acc["tau"] == (9 if variant == "bnn" else 2) and acc["size_bits"] > 0 and acc["bops_subbit"] > 0
    export = torch.load(out / "export.pt", weights_only=True)
    assert len(export["layers"]) == 6
    if variant == "sparks":  # the selection log: ids of every layer at each epoch start and at the end
        entries = [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]
        assert len(entries) == 2 and len(entries[0]["layers"]) == 6
        assert all(len(v["ids"]) == 4 for v in entries[-1]["layers"].values())
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        gammas = [e["sel_gamma"] for e in logged if "sel_gamma" in e]  # set before steps 0, 1, 2 of 10 (b.8)
        assert gammas[:3] == pytest.approx([1.0, 0.6, 0.2])


@pytest.mark.parametrize("variant", ["bnn", "snn", "fixed", "sparks"])  # the smoke's step-2 variants
def test_resumed_step2_ends_bit_identical(step1: Path, tmp_path: Path, variant: str) -> None:
    """An interrupted and resumed run (mid-epoch) ends with exactly the weights of an uninterrupted one."""
    args = [f"method={variant}", f"method.init_checkpoint={step1}", "++method.refine_every=2"]
    if variant == "fixed":  # the smoke's `freq` subset
        args.append("method.fixed_subset=freq")
    _, whole = _run(tmp_path / "a", "whole", args)
    _, first = _run(tmp_path / "b", "cut", [*args, "trainer.max_steps=3"])
    _, rest = _run(tmp_path / "c", "rest", [*args, f"trainer.resume={first / 'last.pt'}"])
    a, b = _model(whole / "last.pt"), _model(rest / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((rest / "result.json").read_text())["metrics"]["steps"] == 10


def test_epoch_start_linear_decay_per_group(step1: Path, tmp_path: Path) -> None:
    """lr of epoch e = base (1 - (e + 1) / E) in every group, X at 10x (d.1, b.8): logged lr is group 0's."""
    _, out = _run(tmp_path, "lr", ["method=sparks", f"method.init_checkpoint={step1}", "trainer.epochs=4"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {e["epoch"]: e["lr"] for e in logged if "lr" in e}
    assert lrs == pytest.approx({e: 2e-3 * (1 - (e + 1) / 4) for e in range(4)})


def test_sigterm_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    from common.testing import sigterm_then_resume

    run_dir = tmp_path / "run"
    args = [*TINY, "method=step1", "trainer.epochs=200", f"output_dir={tmp_path}", f"hydra.run.dir={run_dir}"]
    sigterm_then_resume("pste_bnn.train", args, run_dir, resume_args=("trainer.epochs=1",))


@pytest.mark.parametrize("overrides, message", [
    (["data=cifar10", "model=cifar_birealnet8", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["data.root=null"], "data.root is not set"),
    (["profile=smoke", "data.name=svhn"], "data.name='svhn'"),
    (["profile=smoke", "schedule.name=cosine"], "schedule.name=cosine"),
    (["profile=smoke", "model.num_classes=100"], "model.num_classes=100"),
    (["profile=smoke", "method=sparks"], "step-1 checkpoint"),
])
def test_bad_input_is_a_one_line_error(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        run(compose(CONFIG_DIR, [f"output_dir={tmp_path}", *overrides]))
    assert "\n" not in str(err.value)


def test_unknown_key_and_corrupt_step1_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="trainer.epochz"):
        compose(CONFIG_DIR, ["+trainer.epochz=3"])
    with pytest.raises(UserError, match="data.bogus"):
        parse(compose(CONFIG_DIR, ["+data.bogus=1"]))
    bad = tmp_path / "step1.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match=str(bad)):
        _run(tmp_path, "corrupt", ["method=snn", f"method.init_checkpoint={bad}"])
    assert bad.read_bytes() == b"\x80\x02garbage"  # nothing written is lost
