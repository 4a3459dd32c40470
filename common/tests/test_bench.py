"""common.bench, common.cli and common.allocator on a toy pair: what the harness records, not how fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.allocator import launched_module
from common.bench import (
    BENCH_DEFAULTS,
    BenchConfig,
    Candidate,
    bench_config,
    classification_steps,
    compare,
    peak_memory_bytes,
    print_table,
    ratio,
)
from common.cli import parse_overrides
from common.errors import UserError


def toy_pair() -> list[Candidate]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    large = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 16, 2))
    sample = torch.zeros(1, 3, 8, 8)
    return [Candidate("small", small, classification_steps(small, x), 4, sample),
            Candidate("large", large, classification_steps(large, x), {"train": 4, "infer": 4}, sample)]


def test_bench_compare_records_every_mode_and_candidate() -> None:
    pair = toy_pair()
    records = compare(pair, BenchConfig(repeats=3, warmup=1))
    assert [(r["mode"], r["name"]) for r in records] == [("train", "small"), ("train", "large"),
                                                         ("infer", "small"), ("infer", "large")]
    for r in records:
        assert len(r["times"]) == 3 and r["throughput"] == pytest.approx(4 / r["seconds"])
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
        assert r["tflops"] is None  # CPU: no TFLOP/s figure
    by = {(r["mode"], r["name"]): r for r in records}
    # exact multiply-adds of the toy nets: conv 3x3x3x4 at 36 positions + linear 144x2
    assert by["train", "small"]["macs"] == 3 * 9 * 4 * 36 + 144 * 2
    assert by["train", "large"]["macs"] > by["train", "small"]["macs"]
    assert by["train", "small"]["params"] == sum(p.numel() for p in pair[0].model.parameters())
    assert ratio(records, "infer", "large", "small") == pytest.approx(
        by["infer", "small"]["throughput"] / by["infer", "large"]["throughput"])
    table = print_table(records, baseline="small")
    assert table.count("\n") == 5 and "time / small" in table and "1.00x" in table


def test_bench_modes_and_partial_candidates() -> None:
    pair = toy_pair()
    only_infer = Candidate("infer-only", pair[0].model, {"infer": pair[0].steps["infer"]}, 4)
    records = compare([pair[0], only_infer], BenchConfig(repeats=1, warmup=0, memory=False, macs=False,
                                                         modes=("train", "infer")))
    assert [(r["mode"], r["name"]) for r in records] == [("train", "small"), ("infer", "small"),
                                                         ("infer", "infer-only")]
    assert all(r["peak_bytes"] is None and r["macs"] is None for r in records)


def test_bench_training_step_trains_and_peak_memory_sees_a_transient_tensor() -> None:
    cand = toy_pair()[0]
    before = [p.detach().clone() for p in cand.model.parameters()]
    cand.steps["train"]()
    assert any(not torch.equal(a, b) for a, b in zip(before, cand.model.parameters()))
    assert peak_memory_bytes(lambda: torch.empty(2**20).fill_(1.0), torch.device("cpu")) >= 4 * 2**20


def test_bench_arguments_are_parsed_one_way() -> None:
    opts, rest = parse_overrides(["threads=1", "repeats=3", "memory=false", "modes=infer"], BENCH_DEFAULTS, "bench")
    assert rest == [] and opts["threads"] == 1 and opts["memory"] is False
    cfg = bench_config(opts)
    assert cfg.modes == ("infer",) and cfg.repeats == 3 and cfg.device.type == "cpu"
    with pytest.raises(UserError, match="unknown argument 'batchsize=2'"):
        parse_overrides(["batchsize=2"], BENCH_DEFAULTS, "bench")
    with pytest.raises(UserError, match="repeats must be an integer"):
        parse_overrides(["repeats=many"], BENCH_DEFAULTS, "bench")
    with pytest.raises(UserError, match="modes must be"):
        bench_config({**BENCH_DEFAULTS, "modes": "fit"})
    opts, rest = parse_overrides(["rows=a,b", "trainer.workers=2", "~logger"], {"rows": None}, "r", passthrough=True)
    assert opts["rows"] == "a,b" and rest == ["trainer.workers=2", "~logger"]


@pytest.mark.parametrize("argv,module", [
    (["python", "-m", "kernelwarehouse.train", "x=1"], "kernelwarehouse.train"),
    (["python", "-u", "-X", "dev", "-mkernelwarehouse.bench"], "kernelwarehouse.bench"),
    (["python", "script.py", "-m", "kernelwarehouse.train"], None),
    (["python", "-c", "import kernelwarehouse"], None),
])
def test_allocator_applies_only_to_launched_entry_points(argv: list[str], module: str | None) -> None:
    assert launched_module(argv) == module


def test_allocator_opt_out_and_other_modules_leave_glibc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.allocator import apply_for_entry_points

    argv = ["python", "-m", "kernelwarehouse.train"]
    monkeypatch.setenv("KW_HEAP", "off")
    assert apply_for_entry_points({"kernelwarehouse.train"}, "KW_HEAP", argv) is False
    monkeypatch.delenv("KW_HEAP")
    assert apply_for_entry_points({"kernelwarehouse.eval"}, "KW_HEAP", argv) is False
