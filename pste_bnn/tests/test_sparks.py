"""The CPU-checkable invariants of spec h.1-15 (h.11-12 are the `param` tests in test_params.py)."""

from __future__ import annotations

import random

import pytest
import torch

from pste_bnn.models import BinaryActivation, mini_net
from pste_bnn.sparks import (
    ExportedBinaryConv,
    HardBinaryConv,
    PermutationSelector,
    SelectionSchedule,
    SNNBinarize,
    channel_scale,
    codebook,
    codeword_ids,
    frequent_codewords,
    gumbel_noise,
    hungarian,
    log_sinkhorn,
    nearest_codeword,
    official_bnum,
    pste_codebooks,
    quantize_to_codebook,
    select_codebooks,
    sinkhorn,
)

U = codebook()


def test_h01_codebook_msb_first() -> None:
    assert U.shape == (512, 9)
    assert torch.unique(U, dim=0).shape[0] == 512 and torch.all((U * U).sum(1) == 9)
    assert torch.equal(U[1], torch.tensor([-1.0] * 8 + [1.0]))
    assert torch.equal(U[256], torch.tensor([1.0] + [-1.0] * 8))
    assert torch.equal(codeword_ids(U), torch.arange(512))
    lsb = ((U > 0).long() * (2 ** torch.arange(9))).sum(1)  # the official patterns2bnum
    assert torch.equal(official_bnum(torch.arange(512)), lsb) and lsb[1] == 256 and lsb[256] == 1


def test_h02_bnn_equivalence_and_distance_equals_inner_product() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4000, 9, generator=g)
    assert torch.equal(U[nearest_codeword(w, U)], torch.sign(w))
    for n in (2, 7, 32, 100):
        sub = U[torch.randperm(512, generator=g)[:n]]
        assert torch.equal(nearest_codeword(w, sub), torch.cdist(w, sub).argmin(1))


def test_h03_selection_never_repeats_a_codeword() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(10):  # 10 batches x 10 draws = 100 random (X, noise) pairs
        x = torch.randn(10, 512, 512, generator=g) * float(torch.rand(1, generator=g) * 3)
        perm = hungarian(x + gumbel_noise(x.shape, g))
        assert all(torch.equal(p.sort().values, torch.arange(512)) for p in perm)
        assert all(p[:32].unique().numel() == 32 for p in perm)


def test_h04_pste_forward_is_exact() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 512, 512, generator=g).requires_grad_(True)
    words, ids = pste_codebooks(x, 16, 0.3, 5, gumbel_noise(x.shape, g), 1.0)
    assert torch.equal(words.detach(), U[ids])  # no 1-ulp error: the brackets of b.6 are kept
    w = torch.randn(8, 4, 3, 3, generator=g)
    b, idx = quantize_to_codebook(w, words[0])
    assert torch.equal(b.detach(), U[ids[0]][idx].reshape(w.shape))
    assert torch.equal((channel_scale(w) * b).detach(), channel_scale(w) * U[ids[0]][idx].reshape(w.shape))


