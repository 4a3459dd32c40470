"""Invariants of the method core (spec section h): SGT algebra, learnable SGT modes, (D-)GridConv,
kernel attention and its temperature, the temperature schedule, and the evaluation protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.metrics import procrustes_align
from gridconv.gridconv import (
    HANDCRAFTED_LAYOUT,
    SGT_PRIORS,
    GridConv,
    GridLiftingNetwork,
    KernelAttention,
    LearnableSGT,
    SemanticGridTransform,
    annealed_temperature,
    handcrafted_sgt_matrices,
)
from gridconv.metrics import evaluate_actionwise, pck_auc


def random_pose(n: int = 8, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 17, c, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- SGT
def test_handcrafted_sgt_algebra() -> None:
    m, p = handcrafted_sgt_matrices()
    torch.testing.assert_close(p @ m, torch.eye(17, dtype=torch.float64))
    torch.testing.assert_close(m.sum(1), torch.ones(25, dtype=torch.float64))
    proj = m @ p
    torch.testing.assert_close(proj @ proj, proj)
    assert not torch.allclose(proj, torch.eye(25, dtype=torch.float64))
    assert HANDCRAFTED_LAYOUT[12] == (8, 9)


def test_handcrafted_centre_cell_and_inverse_ignores_it() -> None:
    sgt = SemanticGridTransform()
    pose = random_pose()
    grid = sgt(pose)
    torch.testing.assert_close(grid[:, :, 2, 2], 0.5 * (pose[:, 8] + pose[:, 9]))
    torch.testing.assert_close(sgt.inverse(grid), pose, atol=1e-6, rtol=0)
    poked = grid.clone()
    poked[:, :, 2, 2] += 100.0
    torch.testing.assert_close(sgt.inverse(poked), sgt.inverse(grid))


@pytest.mark.parametrize("prior", sorted(SGT_PRIORS))
def test_learnable_sgt_layouts_cover_their_joints(prior: str) -> None:
    sgt = LearnableSGT(prior=prior).eval()
    covered = set(sgt.cell_to_joint())
    pose = random_pose()
    to_grid, to_pose = sgt.matrices()
    back = torch.einsum("jq,bqc->bjc", to_pose, torch.einsum("qj,bjc->bqc", to_grid, pose))
    if prior == "learnt_type3":  # the only prior without the pelvis: its output is exactly 0
        assert covered == set(range(17)) - {0}
        assert torch.all(back[:, 0] == 0)
        torch.testing.assert_close(back[:, 1:], pose[:, 1:])
    else:
        assert covered == set(range(17))
        torch.testing.assert_close(back, pose)


def test_learnable_sgt_modes_and_gradients() -> None:
    torch.manual_seed(0)
    net = GridLiftingNetwork(hidden_size=16, num_blocks=1, sgt="learnable").eval()
    x, y = random_pose(4, 2), random_pose(4, 3, seed=1)
    frozen = net(x)
    net.forward_train(x, y)[1]["loss_mse"].backward()
    assert net.sgt.logits.grad is None  # frozen: the official behaviour
    net.sgt.train()
    net.sgt.mode = "ste"
    torch.testing.assert_close(net(x), frozen, rtol=0, atol=0)  # one-hot prior: identical forward
    net.forward_train(x, y)[1]["loss_mse"].backward()
    assert net.sgt.logits.grad is not None and net.sgt.logits.grad.abs().sum() > 0
    net.sgt.mode = "gumbel"
    soft = net.sgt.assignment()
    torch.testing.assert_close(soft.sum(-1), torch.ones(25))
    assert ((soft > 0) & (soft < 1)).any()
    net.sgt.eval()  # evaluation always uses the hard argmax
    torch.testing.assert_close(net(x), frozen, rtol=0, atol=0)


def test_learnable_sgt_other_grid_sizes() -> None:
    net = GridLiftingNetwork(hidden_size=16, num_blocks=1, sgt="learnable", sgt_prior="random_prob",
                             grid_shape=(4, 6)).eval()
    assert net(random_pose(3, 2)).shape == (3, 17, 3)
    with pytest.raises(ValueError, match="5x5"):
        LearnableSGT(grid_shape=(4, 6), prior="standard")
    with pytest.raises(ValueError, match="handcrafted"):
        GridLiftingNetwork(sgt="handcrafted", grid_shape=(4, 6))


# ---------------------------------------------------------------- (D-)GridConv
def test_plain_gridconv_is_circular_plus_zero_conv() -> None:
    torch.manual_seed(0)
    conv = GridConv(4, 6, padding_mode=("c", "z"), dynamic=False)
    x = torch.randn(2, 4, 5, 5)
    ref = (F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight[0], conv.bias[0])
           + F.conv2d(x, conv.weight[1], conv.bias[1], padding=1))
    torch.testing.assert_close(conv(x), ref)


@pytest.mark.parametrize("value", [1.0, 0.5])
def test_dgridconv_with_constant_attention(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    torch.manual_seed(0)
    dyn = GridConv(4, 6, padding_mode=("c", "r"), dynamic=True)
    plain = GridConv(4, 6, padding_mode=("c", "r"), dynamic=False)
    plain.load_state_dict({k: v for k, v in dyn.state_dict().items() if not k.startswith("attention")})
    monkeypatch.setattr(dyn.attention, "forward", lambda x: torch.full((x.shape[0], 9, 5, 5), value))
    x = torch.randn(3, 4, 5, 5)
    bias = dyn.bias.sum(0).view(1, -1, 1, 1)
    torch.testing.assert_close(dyn(x) - bias, value * (plain(x) - bias), atol=1e-5, rtol=1e-5)


def test_dgridconv_circular_equivariance(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    conv = GridConv(3, 5, padding_mode=("c", "c"), dynamic=True)
    monkeypatch.setattr(conv.attention, "forward", lambda x: torch.full((x.shape[0], 9, 5, 5), 0.7))
    x = torch.randn(2, 3, 5, 5)
    for shift in ((1, 0), (0, 2), (3, 4)):
        shifted = conv(x.roll(shift, (2, 3)))
        torch.testing.assert_close(shifted, conv(x).roll(shift, (2, 3)), atol=1e-5, rtol=0)


def test_kernel_attention_range_temperature_and_state() -> None:
    torch.manual_seed(0)
    att = KernelAttention(32).eval()
    x = torch.randn(4, 32, 5, 5)
    a = att(x)
    assert a.shape == (4, 9, 5, 5) and a.min() > 0 and a.max() < 1
    att.temperature.fill_(1e9)
    torch.testing.assert_close(att(x), torch.full_like(a, 0.5))
    net = GridLiftingNetwork(hidden_size=16, num_blocks=1)
    net.set_temperature(2.5)
    state = net.state_dict()
    assert sum(k.endswith("attention.temperature") for k in state) == 4
    fresh = GridLiftingNetwork(hidden_size=16, num_blocks=1)
    assert fresh.temperature == 30.0
    fresh.load_state_dict(state)
    assert fresh.temperature == 2.5


def test_eval_mode_gradient_flow() -> None:
    torch.manual_seed(0)
    net = GridLiftingNetwork(hidden_size=16, num_blocks=2, sgt="learnable").eval()
    net.forward_train(random_pose(4, 2), random_pose(4, 3))[1]["loss_mse"].backward()
    for name, p in net.named_parameters():
        assert (p.grad is None) == (name == "sgt.logits"), name
    assert all(not b.requires_grad for b in net.buffers())


def test_handcrafted_loss_is_on_the_grid() -> None:
    torch.manual_seed(0)
    net = GridLiftingNetwork(hidden_size=16, num_blocks=1).eval()
    x, y = random_pose(4, 2), random_pose(4, 3, seed=1)
    _, losses = net.forward_train(x, y)
    sgt = SemanticGridTransform()
    torch.testing.assert_close(losses["loss_mse"], F.mse_loss(net.forward_grid(sgt(x)), sgt(y)))


def test_temperature_schedule() -> None:
    n = 7800
    assert annealed_temperature(0, 0, n) == 30.0
    assert annealed_temperature(0, n // 2, n) == pytest.approx(28.55)
    assert annealed_temperature(5, 0, n) == pytest.approx(15.5)
    last = 1 + 29 / (10 * n)
    assert annealed_temperature(9, n - 1, n) == pytest.approx(last)
    assert annealed_temperature(50, 10, n) == pytest.approx(last)  # frozen after the annealing


def test_temperature_schedule_matches_fixture() -> None:
    from common.testing import fixture_dir

    path = fixture_dir("gridconv") / "dgridconv_small.pt"
    if not path.is_file():
        pytest.skip("fixture dgridconv_small.pt not present")
    rows = torch.load(path, weights_only=True)["schedules"]["temperature_rows_[epoch,iter,iters_per_epoch,T]"]
    for epoch, it, n, t in rows:
        if epoch < 10:
            assert annealed_temperature(int(epoch), int(it), int(n)) == pytest.approx(t, abs=1e-9)


# ---------------------------------------------------------------- metrics
def test_metric_identities() -> None:
    gt = random_pose(30) * 200
    actions = ["A"] * 20 + ["B"] * 10
    assert evaluate_actionwise(gt, gt, actions)["mean_mm"] == 0.0
    pred = gt + torch.randn_like(gt) * 20
    ang = 0.7
    rot = torch.tensor([[math.cos(ang), 0, math.sin(ang)], [0, 1, 0], [-math.sin(ang), 0, math.cos(ang)]],
                       dtype=gt.dtype)
    moved = 1.3 * pred @ rot + torch.tensor([10.0, -5.0, 40.0])
    p1 = evaluate_actionwise(pred, gt, actions, procrustes=True)["mean_mm"]
    p2 = evaluate_actionwise(moved, gt, actions, procrustes=True)["mean_mm"]
    assert p1 == pytest.approx(p2, rel=1e-6)
    aligned = procrustes_align(pred.double(), gt.double())
    assert ((aligned - gt) ** 2).sum() <= ((pred - gt) ** 2).sum()
    frame_wise = (pred - gt).norm(dim=-1).mean().item()
    action_wise = evaluate_actionwise(pred, gt, actions)["mean_mm"]
    assert action_wise != pytest.approx(frame_wise, rel=1e-9)


def test_pck_auc() -> None:
    gt = torch.zeros(2, 17, 3)
    pred = gt.clone()
    pred[:, :, 0] = torch.linspace(0, 300, 17)
    out = pck_auc(pred, gt, ["GS", "Outdoor"])
    assert out["pck"] == pytest.approx(100 * 8 / 17) == out["pck/GS"] == out["pck/Outdoor"]
    assert 0 < out["auc"] < out["pck"]
    assert pck_auc(gt, gt)["auc"] == pytest.approx(100 * 30 / 31)  # threshold 0 counts no joint
