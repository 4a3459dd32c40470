"""End to end on the synthetic pickle: reader -> released pipeline -> Ske2Grid D5 (small width) learns, and the
PLS hand-off to D6 keeps the frozen stage-0 pair bit-identical while the rest trains (spec §i)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from common.data import write_synthetic_skeleton_pickle
from ske2grid.data import SkeletonClips, SkeletonPipeline
from ske2grid.method import SkeletonRecognizer
from ske2grid.models import create_model
from ske2grid.pls import load_parent


def _train(method: SkeletonRecognizer, loader: DataLoader, epochs: int) -> list[float]:
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    losses = []
    method.train()
    for _ in range(epochs):
        for x, y in loader:
            _, terms = method.forward_train(x, y)
            opt.zero_grad()
            terms["loss_cls"].backward()
            opt.step()
            losses.append(terms["loss_cls"].item())
    return losses


@pytest.mark.slow
def test_d5_learns_and_pls_handoff_keeps_stage0(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ann = write_synthetic_skeleton_pickle(tmp_path / "syn.pkl", train_per_class=8, val_per_class=1, seed=1)
    data = SkeletonClips(ann, "xsub_train", SkeletonPipeline(2, clip_len=20), "synthetic")
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    d5 = SkeletonRecognizer(create_model("ske2grid", 8, widths=[8, 16, 16]))
    losses = _train(d5, loader, epochs=12)  # 48 steps
    first, last = sum(losses[:4]) / 4, sum(losses[-8:]) / 8
    assert last < first - 0.15, (first, last)  # measured here: 2.11 -> 1.83 (chance: ln 8 = 2.08)

    d6 = SkeletonRecognizer(create_model("ske2grid", 8, grid_shape=(6, 6), progressive_joint_seq=[17, 25],
                                         widths=[8, 16, 16]))
    load_parent(d6.model, d5.model.state_dict())
    stage0 = {k: v.clone() for k, v in d6.model.ske2grid.stages[0].state_dict().items()}
    conv0 = d6.model.blocks[0].grid_conv.weight.detach().clone()
    _train(d6, loader, epochs=1)
    for k, v in d6.model.ske2grid.stages[0].state_dict().items():
        assert torch.equal(v, stage0[k]), k
    assert not torch.equal(d6.model.blocks[0].grid_conv.weight, conv0)
    d6.eval()
    with torch.no_grad():
        probs = d6.predict(torch.stack([data[i][0] for i in range(4)]))
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
