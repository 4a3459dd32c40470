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