def test_h05_pste_backward_is_the_hand_written_chain() -> None:
    g = torch.Generator().manual_seed(3)
    n, t, iters = 8, 0.7, 6
    x = torch.randn(512, 512, generator=g, dtype=torch.float64)
    noise = gumbel_noise(x.shape, g, torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    r = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    words, ids = pste_codebooks(xg[None], n, t, iters, noise[None], 1.0)
    b, idx = quantize_to_codebook(w, words[0])
    (channel_scale(w) * b * r).sum().backward()
    # hand-written: dL/dC = A^T (alpha R); g_P = [dL/dC U^T ; 0]; then the VJP of log-space Sinkhorn
    d_c = torch.zeros(n, 9, dtype=torch.float64).index_add_(0, idx, (channel_scale(w) * r).reshape(-1, 9))
    g_p = torch.zeros(512, 512, dtype=torch.float64)
    g_p[:n] = d_c @ U.double().t()
    s = (x + noise).requires_grad_(True)
    (grad_s,) = torch.autograd.grad(log_sinkhorn(s / t, iters).exp(), s, g_p)
    assert torch.allclose(xg.grad, grad_s, atol=1e-12, rtol=1e-9)
    assert (xg.grad.abs() > 0).float().mean() > 0.99  # dense, though g_P[n:] = 0


def test_h06_hungarian_is_invariant_to_temperature_and_sinkhorn() -> None:
    g = torch.Generator().manual_seed(4)
    s = torch.randn(512, 512, generator=g, dtype=torch.float64) + gumbel_noise((512, 512), g, torch.float64)
    pi = hungarian(s)
    for t, iters in ((0.5, 1), (0.1, 20)):
        assert torch.equal(hungarian(s / t), pi)
        assert torch.equal(hungarian(log_sinkhorn(s / t, iters)), pi)


def test_h07_sinkhorn_normalises_and_sharpens() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(64, 64, generator=g, dtype=torch.float64) * 2
    errs = []
    for iters in (1, 5, 50):
        p = sinkhorn(s, 1.0, iters)
        assert torch.allclose(p.sum(0), torch.ones(64, dtype=torch.float64), atol=1e-12)
        errs.append((p.sum(1) - 1).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
    assert not torch.allclose(sinkhorn(s, 1.0, 1), sinkhorn(s, 1.0, 2))  # L is honoured (spec j)
    planted = s * 0.25
    planted[torch.arange(64), torch.randperm(64, generator=g)] += 6.0  # a clear optimum
    hard = torch.zeros(64, 64, dtype=torch.float64)
    hard[torch.arange(64), hungarian(planted)] = 1
    gaps = [(sinkhorn(planted, t, 200) - hard).abs().max().item() for t in (1.0, 0.3, 0.05)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


@pytest.mark.parametrize("scale,t", [(1.0, 0.5), (3.0, 0.05), (40.0, 0.01)])
def test_h07_fast_sinkhorn_equals_log_space_reference(scale: float, t: float) -> None:
    """The scaling form (and, at extreme scale, its log-space fallback) equals log-space autograd."""
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(2, 128, 128, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    grad = torch.randn(2, 16, 128, generator=g, dtype=torch.float64)
    p = sinkhorn(s, t, 10, rows=16)
    (ours,) = torch.autograd.grad(p, s, grad)
    ref_p = log_sinkhorn(s / t, 10).exp()[:, :16]
    (ref,) = torch.autograd.grad(ref_p, s, grad)
    assert torch.allclose(p, ref_p, atol=1e-12)
    assert torch.allclose(ours, ref, atol=1e-9 * max(1.0, ref.abs().max().item()))


def test_h08_quantizer_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(6, 4, 3, 3, generator=g) * 0.9).requires_grad_(True)
    r = torch.randn(6, 4, 3, 3, generator=g)
    words = U[torch.randperm(512, generator=g)[:8]].clone().requires_grad_(True)
    b, idx = quantize_to_codebook(w, words)
    alpha = channel_scale(w)
    assert not alpha.requires_grad
    (alpha * b * r).sum().backward()
    assert torch.equal(w.grad, alpha * r * (w.detach().abs() < 1))
    expect = torch.zeros(8, 9).index_add_(0, idx, (alpha * r).reshape(-1, 9))
    assert torch.allclose(words.grad, expect, atol=1e-6)


def _snn(tau: int = 3, **kw) -> SNNBinarize:
    return SNNBinarize(tau, rng=random.Random(0), **kw)


def test_h09_snn_refinement_every_25th_call() -> None:
    q = _snn(refine_every=25)
    w = torch.randn(4, 3, 3, 3).requires_grad_(True)
    r = torch.randn(4, 3, 3, 3)
    outs = []
    for call in range(1, 26):
        q.patterns.grad = None
        out = q(w)
        (out * r).sum().backward()
        outs.append(out.detach())
        if call < 25:
            assert q.patterns.grad is None or not q.patterns.grad.any()
    idx = nearest_codeword(w.detach(), q.memory)
    assert torch.allclose(q.patterns.grad, torch.zeros(8, 9).index_add_(0, idx, r.reshape(-1, 9)), atol=1e-6)
    assert torch.allclose(outs[0], outs[-1], atol=1e-6)


def test_h09_snn_memory_hysteresis_and_compensation() -> None:
    q = _snn()
    w = torch.randn(4, 3, 3, 3)
    q(w)
    old = q.memory.clone()
    with torch.no_grad():
        q.patterns[0, 0] = -5e-4 * torch.sign(old[0, 0])
        q.patterns[1, 4] = -q.patterns[1, 4]
    q(w)
    assert q.memory[0, 0] == old[0, 0] and q.memory[1, 4] == -old[1, 4]
    with torch.no_grad():
        q.patterns[2] = q.patterns[3] * 2.5  # a duplicate codeword, beyond the clamp
    q.compensate_patterns()
    assert codeword_ids(q.patterns).unique().numel() == 8 and q.patterns.abs().max() <= 3


def test_h09_snn_refine_every_zero_is_inert_and_eval_has_no_side_effects() -> None:
    q = _snn(refine_every=0)
    w = torch.randn(4, 3, 3, 3).requires_grad_(True)
    for _ in range(30):
        q(w).sum().backward()
    assert q.patterns.grad is None and int(q.step) == 30
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(w)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_h09_snn_zero_grad_set_to_none_flag() -> None:
    """False (torch 1.4): after the first refinement `patterns` get a zero gradient on every call."""
    for flag, expect_grad in ((False, True), (True, False)):
        q = _snn(refine_every=2, zero_grad_set_to_none=flag)
        w = torch.randn(4, 3, 3, 3).requires_grad_(True)
        for _ in range(2):
            q(w).sum().backward()
        q.patterns.grad = None
        q(w).sum().backward()  # call 3: not a refinement
        assert (q.patterns.grad is not None) == expect_grad
        if expect_grad:
            assert not q.patterns.grad.any()


def test_h10_binary_activation() -> None:
    x = (torch.arange(-15, 16) / 10).requires_grad_(True)
    y = BinaryActivation()(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.sign(x.detach())) and y[15] == 0
    xd = x.detach()
    expect = torch.where(xd < -1, 0.0, torch.where(xd < 0, 2 + 2 * xd, torch.where(xd < 1, 2 - 2 * xd, 0.0)))
    assert torch.allclose(x.grad, expect, atol=1e-6) and x.grad[5] == 0 and x.grad[25] == 0


@pytest.mark.parametrize("quantizer,tau", [("sparks", 2), ("snn", 2), ("bnn", 9), ("fixed", 3)])
def test_h13_export_round_trip_is_bit_exact(quantizer: str, tau: int) -> None:
    torch.manual_seed(0)
    model = mini_net(quantizer=quantizer, tau=tau)
    if quantizer == "sparks":
        for _, conv in model.binary_convs():
            conv.selector.init_from_weight(conv.weight)
            torch.nn.init.normal_(conv.selector.logits, std=0.5)
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        for name, conv in model.binary_convs():
            layer = conv.export()
            assert layer["index_map"].shape == conv.weight.shape[:2] and layer["ids"].unique().numel() == 2 ** tau
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, ExportedBinaryConv(layer))
        assert torch.equal(model(x), ref)


def dp_replica(module: torch.nn.Module) -> torch.nn.Module:
    """What `nn.parallel.replicate` builds for device 0: `_replicate_for_data_parallel` copies of every
    module (own __dict__, shared buffer tensors), parameters re-attached, children re-linked."""
    copies = {}
    for name, m in module.named_modules():
        r = m._replicate_for_data_parallel()
        r._parameters = dict(m._parameters)
        copies[name] = r
    for name, r in copies.items():
        for child in list(r._modules):
            r._modules[child] = copies[f"{name}.{child}" if name else child]
    return copies[""]


def test_h14_snn_state_survives_state_dict_and_data_parallel_replicas() -> None:
    conv = HardBinaryConv(3, 4, quantizer="snn", tau=2, rng=random.Random(0))
    x = torch.randn(1, 3, 5, 5)
    for _ in range(3):
        conv(x)
    replica = dp_replica(conv)
    for _ in range(4):
        replica(x)
    assert int(conv.binarize.step) == 7  # the official Python int stayed 0 here (b.10)
    clone = HardBinaryConv(3, 4, quantizer="snn", tau=2, rng=random.Random(1))
    clone.load_state_dict(conv.state_dict())
    assert int(clone.binarize.step) == 7 and torch.equal(clone.binarize.memory, conv.binarize.memory)


def test_h14_schedule_is_global_and_checkpointed() -> None:
    model = mini_net(quantizer="sparks", tau=1, schedule_kwargs={"t0": 1.0, "t1": 0.05, "noise_frac": 0.25})
    sch = model.selection_schedule
    assert all(s.schedule is sch for s in model.selectors())
    assert sum(1 for k in model.state_dict() if "selection_schedule" in k) == 2  # one object, not per layer
    sch.set_step(50, 100)
    assert sch.temperature == pytest.approx(0.05 ** 0.5) and sch.noise_factor == 0.0
    sch.set_step(10, 100)
    assert sch.noise_factor == pytest.approx(0.6)
    other = mini_net(quantizer="sparks", tau=1)
    other.load_state_dict(model.state_dict())
    assert int(other.selection_schedule.step) == 10 and other.selection_schedule.noise_factor == pytest.approx(0.6)
    replica = dp_replica(model)
    assert all(s.schedule is sch for s in replica.selectors())
    replica.train()(torch.randn(2, 1, 8, 8))  # a replica's training forward reads the global schedule


def test_h15_fixed_generator_gives_identical_selection() -> None:
    sels = [PermutationSelector(4) for _ in range(2)]
    sch = SelectionSchedule(noise_seed=3)
    sch.set_step(5, 100)
    a = [w.detach() for w in select_codebooks(sels, sch)]
    b = [w.detach() for w in select_codebooks(sels, sch)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sch.set_step(6, 100)
    c = [w.detach() for w in select_codebooks(sels, sch)]
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # fresh noise every step


def test_freq_init_selects_the_most_frequent_codewords() -> None:
    w = torch.randn(64, 32, 3, 3)
    sel = PermutationSelector(8, init="freq")
    sel.init_from_weight(w)
    counts = torch.bincount(codeword_ids(w), minlength=512)
    top = frequent_codewords(w, 8)
    assert torch.equal(counts[top], counts.sort(descending=True).values[:8])
    sel.eval()
    assert torch.equal(sel.frozen_ids(), top)


def test_hard_every_reuses_the_assignment_only_after_noise_is_gone() -> None:
    sels = [PermutationSelector(4, hard_every=3)]
    sch = SelectionSchedule(noise_frac=0.5)
    sch.set_step(10, 100)  # gamma > 0: always solved
    select_codebooks(sels, sch)
    assert int(sels[0].cached_step) == 10
    sch.set_step(60, 100)  # gamma = 0
    select_codebooks(sels, sch)
    with torch.no_grad():
        sels[0].logits[0, 100] = 50.0  # would change the exact assignment
    sch.set_step(61, 100)
    assert int(codeword_ids(select_codebooks(sels, sch)[0].detach())[0]) != 100  # reused
    sch.set_step(63, 100)
    assert int(codeword_ids(select_codebooks(sels, sch)[0].detach())[0]) == 100  # re-solved


def test_rectangular_switch_is_a_different_matching() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 512, 512, generator=g)
    _, full = pste_codebooks(x, 32, 1.0, 2)
    _, rect = pste_codebooks(x, 32, 1.0, 2, rectangular=True)
    assert rect.unique().numel() == 32
    assert (x[0, torch.arange(32), rect[0]].sum() >= x[0, torch.arange(32), full[0]].sum())


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="quantizer"):
        HardBinaryConv(3, 4, quantizer="ternary")
    with pytest.raises(ValueError, match="tau"):
        HardBinaryConv(3, 4, quantizer="snn", tau=10)
    with pytest.raises(ValueError, match="shape"):
        SelectionSchedule(shape="cosine")
    with pytest.raises(ValueError, match="init"):
        PermutationSelector(4, init="random")
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn(torch.zeros(4, 4), 0.0, 3)
