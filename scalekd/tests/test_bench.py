"""The bench pairs run one step each (the timing itself is a script, DESIGN.md s.7)."""

import torch

from scalekd.bench import build_bench_pairs
from scalekd.models import resnet, swin


def test_bench_pairs_step_once() -> None:
    pairs = build_bench_pairs(student=resnet(18, 8, 8, num_classes=5), teacher=swin(8, (1, 1, 1, 1), (1, 1, 2, 2),
                              num_classes=5), batch=2, num_classes=5)
    assert set(pairs) == {"scalekd", "baseline", "kd"}
    for pair in pairs.values():
        before = [p.detach().clone() for p in pair.model.parameters() if p.requires_grad]
        pair.step()
        after = [p for p in pair.model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_bench_cli_prints_the_ratios(monkeypatch, capsys) -> None:  # noqa: ANN001
    """The CLI times the three steps through common.bench and prints both ratios (tiny models here)."""
    import scalekd.bench as bench

    def tiny(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return build_bench_pairs(student=resnet(18, 8, 8, num_classes=5), teacher=swin(8, (1, 1, 1, 1), (1, 1, 2, 2),
                                 num_classes=5), batch=2, num_classes=5)

    monkeypatch.setattr(bench, "build_bench_pairs", tiny)
    records = bench.main(["batch=2", "repeats=1", "warmup=0", "threads=1"])
    out = capsys.readouterr().out
    assert {r["name"] for r in records} == set(bench.NAMES.values())
    assert all(r["peak_bytes"] and r["peak_bytes"] > 0 for r in records)
    assert "ScaleKD step (4 CAPs, TPP, KD) / (teacher forward + student step): " in out and "KD step" in out
    assert out.count("seconds per round") == 3
