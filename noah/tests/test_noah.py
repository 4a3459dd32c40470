"""The head's invariants (spec h.2-h.12) on the torch-only core."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noah.noah import NOAH, ValueDropout

SPLITS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.fixture(autouse=True)
def _float64():
    """These tests compare maths: float64 tensors by default, restored after each test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def head(c: int = 24, k: int = 5, n: int = 3, r: float = 0.5, p: float = 0.0, hs: bool = True, kv: bool = True,
         seed: int = 0) -> NOAH:
    torch.manual_seed(seed)
    h = NOAH(c, k, head_num=n, key_ratio=r, dropout=p, head_split=hs, kv_split=kv).double().eval()
    with torch.no_grad():  # non-zero biases so that every path is exercised
        h.query.bias.normal_()
        h.value.bias.normal_()
    return h


def block_linear(h: NOAH) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer NOAH reduces to when its attention is uniform: ``[W_v^0 | ... | W_v^{N-1}]``, sum b_v."""
    n, k = h.head_num, h.num_classes
    w = h.value.weight.view(n, k, -1)  # (N, K, v/G)
    if h.groups == 1:
        weight = w.sum(0)  # every block reads all value channels
    else:
        weight = w.permute(1, 0, 2).reshape(k, -1)
    return weight, h.value.bias.view(n, k).sum(0)


def value_part(h: NOAH, x: torch.Tensor) -> torch.Tensor:
    return x[:, h.k_channels:] if h.kv_split else x


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_three_layouts_give_identical_logits(hs: bool, kv: bool) -> None:
    h = head(hs=hs, kv=kv)
    x = torch.randn(2, 24, 3, 4)
    ref = h(x)
    assert ref.shape == (2, 5)
    torch.testing.assert_close(h(x.flatten(2)), ref, rtol=0, atol=0)
    torch.testing.assert_close(h(x.flatten(2).unsqueeze(-1)), ref, rtol=0, atol=0)
    torch.testing.assert_close(h(x.to(memory_format=torch.channels_last)), ref)


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_inference_path_equals_spec_formula(hs: bool, kv: bool) -> None:
    """The in-place inference path (no grad) = the autograd path = spec b.2 written with the official grouped convs
    on the (B, C, 1, L) view."""
    h = head(p=0.3, hs=hs, kv=kv)
    x = torch.randn(3, 24, 2, 3)
    with torch.inference_mode():
        fast = h(x)
    with torch.enable_grad():
        graph = h(x.requires_grad_())
    xl = x.detach().flatten(2).unsqueeze(2)  # (B, C, 1, L)
    keys = xl[:, : h.k_channels] if kv else xl
    a = F.conv2d(keys, h.query.weight, h.query.bias, groups=h.groups).view(3, h.head_num, 5, -1)
    v = F.conv2d(value_part(h, xl), h.value.weight, h.value.bias, groups=h.groups).view(3, h.head_num, 5, -1)
    ref = (a.softmax(-1) * v).sum((1, 3))
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(graph.detach(), ref, rtol=0, atol=1e-12)
    assert fast.is_contiguous() and fast.shape == (3, 5)


@pytest.mark.parametrize(("c", "n", "r", "kv"), [(24, 5, 0.5, True), (30, 4, 0.5, True), (10, 4, 0.3, True),
                                                  (6, 4, 0.5, False), (24, 3, 0.0, True), (24, 3, 1.0, True),
                                                  (24, 0, 0.5, True)])
def test_invalid_split_is_one_line_error(c: int, n: int, r: float, kv: bool) -> None:
    with pytest.raises(ValueError) as err:
        NOAH(c, 7, head_num=n, key_ratio=r, kv_split=kv)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("NOAH") and ("head_num" in msg or "key_ratio" in msg)


def test_k_channels_is_int_of_c_times_r() -> None:
    h = NOAH(40, 3, head_num=8, key_ratio=0.2)  # int(40 * 0.2) = 8, v = 32
    assert (h.k_channels, h.v_channels) == (8, 32)
    assert h.query.weight.shape == (24, 1, 1, 1) and h.value.weight.shape == (24, 4, 1, 1)


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_permutation_and_upsampling_invariance(hs: bool, kv: bool) -> None:
    h = head(hs=hs, kv=kv)
    x = torch.randn(2, 24, 3, 4)
    ref = h(x)
    perm = torch.randperm(12)
    torch.testing.assert_close(h(x.flatten(2)[:, :, perm]), ref)
    torch.testing.assert_close(h(F.interpolate(x, scale_factor=3, mode="nearest")), ref)


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_single_position_is_a_linear_layer_on_values(hs: bool, kv: bool) -> None:
    h = head(hs=hs, kv=kv)
    x = torch.randn(3, 24, 1, 1)
    weight, bias = block_linear(h)
    out = h(x)
    torch.testing.assert_close(out, F.linear(value_part(h, x.flatten(1)), weight, bias))
    out.sum().backward()
    assert h.query.weight.grad.abs().max() == 0 and h.query.bias.grad.abs().max() == 0


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_zero_query_is_gap_then_linear(hs: bool, kv: bool) -> None:
    h = head(hs=hs, kv=kv)
    with torch.no_grad():
        h.query.weight.zero_()
    x = torch.randn(2, 24, 4, 5)
    weight, bias = block_linear(h)
    torch.testing.assert_close(h(x), F.linear(value_part(h, x.mean((2, 3))), weight, bias))


def test_softmax_shift_invariance_on_key_channels() -> None:
    h = head()
    x = torch.randn(2, 24, 3, 3)
    shifted = x.clone()
    shifted[:, : h.k_channels] += torch.randn(1, h.k_channels, 1, 1)
    torch.testing.assert_close(h(shifted), h(x))


@pytest.mark.parametrize(("hs", "kv"), SPLITS)
def test_gradient_structure(hs: bool, kv: bool) -> None:
    h = head(hs=hs, kv=kv)
    x = torch.randn(4, 24, 3, 3, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    logits = h(x)
    dlogits = torch.autograd.grad(F.cross_entropy(logits, target), logits, retain_graph=True)[0]
    F.cross_entropy(logits, target).backward()
    assert h.query.bias.grad.abs().max() < 1e-15  # dead: softmax is shift invariant
    rows = h.value.bias.grad.view(h.head_num, h.num_classes)
    for row in rows:
        torch.testing.assert_close(row, dlogits.sum(0))


def test_key_gradient_vanishes_when_values_are_constant_over_positions() -> None:
    h = head()
    x = torch.randn(2, 24, 3, 3)
    x[:, h.k_channels:] = torch.randn(2, h.v_channels, 1, 1)  # every value position equal
    x.requires_grad_(True)
    h(x).pow(2).sum().backward()
    assert x.grad[:, : h.k_channels].abs().max() < 1e-14
    assert x.grad[:, h.k_channels:].abs().max() > 1e-6


def test_convexity_bound() -> None:
    h = head(n=3)
    x = torch.randn(5, 24, 4, 4)
    _, values = h.attention_and_values(x)  # (B, N, K, L)
    out = h(x)
    assert torch.all(values.amin(-1).sum(1) <= out + 1e-12) and torch.all(out <= values.amax(-1).sum(1) + 1e-12)


def test_dropout_only_masks_values() -> None:
    h = head(p=0.5)
    x = torch.randn(2, 24, 3, 3)
    assert torch.equal(h(x), h(x))  # eval: deterministic
    h.train()
    attn_logits, values = h.attention_and_values(x)
    torch.manual_seed(1)
    out = h(x)
    torch.manual_seed(1)
    draw = torch.rand(values.shape[1:3] + values.shape[:1] + values.shape[3:], dtype=values.dtype)  # (N, K, B, L) order
    kept = draw.permute(2, 0, 1, 3) >= 0.5
    torch.testing.assert_close(out, (attn_logits.softmax(-1) * values * kept / 0.5).sum((1, 3)))
    assert not torch.allclose(out, h.eval()(x))
    h0 = head(p=0.0)
    torch.testing.assert_close(h0.train()(x), h0.eval()(x), rtol=0, atol=0)


def test_value_dropout_is_inverted_dropout() -> None:
    """ValueDropout keeps each value with probability 1 - p, scaled by 1 / (1 - p); identity in eval or at p = 0."""
    torch.manual_seed(0)
    x = torch.rand(200_000) + 1.0
    drop = ValueDropout(0.3).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert torch.equal(drop.eval()(x), x) and torch.equal(ValueDropout(0.0).train()(x), x)
    assert isinstance(drop, torch.nn.Dropout)


def test_init_kaiming_fan_out() -> None:
    torch.manual_seed(0)
    h = NOAH(2048, 1000, head_num=4, key_ratio=0.125)
    std = math.sqrt(2 / 4000)
    for conv in (h.query, h.value):
        assert abs(conv.weight.std().item() / std - 1) < 0.01
        assert torch.count_nonzero(conv.bias) == 0


def test_head_macs() -> None:
    """Spec h.12 / b.3: the convs cost C*K*L MACs, C*K*(L - 1) more than a linear head."""
    from common.profiling import count_flops

    torch.set_default_dtype(torch.float32)
    try:
        h = NOAH(1280, 1000, head_num=8, key_ratio=0.25)
        macs = count_flops(h, torch.randn(1, 1280, 7, 7))["macs"]
    finally:
        torch.set_default_dtype(torch.float64)
    assert macs == 1280 * 1000 * 49  # the two GEMMs; the softmax / product / sum are not counted as MACs
