"""Spec h invariants of the Af-DCD loss module and of the b.1 objective (CPU, small maps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afdcd.afdcd import AfDCDLoss, centre_keep_mask, contrastive_samples, dense_contrastive_loss, random_keep_mask
from afdcd.distiller import SegDistiller, pixel_kd_loss, seg_cross_entropy
from afdcd.models import create_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def maps(b: int = 2, c_s: int = 8, c_t: int = 32, h: int = 16, w: int = 16, seed: int = 0):
    g = gen(seed)
    return torch.randn(b, c_s, h, w, generator=g).relu(), torch.randn(b, c_t, h, w, generator=g).relu()


def reference_contrastive(pred, target, groups, patch, tau, all_negatives=False):
    """The official formulation: cdist over samples, positives = diagonal, negatives gathered by a mask."""
    p, t = contrastive_samples(pred, groups, patch), contrastive_samples(target, groups, patch)
    sim = -torch.cdist(p, t, p=1)
    k = p.shape[1]
    grp = torch.arange(k) % groups
    neg = ~torch.eye(k, dtype=torch.bool) if all_negatives else grp[:, None] != grp[None, :]
    pos = sim.diagonal(dim1=1, dim2=2).reshape(-1, 1)
    negs = sim[neg.expand_as(sim)].reshape(pos.shape[0], -1)
    logits = torch.cat([pos, negs], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="sum") / (
        pred.shape[2] * pred.shape[3])


@pytest.mark.parametrize("mode,all_neg", [("omni", False), ("omni_all", True)])
def test_contrastive_matches_gathered_formulation(mode, all_neg):
    p, t = torch.randn(2, 32, 8, 8, generator=gen(1)), torch.randn(2, 32, 8, 8, generator=gen(2))
    ours = dense_contrastive_loss(p, t, groups=4, patch_size=(4, 2), tau=0.1, mode=mode)
    assert torch.allclose(ours, reference_contrastive(p, t, 4, (4, 2), 0.1, all_neg), rtol=1e-5)


def test_spatial_and_channel_modes_are_their_special_cases():
    p, t = torch.randn(1, 16, 4, 4, generator=gen(3)), torch.randn(1, 16, 4, 4, generator=gen(4))
    spatial = dense_contrastive_loss(p, t, groups=4, patch_size=(2, 2), tau=0.5, mode="spatial")
    assert torch.allclose(spatial, reference_contrastive(p, t, 1, (2, 2), 0.5, True), rtol=1e-5)
    channel = dense_contrastive_loss(p, t, groups=4, patch_size=(2, 2), tau=0.5, mode="channel")
    assert torch.allclose(channel, reference_contrastive(p, t, 4, (1, 1), 0.5, True), rtol=1e-5)
    assert not torch.allclose(spatial, channel)


def test_contrastive_permutation_invariances():
    p, t = torch.randn(2, 32, 8, 8, generator=gen(5)), torch.randn(2, 32, 8, 8, generator=gen(6))
    base = dense_contrastive_loss(p, t, 4, (4, 4), 0.07)
    # (a) the same permutation of the 16 positions inside every patch
    perm = torch.randperm(16, generator=gen(7))

    def permute_positions(x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 4, 4, w // 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 4, w // 4, 16)
        x = x[..., perm].reshape(b, c, h // 4, w // 4, 4, 4).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(b, c, h, w)

    assert torch.allclose(dense_contrastive_loss(permute_positions(p), permute_positions(t), 4, (4, 4), 0.07), base,
                          rtol=1e-5)
    # (b) channel groups permuted jointly, (c) one permutation of the channels inside every group
    gperm = torch.randperm(4, generator=gen(8))
    regroup = lambda x: x.reshape(2, 4, 8, 8, 8)[:, gperm].reshape(2, 32, 8, 8)  # noqa: E731
    assert torch.allclose(dense_contrastive_loss(regroup(p), regroup(t), 4, (4, 4), 0.07), base, rtol=1e-5)
    within = torch.randperm(8, generator=gen(9))
    cperm = torch.cat([g * 8 + within for g in range(4)])
    assert torch.allclose(dense_contrastive_loss(p[:, cperm], t[:, cperm], 4, (4, 4), 0.07), base, rtol=1e-5)


def test_one_group_has_no_negatives_and_identical_maps_are_positive():
    p, t = torch.randn(1, 16, 8, 8, generator=gen(10)), torch.randn(1, 16, 8, 8, generator=gen(11))
    assert dense_contrastive_loss(p, t, groups=1, patch_size=(4, 4), tau=0.07) == 0
    same = dense_contrastive_loss(t, t, groups=4, patch_size=(4, 4), tau=0.07)
    s = contrastive_samples(t, 4, (4, 4))
    d = torch.cdist(s, s, p=1)
    grp = torch.arange(64) % 4
    neg = (grp[:, None] != grp[None, :]).expand_as(d)
    expect = torch.log1p(torch.where(neg, torch.exp(-d / 0.07), torch.zeros_like(d)).sum(-1)).sum() / 64
    assert same > 0 and torch.allclose(same, expect, rtol=1e-5)


def test_loss_module_invariants():
    torch.manual_seed(0)
    module = AfDCDLoss(8, 32, groups=4, pool_size=2, patch_size=(2, 2))
    fs, ft = maps(h=16, w=16)
    keep = random_keep_mask((2, 1, 16, 16), 0.75, generator=gen(1))
    x = fs.clone().requires_grad_(True)
    t = ft.clone().requires_grad_(True)
    loss_fm, loss_ctr = module(x, t, keep)
    (g,) = torch.autograd.grad(loss_fm + loss_ctr, x)
    assert not g[(keep == 0).expand_as(g)].any() and g[(keep == 1).expand_as(g)].abs().sum() > 0
    assert t.grad is None
    # duplicating the batch (same masks) leaves both losses unchanged: per-image normalisation
    fm2, ctr2 = module(torch.cat([fs, fs]), torch.cat([ft, ft]), torch.cat([keep, keep]))
    assert torch.allclose(fm2, loss_fm, rtol=1e-5) and torch.allclose(ctr2, loss_ctr, rtol=1e-5)
    # L_fm = 0 when the reconstruction is the teacher (identity align, zero generator output)
    with torch.no_grad():
        recon = module.reconstruct(fs, keep)
    assert module(fs, recon, keep)[0] == 0


def test_max_pool_path_depends_only_on_window_maxima():
    module = AfDCDLoss(32, 32, groups=4, pool_size=4, patch_size=(2, 2))
    p, t = torch.rand(1, 32, 16, 16, generator=gen(1)), torch.rand(1, 32, 16, 16, generator=gen(2))
    a = dense_contrastive_loss(module.reduce(p), module.reduce(t), 4, (2, 2), 0.07)
    p2 = torch.minimum(p, F.max_pool2d(p, 4).repeat_interleave(4, 2).repeat_interleave(4, 3) - 1e-3)
    p2 = torch.maximum(p2, p * (p == F.max_pool2d(p, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)))
    assert torch.allclose(dense_contrastive_loss(module.reduce(p2), module.reduce(t), 4, (2, 2), 0.07), a)


def test_camvid_crop_path_ignores_row_and_column_44():
    torch.manual_seed(0)
    module = AfDCDLoss(8, 16, groups=4, pool_size=0, crop=44, patch_size=(4, 4))
    fs, ft = maps(b=1, c_s=8, c_t=16, h=45, w=45)
    keep = torch.ones(1, 1, 45, 45)
    fm, ctr = module(fs, ft, keep)
    ft2 = ft.clone()
    ft2[:, :, 44, :] += 1.0
    ft2[:, :, :, 44] += 1.0
    fm2, ctr2 = module(fs, ft2, keep)
    assert torch.equal(ctr, ctr2) and fm2 != fm


def test_masks():
    keep = random_keep_mask((4, 1, 64, 64), 0.75, generator=gen(0))
    assert abs(keep.mean().item() - 0.25) < 0.02
    torch.manual_seed(3)
    u = torch.rand(4, 1, 64, 64)
    torch.manual_seed(3)
    assert torch.equal(random_keep_mask((4, 1, 64, 64), 0.75), (u <= 0.25).float())
    c = centre_keep_mask((1, 1, 16, 24))
    assert c[0, 0, 5:10, 8:16].sum() == 0 and c.sum() == 16 * 24 - 5 * 8
    module = AfDCDLoss(4, 16, groups=4, mask="centre")
    assert torch.equal(module.keep_mask(torch.zeros(2, 16, 16, 24)), centre_keep_mask((2, 1, 16, 24)))
    m1 = AfDCDLoss(4, 16, groups=4).keep_mask(torch.zeros(1, 16, 8, 8), gen(5))
    assert torch.equal(m1, AfDCDLoss(4, 16, groups=4).keep_mask(torch.zeros(1, 16, 8, 8), gen(5)))


def test_align_identity_or_flagged_conv_when_channels_match():
    assert isinstance(AfDCDLoss(16, 16, groups=4).align, torch.nn.Identity)
    assert isinstance(AfDCDLoss(16, 16, groups=4, align_conv=True).align, torch.nn.Conv2d)
    fs, ft = maps(c_s=16, c_t=16, h=8, w=8)
    AfDCDLoss(16, 16, groups=4, pool_size=0)(fs, ft)  # the official module crashes here (b.2.1)


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": "half"}, "mask must be"), ({"generator": "huge"}, "generator must be"),
    ({"contrast": "cosine"}, "contrast must be"), ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"groups": 5}, "not divisible"), ({"tau": 0.0}, "invalid"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AfDCDLoss(8, 32, **kwargs)


def test_partition_must_divide():
    with pytest.raises(ValueError, match="must divide"):
        AfDCDLoss(8, 32, groups=4, pool_size=0, patch_size=(4, 4))(*maps(h=6, w=8))
    with pytest.raises(ValueError, match="share"):
        AfDCDLoss(8, 32, groups=4)(*maps(h=16, w=16)[:1], torch.zeros(2, 32, 8, 8))


# --------------------------------------------------------------------------------------------- b.1 objective
def test_task_ce_ignores_minus_one_and_guards_all_ignored():
    logits = torch.randn(2, 5, 4, 6, generator=gen(0))
    labels = torch.randint(0, 5, (2, 32, 48), generator=gen(1))
    up = F.interpolate(logits, (32, 48), mode="bilinear", align_corners=True)
    assert torch.allclose(seg_cross_entropy(logits, labels), F.cross_entropy(up, labels))
    labels2 = labels.clone()
    labels2[0, :5] = -1
    assert torch.allclose(seg_cross_entropy(logits, labels2), F.cross_entropy(up, labels2, ignore_index=-1))
    logits.requires_grad_(True)
    loss = seg_cross_entropy(logits, torch.full_like(labels, -1))
    loss.backward()
    assert loss == 0 and torch.isfinite(logits.grad).all()


def test_pixel_kd():
    a, b = torch.randn(2, 5, 4, 4, generator=gen(0)), torch.randn(2, 5, 4, 4, generator=gen(1))
    assert pixel_kd_loss(a, a) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(pixel_kd_loss(3 * a, 3 * b, 3.0), 9 * pixel_kd_loss(a, b, 1.0), rtol=1e-5)
    rows = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    ref = F.kl_div(F.log_softmax(rows(a), 1), F.softmax(rows(b), 1), reduction="batchmean")
    assert torch.allclose(pixel_kd_loss(a, b), ref, rtol=1e-5)


def test_distiller_losses_teacher_frozen_and_student_checkpoint():
    torch.manual_seed(0)
    student, teacher = create_model("deeplabv3_mobilenetv2", 4), create_model("deeplabv3_mobilenetv2", 4)
    loss_module = AfDCDLoss(320, 320, groups=16, pool_size=0, patch_size=(2, 2))
    dist = SegDistiller(student, teacher, loss_module, kd_weight=1.0, fm_weight=1e-3, ctr_weight=1e-2).train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(-1, 4, (2, 32, 32))
    logits, losses = dist.forward_train(images, labels)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_fm", "loss_ctr"} and logits.shape == (2, 4, 4, 4)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in loss_module.parameters())
    assert dist.clip_parameters() == list(loss_module.parameters())
    assert set(dist.eval_model().state_dict()) == set(student.state_dict())
    r18 = SegDistiller(create_model("deeplabv3_resnet18", 4))
    _, base = r18.forward_train(images, labels)
    assert set(base) == {"loss_ce", "loss_aux"}
    with pytest.raises(ValueError, match="needs a teacher"):
        SegDistiller(student, None, loss_module)
    with pytest.raises(ValueError, match="classes"):
        SegDistiller(student, create_model("deeplabv3_mobilenetv2", 5))
