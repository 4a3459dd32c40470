"""common.reproduce: every built paper's reproduce reads the same keys and plans the runs paper.yaml names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from common.errors import UserError
from common.reproduce import load_spec, make_plan, smoke_runs

PAPERS = ("kernelwarehouse", "norm", "gridconv")  # their full rows plan without teacher files
ALL_PAPERS = tuple(sorted(p.parent.name for p in Path(__file__).resolve().parents[2].glob("*/reproduce.py")
                          if (p.parent / "paper.yaml").is_file()))
SAME_ARGS = ["seeds=0,1", "output_dir=OUT", "dry_run=true", "trainer.log_every=7"]


@pytest.mark.parametrize("paper", PAPERS)
def test_reproduce_parses_the_same_args_for_every_paper(paper: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for env in load_spec(paper)[0]["datasets"].values():
        monkeypatch.delenv(str(env), raising=False)
    module = importlib.import_module(f"{paper}.reproduce")
    out = str(tmp_path / "out")
    module.main([*[a.replace("OUT", out) for a in SAME_ARGS]])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("=== ")]
    spec = load_spec(paper)[0]
    assert len(lines) == 2 * len(spec["smoke"])  # every smoke run, for each of the two seeds
    seed_key = spec.get("seed_key", "trainer.seed")
    for line, seed in zip(lines, [0] * len(spec["smoke"]) + [1] * len(spec["smoke"])):
        assert f"-m {paper}.train" in line and "profile=smoke" in line and "trainer.log_every=7" in line
        assert f"{seed_key}={seed}" in line and f"output_dir={out}" in line and f"hydra.run.dir={out}/{paper}/" in line
        assert "{run:" not in line  # references to earlier runs are resolved
    # with a root: full runs of the selected rows, one per seed
    row = load_spec(paper)[1][0]["id"]
    module.main(["data.root=/data", f"rows={row}", "seeds=3", "dry_run=true"])
    full = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("=== ")]
    assert full and all("data.root=/data" in ln and f"{seed_key}=3" in ln for ln in full)
    assert f"experiment={row}" in full[-1] or f"experiment={row}" in full[0]


@pytest.mark.parametrize("paper", ALL_PAPERS)
def test_reproduce_bad_args_are_one_line_errors(paper: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"{paper}.reproduce")
    for args, message in ((["rows=no_such_row", "data.root=/d"], "unknown rows"), (["seeds=x"], "seeds must be"),
                          (["profile=fast"], "profile must be"), (["--rows"], "unknown argument")):
        with pytest.raises(SystemExit) as err:
            module.main([*args, "dry_run=true"])
        err_text = capsys.readouterr().err.strip()
        assert err.value.code == 2 and message in err_text and len(err_text.splitlines()) == 1, err_text


def test_reproduce_smoke_order_and_run_references() -> None:
    plan = make_plan("norm", ["dry_run=true"])
    names = [r.name for r in smoke_runs(plan)]
    assert names[0].startswith("cifar100_teacher_")  # the teacher trains before the student that needs it
    student = smoke_runs(plan)[-1]
    assert any(o.startswith("model.teacher_checkpoint={run:" + names[0] + "}") for o in student.overrides)
    with pytest.raises(UserError, match="profile=full needs a dataset root"):
        make_plan("kernelwarehouse", ["profile=full"])


@pytest.mark.parametrize("paper", [p for p in ALL_PAPERS if p != "ssdkd"])  # ssdkd: ssdkd/tests/test_bench.py
def test_bench_parses_the_same_args_for_every_paper(paper: str) -> None:
    from common.bench import BENCH_DEFAULTS
    from common.cli import parse_overrides

    module = importlib.import_module(f"{paper}.bench")
    assert set(BENCH_DEFAULTS) <= set(module.DEFAULTS)
    opts, rest = parse_overrides(["threads=1", "repeats=2", "modes=infer", "device=cpu", "memory=false"],
                                 module.DEFAULTS, "bench")
    assert rest == [] and opts["repeats"] == 2 and opts["memory"] is False
    with pytest.raises(SystemExit) as err:
        module.main(["no_such_key=1"])
    assert err.value.code == 2


@pytest.mark.parametrize("paper", ALL_PAPERS)
def test_reproduce_checks_every_run_config_before_running(paper: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Any key=value reproduce does not know is a Hydra override of every run: a typo (`seed=1`, `trainer.epochz=1`)
    or a wrong value fails before the first run starts, in one line naming it, and a dry run says so too."""
    module = importlib.import_module(f"{paper}.reproduce")
    for arg, key in (("trainer.epochz=1", "trainer.epochz"), ("seed=1", "seed"), ("optim.name=nonsense", "optim.name")):
        with pytest.raises(SystemExit) as err:
            module.main([arg, "dry_run=true", f"output_dir={tmp_path}"])
        captured = capsys.readouterr()
        text = captured.err.strip()
        assert err.value.code == 2 and len(text.splitlines()) == 1 and f"config {key}" in text, text
        assert "=== " not in captured.out  # no run was listed as if it would start
