"""Unit tests of the core (spec h: DCT, the two views, CAP shapes and queries, KD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scalekd.scalekd import (
    CrossAttentionProjector,
    DualViewFeatureMimicking,
    LayerNorm2d,
    ScaleKDLoss,
    dct_2d,
    dct_matrix,
    frequency_view_loss,
    idct_2d,
    idct_matrix,
    kd_loss,
    remove_dc,
    spatial_view_loss,
)


@pytest.mark.parametrize("n", [5, 7, 14, 16])
def test_dct_matrix_definition_and_inverse(n: int) -> None:
    m = dct_matrix(n, torch.float64)
    i, k = 3 % n, 2 % n
    assert m[i, k].item() == pytest.approx(2 * math.cos(math.pi * k * (2 * i + 1) / (2 * n)), abs=1e-12)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(m @ idct_matrix(n, torch.float64), eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(idct_matrix(n, torch.float64) @ m, eye, atol=1e-10, rtol=0)
    x = torch.randn(2, 3, n, n)
    torch.testing.assert_close(idct_2d(dct_2d(x)), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dct_2d(idct_2d(x)), x, atol=1e-4, rtol=1e-5)


def test_dct_matches_scipy_convention() -> None:
    """y = x @ M is scipy's dct(type=2, norm=None) along the last axis: y_k = 2 sum_n x_n cos(pi k (2n+1)/2N)."""
    x = torch.randn(4, 7, dtype=torch.float64)
    n = torch.arange(7, dtype=torch.float64)
    ref = torch.stack([2 * (x * torch.cos(torch.pi * k * (2 * n + 1) / 14)).sum(-1) for k in range(7)], -1)
    torch.testing.assert_close(x @ dct_matrix(7, torch.float64), ref)


def test_frequency_view_equals_mean_subtraction() -> None:
    x = torch.randn(2, 8, 7, 7) * 3 + 1
    torch.testing.assert_close(remove_dc(x, "dct"), remove_dc(x, "mean"), atol=1e-5, rtol=1e-5)
    p, t = torch.randn(2, 49, 8), torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(frequency_view_loss(p, t, 0.06, "dct"), frequency_view_loss(p, t, 0.06, "mean"))
    with pytest.raises(ValueError, match="frequency_view"):
        remove_dc(x, "fft")


def test_view_losses_invariances_and_bounds() -> None:
    torch.manual_seed(0)
    b, c, h, w = 3, 16, 7, 7
    p, t = torch.randn(b, h * w, c), torch.randn(b, c, h, w)
    alpha = 0.08
    sp = spatial_view_loss(p, t, alpha)
    assert 0 <= sp.item() <= 4 * h * w * alpha
    scale = torch.rand(b, h * w, 1) + 0.1  # positive, per position
    torch.testing.assert_close(spatial_view_loss(p * scale, t, alpha), sp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spatial_view_loss(p, t * scale.transpose(1, 2).reshape(b, 1, h, w), alpha), sp,
                               rtol=1e-5, atol=1e-6)
    pm = p.transpose(1, 2).reshape(b, c, h, w)
    assert spatial_view_loss(pm, pm.clone()).item() == pytest.approx(0, abs=1e-6)
    fr = frequency_view_loss(p, t, alpha)
    assert 0 <= fr.item() <= 4 * h * w * alpha
    offset = torch.randn(b, c, 1, 1) * 5  # per-channel constants vanish in the frequency view
    torch.testing.assert_close(frequency_view_loss(p, t + offset, alpha), fr, rtol=1e-4, atol=1e-5)
    assert frequency_view_loss(pm, pm + offset).item() == pytest.approx(0, abs=1e-5)
    assert not torch.allclose(spatial_view_loss(p, t + offset, alpha), sp)  # the spatial view does see them


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_cap_shapes_any_key_grid_to_any_query_grid(norm: str) -> None:
    cap = CrossAttentionProjector(24, 32, query_hw=(7, 7), pos_hw=(14, 14), num_heads=4, norm=norm)
    assert cap(torch.randn(2, 24, 14, 14)).shape == (2, 49, 32)
    v2 = CrossAttentionProjector(24, 32, query_hw=5, num_heads=8)
    assert v2(torch.randn(3, 24, 5, 5)).shape == (3, 25, 32)
    with pytest.raises(ValueError, match="student map"):
        v2(torch.randn(3, 24, 7, 7))


