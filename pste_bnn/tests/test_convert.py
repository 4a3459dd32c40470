"""Official SNN checkpoints through convert.py (spec g): format, odd keys named, tau checks, Sparks seeding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from pste_bnn.convert import checkpoint_filter_fn, load_official_checkpoint, seed_sparks_from_snn
from pste_bnn.models import birealnet18, mini_net
from pste_bnn.sparks import HardBinaryConv, codeword_ids


def _official_file(tmp_path: Path, model: torch.nn.Module, drop: tuple[str, ...] = ()) -> Path:
    """A `train.py::save_checkpoint`-format file: DataParallel keys, no memory/step, epoch/optimizer entries."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()
          if not k.endswith(("binarize.memory", "binarize.step")) and not k.endswith(drop)}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd, "best_top1_acc": 1.0, "optimizer": {"state": {}}}, path)
    return path


def test_official_step2_checkpoint_loads_strictly(tmp_path: Path) -> None:
    src = birealnet18(quantizer="snn", tau=5)
    path = _official_file(tmp_path, src)
    assert len(torch.load(path, weights_only=True)["state_dict"]) == 202  # spec g
    dst = birealnet18(quantizer="snn", tau=5)
    missing, unexpected = load_official_checkpoint(path, dst)
    assert not missing and not unexpected
    assert torch.equal(dst.layer3[1].binary_conv.binarize.patterns, src.layer3[1].binary_conv.binarize.patterns)
    assert int(dst.layer1[0].binary_conv.binarize.step) == 0


def test_odd_keys_and_other_tau_are_named(tmp_path: Path) -> None:
    path = _official_file(tmp_path, mini_net(quantizer="snn", tau=2), drop=("fc.bias",))
    with pytest.raises(UserError, match="fc.bias"):
        load_official_checkpoint(path, mini_net(quantizer="snn", tau=2))
    path = _official_file(tmp_path, mini_net(quantizer="snn", tau=3))
    with pytest.raises(UserError, match="tau=3"):
        load_official_checkpoint(path, mini_net(quantizer="snn", tau=2))
    (tmp_path / "bad.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_official_checkpoint(tmp_path / "bad.pth.tar", mini_net(quantizer="snn", tau=2))


def test_snn_checkpoint_seeds_a_sparks_model(tmp_path: Path) -> None:
    snn = mini_net(quantizer="snn", tau=2)
    path = _official_file(tmp_path, snn)
    sparks = mini_net(quantizer="sparks", tau=2).eval()
    assert not any(load_official_checkpoint(path, sparks))
    for (_, a), (_, b) in zip(snn.binary_convs(), sparks.binary_convs()):
        assert torch.equal(b.selector.frozen_ids(), codeword_ids(a.binarize.patterns))


def test_seed_sparks_layer_from_snn_layer() -> None:
    snn = HardBinaryConv(4, 6, quantizer="snn", tau=3, rng=random.Random(0))
    sparks = HardBinaryConv(4, 6, quantizer="sparks", tau=3).eval()
    seed_sparks_from_snn(sparks, snn)
    assert torch.equal(sparks.selector.frozen_ids(), snn.binarize.codeword_ids())
    x = torch.randn(1, 4, 5, 5).sign()
    snn.eval()
    assert torch.equal(sparks(x), snn(x))  # same codewords, same weights: the same layer


def test_small_patterns_warn(tmp_path: Path) -> None:
    model = mini_net(quantizer="snn", tau=1)
    sd = model.state_dict()
    sd["layer1.0.binary_conv.binarize.patterns"][0, 0] = 1e-4
    with pytest.warns(UserWarning, match="1e-3"):
        checkpoint_filter_fn(sd, model)
