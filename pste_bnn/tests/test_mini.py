"""Spec i's mini reproduction on real MNIST digits (slow: 3 seeds x 6 runs) and the smoke profile's floor (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.testing import require_or_skip, shared_data_dir
from pste_bnn.mini import check_bars, table


def test_bars_are_judged_on_seed_means() -> None:
    ok = {s: {"step1": 95.0, "bnn": 94.0, "random": 88.0, "freq": 90.0, "sparks-zeros": 86.0, "sparks-freq": 89.0}
          for s in range(3)}
    assert check_bars(ok) == [] and "| sparks-freq | 2 |" in table(ok)
    low = {s: {**ok[s], "sparks-freq": 87.0 if s else 88.5} for s in range(3)}
    assert check_bars(low) == ["sparks-freq mean 87.50 < random 88.00"]
    assert check_bars({0: {**ok[0], "step1": 89.9, "bnn": 84.0}}) == ["step 1 mean 89.90 < 90.0",
                                                                      "bnn mean 84.00 < 85.0"]


@pytest.mark.slow
def test_mini_reproduction_meets_the_bars(tmp_path: Path) -> None:
    from pste_bnn.mini import main

    root = require_or_skip(shared_data_dir("mnist"), "MNIST digits (shared/data/mnist)")
    per_seed = main([f"data_root={root}", f"output_dir={tmp_path}", "seeds=0,1,2"])
    assert check_bars(per_seed) == [], table(per_seed)


@pytest.mark.slow
def test_smoke_reproduce_every_variant_above_twice_chance(tmp_path: Path) -> None:
    from pste_bnn.reproduce import main

    main([f"output_dir={tmp_path}"])
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert len(records) == 5
    for r in records:
        assert r["profile"] == "smoke" and r["metrics"]["top1"] >= 20.0, (r["experiment"], r["metrics"])


def test_reuse_step1_takes_only_a_finished_run_of_the_same_recipe(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from common.config import compose
    from pste_bnn.mini import DEFAULTS, base_overrides, finished_step1
    from pste_bnn.train import CONFIG_DIR

    def cfg(epochs: int):
        return compose(CONFIG_DIR, [*base_overrides({**DEFAULTS, "output_dir": str(tmp_path)}, 1),
                                    f"trainer.epochs={epochs}", "method=step1", "name=mini_step1_s1"])

    run = tmp_path / "pste_bnn" / "mini_step1_s1" / "20260101-000000"
    run.mkdir(parents=True)
    OmegaConf.save(cfg(8), run / "config.yaml")
    (run / "best.pt").write_bytes(b"")
    (run / "result.json").write_text(json.dumps({"metrics": {"top1": 92.5}}))
    assert finished_step1(cfg(8)) is None  # not finished
    (run / "FINISHED").write_text("")
    assert finished_step1(cfg(8)) == ({"top1": 92.5}, run)
    assert finished_step1(cfg(7)) is None  # another recipe


def test_unknown_variant_is_a_one_line_error_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pste_bnn.mini import main

    with pytest.raises(SystemExit) as err:
        main([f"output_dir={tmp_path}", "variants=bnn,sparks-zero"])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "sparks-zero" in message and message.count("\n") == 1
    assert not (tmp_path / "pste_bnn").exists()