def test_cap_state_dict_names_and_defaults() -> None:
    cap = CrossAttentionProjector(8, 16, query_hw=(2, 2))
    assert cap.num_heads == 8 and cap.softmax_scale == 1.0 and cap.query is not None  # official defaults
    names = set(cap.state_dict())
    assert {"pos_embed", "query.weight", "proj_pos.0.weight", "proj_student.0.weight", "proj_student.1.running_var",
            "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight", "mlp.fc1.weight",
            "mlp.fc2.weight", "norm.weight"} <= names
    assert cap.pos_embed.abs().max() <= 2.0 and 0.01 < cap.pos_embed.std() < 0.03
    assert isinstance(CrossAttentionProjector(8, 16, 2, norm="layernorm").proj_student[1], LayerNorm2d)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionProjector(8, 18, 2, num_heads=4)


def test_cap_self_query_samples_independent_in_eval() -> None:
    cap = CrossAttentionProjector(8, 16, query_hw=(3, 3), num_heads=2).eval()
    x = torch.randn(4, 8, 3, 3)
    full = cap(x)
    torch.testing.assert_close(cap(x[2:3]), full[2:3], rtol=1e-5, atol=1e-6)


def test_cap_supplied_query_overrides_learnable() -> None:
    cap = CrossAttentionProjector(8, 16, query_hw=(3, 3), num_heads=2)
    q = torch.randn(2, 9, 16, requires_grad=True)
    out = cap(torch.randn(2, 8, 3, 3), q)
    out.sum().backward()
    assert cap.query.weight.grad is None and q.grad is not None
    no_query = CrossAttentionProjector(8, 16, query_hw=(3, 3), num_heads=2, self_query=False)
    with pytest.raises(ValueError, match="pass `query`"):
        no_query(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="queries must be"):
        cap(torch.randn(2, 8, 3, 3), torch.randn(2, 4, 16))


def test_cap_query_path_has_relu() -> None:
    """Queries go through ReLU(conv1x1): queries that the 1x1 conv maps below zero all act alike."""
    cap = CrossAttentionProjector(8, 16, query_hw=(1, 2), num_heads=2, self_query=False).eval()
    with torch.no_grad():
        cap.proj_pos[0].weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        cap.proj_pos[0].bias.zero_()
    x = torch.randn(1, 8, 1, 2)
    torch.testing.assert_close(cap(x, -torch.rand(1, 2, 16)), cap(x, -5 * torch.rand(1, 2, 16)))


def test_dfm_scalar_softmax_scale_and_bad_alpha() -> None:
    m = DualViewFeatureMimicking(8, 16, 3, alpha=(0.08, 0.06), softmax_scale=5.0, num_heads=2)
    assert m.cap_spatial.softmax_scale == m.cap_frequency.softmax_scale == 5.0  # released Swin-B scalar
    sp, fr = m(torch.randn(2, 8, 3, 3), torch.randn(2, 16, 3, 3))
    assert sp.ndim == fr.ndim == 0
    with pytest.raises(ValueError, match="alpha"):
        DualViewFeatureMimicking(8, 16, 3, alpha=(0.1,))
    with pytest.raises(ValueError, match="query grid"):
        m.spatial_loss(torch.randn(2, 9, 16), torch.randn(2, 16, 4, 4))


def test_kd_loss_identities() -> None:
    zs, zt = torch.randn(5, 10), torch.randn(5, 10)
    factor, loss = kd_loss(zs, zt, temperature=1.0, alpha=0.5)
    pt = F.softmax(zt, 1)
    assert factor == 0.5
    torch.testing.assert_close(loss, -0.5 * (pt * F.log_softmax(zs, 1)).sum(1).mean())
    entropy = -(pt * pt.log()).sum(1).mean()
    kl = F.kl_div(F.log_softmax(zs, 1), pt, reduction="batchmean")
    torch.testing.assert_close(loss - 0.5 * entropy, 0.5 * kl)
    _, l4 = kd_loss(zs, zt, temperature=4.0, alpha=1.0)
    torch.testing.assert_close(l4, -16 * (F.softmax(zt / 4, 1) * F.log_softmax(zs / 4, 1)).sum(1).mean())
    assert kd_loss(zs, zt)[0] == 0.5  # official defaults T=4, alpha=0.5
    assert torch.isfinite(kd_loss(torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]]))[1])


def test_scalekd_loss_requires_learnable_stage3_queries() -> None:
    with pytest.raises(ValueError, match="learnable queries"):
        ScaleKDLoss(DualViewFeatureMimicking(8, 16, 3, alpha=(1, 1), self_query=False), None)
