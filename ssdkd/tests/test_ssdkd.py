"""Spec h.9-h.13: SSD-KD's reconstructed parts (no official code: specification tests), the reduction to the
Fast path, exact resume, and the timers."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
from torch import nn

from ssdkd.datafree import (
    NORMALIZE_DICT,
    DataFreeKD,
    FastMetaSynthesizer,
    Generator,
    ImagePool,
    InversionAugment,
    Normalizer,
    StageTimer,
    class_balanced_subset,
)
from ssdkd.ssdkd import SSDKD, ReplayBuffer, SSDKDConfig, beta_schedule, modulating_function

from .conftest import TinyNet


# ------------------------------------------------------------------------------------------- h.9 phi
def test_h9_phi_range_monotone_and_exact():
    torch.manual_seed(0)
    logits = torch.randn(50, 5) * 3
    y = torch.randint(0, 5, (50,))
    ref = torch.randint(0, 5, (200,))
    phi = modulating_function(logits, y, ref, 5)
    assert ((phi >= 0) & (phi <= 1)).all()
    # phi_div = 1 - n_c / |R| exactly
    div = modulating_function(logits, y, ref, 5, use_dif=False)
    n = torch.bincount(ref, minlength=5).float()[logits.argmax(1)]
    torch.testing.assert_close(div, 1 - n / 200)
    # invariant to permuting R
    torch.testing.assert_close(modulating_function(logits, y, ref[torch.randperm(200)], 5), phi)
    # both off -> 1; gamma = 0 -> phi_dif = 1
    assert torch.equal(modulating_function(logits, y, ref, 5, use_div=False, use_dif=False), torch.ones(50))
    assert torch.equal(modulating_function(logits, y, ref, 5, gamma=0.0, use_div=False), torch.ones(50))
    # phi_dif non-increasing in p_T(y|x)
    p = torch.linspace(0.05, 0.95, 19)
    lg = torch.stack([p.log(), (1 - p).log()], 1)
    dif = modulating_function(lg, torch.zeros(19, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2,
                              use_div=False)
    assert (dif[1:] <= dif[:-1]).all()
    alt = modulating_function(logits, y, ref, 5, div_form="balanced_ratio", use_dif=False)
    assert ((alt > 0) & (alt <= 1)).all()
    with pytest.raises(ValueError, match="div_form"):
        modulating_function(logits, y, ref, 5, div_form="log")


# ----------------------------------------------------------------------------------- h.10 priority
def _filled(n: int = 20, c: int = 4, **kw) -> ReplayBuffer:
    torch.manual_seed(1)
    buf = ReplayBuffer(n, c, (3, 4, 4), **kw)
    buf.admit(torch.rand(n, 3, 4, 4), torch.randint(0, c, (n,)), torch.randn(n, c), order_by_phi=False)
    return buf


def test_h10_priority_sampler():
    buf = _filled()
    buf.update_priority(torch.arange(20), torch.rand(20) * 3)
    p = buf.probabilities()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    w = buf.importance_weights(torch.arange(20), beta=0.7)
    assert (w > 0).all() and (w <= 1 + 1e-6).all() and math.isclose(w.max().item(), 1.0, rel_tol=1e-6)
    assert torch.equal(buf.importance_weights(torch.arange(20), beta=0.0), torch.ones(20))
    # stored priority after an update = (d + eps)^alpha
    buf.update_priority(torch.tensor([3]), torch.tensor([0.25]))
    torch.testing.assert_close(buf.priority[3], torch.tensor((0.25 + 1e-6) ** 0.6))
    # a fresh entry gets the current maximum
    qmax = buf.priority.max().clone()
    buf.admit(torch.rand(1, 3, 4, 4), torch.tensor([0]), torch.randn(1, 4), order_by_phi=False)
    assert buf.priority[buf.inserted.argmax()] == qmax
    # deterministic under a fixed generator seed; empirical frequencies within 3 sigma over 1e5 draws
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(buf.sample(64, 0.4, g1)[0], buf.sample(64, 0.4, g2)[0])
    idx, _ = buf.sample(100_000, 0.4, torch.Generator().manual_seed(3))
    freq = torch.bincount(idx, minlength=20).double() / 1e5
    p = buf.probabilities().double()
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / 1e5).sqrt() + 1e-9).all()


def test_h10_alpha_zero_uniform_and_use_priority_off():
    buf = _filled(alpha=0.0)
    buf.update_priority(torch.arange(20), torch.rand(20))
    torch.testing.assert_close(buf.probabilities(), torch.full((20,), 0.05))
    off = _filled(use_priority=False)
    off.update_priority(torch.arange(20), torch.rand(20))
    idx, w = off.sample(32, 0.4)
    assert torch.equal(w, torch.ones(32)) and torch.allclose(off.probabilities(), torch.full((20,), 0.05))


def test_beta_schedule():
    assert beta_schedule(0, 100) == 0.4 and beta_schedule(100, 100) == 1.0 and beta_schedule(500, 100) == 1.0
    assert math.isclose(beta_schedule(50, 100), 0.7)


# ------------------------------------------------------------------------------------ h.11 buffer
def test_h11_buffer_capacity_partial_replacement_alignment():
    torch.manual_seed(2)
    c, cap, k = 4, 10, 3
    buf = ReplayBuffer(cap, c, (1, 2, 2), replace_per_call=k)
    for _ in range(6):
        n = 4
        images = torch.rand(n, 1, 2, 2)
        targets = torch.randint(0, c, (n,))
        logits = torch.randn(n, c) * 3
        # tag each candidate: pixel value encodes (target, first logit) so alignment is checkable
        images[:, 0, 0, 0] = targets.float() / 10
        images[:, 0, 0, 1] = torch.sigmoid(logits[:, 0])
        before_full = len(buf) == cap
        old = buf.images.clone()
        replaced = buf.admit(images, targets, logits)
        assert len(buf) <= cap
        if before_full:
            assert replaced == min(k, n)
            changed = (buf.images != old).flatten(1).any(1).sum().item()
            assert changed == min(k, n)
        got = buf.images[:len(buf)]
        torch.testing.assert_close(got[:, 0, 0, 0], buf.targets[:len(buf)].float() / 10)
        torch.testing.assert_close(got[:, 0, 0, 1], torch.sigmoid(buf.teacher_logits[:len(buf), 0]))


def test_h11_eviction_removes_lowest_phi_ties_by_age():
    c = 2
    buf = ReplayBuffer(4, c, (1, 1, 1), replace_per_call=1)
    # teacher predicts class 0 for the first three, class 1 for the fourth; targets = predictions
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 0.2]])
    buf.admit(torch.rand(4, 1, 1, 1), logits.argmax(1), logits, order_by_phi=False)
    kw = {"gamma": 0.0}  # phi = phi_div only: class 0 is crowded -> lowest phi
    buf.inserted[:] = torch.tensor([3, 1, 2, 4])
    cand = torch.tensor([[0.0, 3.0]])
    buf.admit(torch.rand(1, 1, 1, 1), torch.tensor([1]), cand, **kw)
    assert buf.teacher_logits[1].argmax() == 1 and torch.equal(buf.teacher_logits[1], cand[0])  # oldest class-0


def test_buffer_quantize_uint8_matches_fast_png():
    buf = ReplayBuffer(4, 2, (1, 1, 2), quantize=True)
    x = torch.tensor([[[[0.5, 0.9999]]], [[[0.0, 1.0]]]])
    buf.admit(x, torch.tensor([0, 1]), torch.randn(2, 2), order_by_phi=False)
    assert buf.images.dtype == torch.uint8
    torch.testing.assert_close(buf.get(torch.arange(2)), torch.floor(x * 255) / 255)


# ---------------------------------------------------------------------------- shared tiny harness
def _parts(seed: int = 0, c: int = 4, size: int = 8):
    torch.manual_seed(seed)
    teacher = TinyNet(c).eval().requires_grad_(False)
    student = TinyNet(c, width=4)
    gen = Generator(nz=8, ngf=4, img_size=size)
    aug = InversionAugment(Normalizer(**NORMALIZE_DICT["cifar10"]), padding=1)
    return teacher, student, gen, aug


def _synth(teacher, student, gen, aug, warmup: int) -> FastMetaSynthesizer:
    return FastMetaSynthesizer(teacher, student, gen, num_classes=4, batch_size=12, g_steps=2, lr_g=5e-3,
                               lr_z=0.015, adv=1.1, bn=10.0, oh=0.4, bn_mmt=0.9, is_maml=True, warmup=warmup,
                               reset_l0=True, augment=aug)


def _opt(student):
    opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200, eta_min=2e-4)


def _ssdkd(seed=0, **cfg_kw) -> SSDKD:
    teacher, student, gen, aug = _parts(seed)
    cfg = SSDKDConfig(**{"epochs": 6, "warmup": 1, "kd_steps_per_epoch": 3, "batch_size": 8, **cfg_kw})
    buf = ReplayBuffer(30, 4, (3, 8, 8), replace_per_call=6, use_priority=cfg.use_priority)
    opt, sched = _opt(student)
    return SSDKD(teacher, student, _synth(teacher, student, gen, aug, cfg.warmup), buf, opt, sched, aug, cfg)


# ------------------------------------------------------------------------------- h.12 reduction
def test_h12_reduction_to_fast_path(monkeypatch):
    """phi off, priority off, capacity >= all generated, replace = inf, kd_steps 400: the SSD-KD epoch makes the
    same generator update and the same student steps on the same fixed batch as the Fast baseline code path."""
    kd_steps = 400
    teacher, s_fast, g_fast, aug = _parts(0)
    _, s_ssd, g_ssd, _ = _parts(0)
    opt_f, sch_f = _opt(s_fast)
    opt_s, sch_s = _opt(s_ssd)
    fast = DataFreeKD(teacher, s_fast, _synth(teacher, s_fast, g_fast, aug, 0), ImagePool(quantize=True), opt_f,
                      sch_f, aug, warmup=0, kd_steps=kd_steps, batch_size=8)
    cfg = SSDKDConfig(epochs=1, warmup=0, kd_steps_per_epoch=kd_steps, batch_size=8, use_div=False, use_dif=False,
                      use_priority=False)
    buf = ReplayBuffer(10_000, 4, (3, 8, 8), replace_per_call=10**9, quantize=True, use_priority=False)
    ssd = SSDKD(teacher, s_ssd, _synth(teacher, s_ssd, g_ssd, aug, 0), buf, opt_s, sch_s, aug, cfg)
    fixed = torch.tensor([0, 3, 5, 7, 1, 2, 11, 4])
    monkeypatch.setattr(fast.pool, "sample", lambda b, generator=None: (fixed, fast.pool.get(fixed), None))
    monkeypatch.setattr(buf, "sample", lambda b, beta, generator=None: (fixed, torch.ones(8)))
    torch.manual_seed(123)
    m_fast = fast.run_epoch()
    torch.manual_seed(123)
    m_ssd = ssd.run_epoch()
    for (n, a), b in zip(g_fast.state_dict().items(), g_ssd.state_dict().values()):
        assert torch.equal(a, b), f"generator {n} differs"
    assert torch.equal(fast.pool.images, buf.images[:len(buf)])
    assert m_fast["loss_kd"] == m_ssd["loss_kd"]
    for (n, a), b in zip(s_fast.state_dict().items(), s_ssd.state_dict().values()):
        assert torch.equal(a, b), f"student {n} differs"


# ----------------------------------------------------------------------------------- exact resume
def test_resume_restores_buffer_priorities_generator_meta_adam_bn_history():
    a = _ssdkd(0)
    for _ in range(3):
        a.run_epoch()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = _ssdkd(0)  # same teacher (loaded from its file in real runs); everything else scrambled, then restored
    with torch.no_grad():
        for p in [*b.student.parameters(), *b.synthesizer.generator.parameters()]:
            p.add_(torch.randn_like(p))
    b.run_epoch()
    b.load_state_dict(state)
    rng = torch.get_rng_state()
    assert torch.equal(b.buffer.priority, a.buffer.priority) and b.synthesizer.calls == a.synthesizer.calls
    torch.set_rng_state(rng)
    ma = a.run_epoch()
    torch.set_rng_state(rng)
    mb = b.run_epoch()
    assert ma["loss_kd"] == mb["loss_kd"]
    for (n, x), y in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.equal(x, y), n
    for (n, x), y in zip(a.synthesizer.generator.state_dict().items(), b.synthesizer.generator.state_dict().values()):
        assert torch.equal(x, y), n
    for key in ("images", "priority", "targets", "teacher_logits", "discrepancy"):
        assert torch.equal(getattr(a.buffer, key), getattr(b.buffer, key)), key
    ha, hb = a.synthesizer.bn_loss.state_dict(), b.synthesizer.bn_loss.state_dict()
    assert all(torch.equal(x, y) for x, y in zip(ha["mean"], hb["mean"]))


def test_ssdkd_epochs_warmup_and_accounting():
    m = _ssdkd(0, max_generated=36)
    hist = [m.run_epoch() for _ in range(5)]
    assert "loss_kd" not in hist[0] and "loss_kd" in hist[1]  # warm-up: no KD
    assert hist[-1]["samples_generated"] == 36  # max_generated stops synthesis (3 calls of 12)
    assert hist[-1]["buffer_size"] == 30 and m.kd_step_count == 4 * 3
    assert m.synthesizer.calls == 3
    assert m.optimizer.param_groups[0]["lr"] < 0.2  # scheduler stepped only after warm-up
    full = _ssdkd(0, use_priority=True, phi_in_priority=True)
    full.run_epoch()
    full.run_epoch()
    assert full.buffer.priority[:len(full.buffer)].max() > 0


def test_h13_timers():
    t = StageTimer("cpu")
    with t.stage("inv"):
        time.sleep(0.01)
    with t.stage("kd"):
        time.sleep(0.01)
    s = t.summary()
    assert s["t_inv"] > 0 and s["t_kd"] > 0 and s["t_total"] == s["t_inv"] + s["t_kd"]
    m = _ssdkd(0)
    prev = 0.0
    for _ in range(3):
        out = m.run_epoch()
        assert out["t_total"] == out["t_inv"] + out["t_kd"] and out["t_total"] >= prev >= 0
        assert out["t_synthesis_only"] <= out["t_inv"]
        prev = out["t_total"]
    with pytest.raises(KeyError, match="unknown timer stage"):
        with t.stage("eval"):
            pass


def test_class_balanced_subset_seeded():
    labels = torch.arange(10).repeat_interleave(50)
    a = class_balanced_subset(labels, 100, seed=0)
    assert torch.equal(a, class_balanced_subset(labels, 100, seed=0))
    assert not torch.equal(a, class_balanced_subset(labels, 100, seed=1))
    assert torch.equal(torch.bincount(labels[a]), torch.full((10,), 10))
    with pytest.raises(ValueError, match="requested"):
        class_balanced_subset(labels, 1000, seed=0)


def test_models_stay_in_their_modes():
    m = _ssdkd(0)
    m.run_epoch()
    m.run_epoch()
    assert not m.teacher.training and m.student.training and m.synthesizer.generator.training
    assert isinstance(m.teacher, nn.Module)


def test_h11_replacement_never_exceeds_the_buffer():
    buf = ReplayBuffer(2, 3, (1, 2, 2), replace_per_call=6)
    assert buf.admit(torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,)), torch.randn(5, 3)) == 2
    assert buf.admit(torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,)), torch.randn(5, 3)) == 2
    assert len(buf) == 2
