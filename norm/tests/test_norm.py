"""Unit tests of the NORM core, the networks, the distiller and the fold (spec section h)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from norm.distiller import NORMDistiller
from norm.models import NORMStudent, create_model
from norm.norm import FeatureTransform, NormMultiplier, kd_loss, n_to_one_loss, standardize_logits

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())
STUDENT_ROWS = [r for r in PAPER["rows"] if r["role"] == "student"]
CIFAR_PAIRS = [r for r in STUDENT_ROWS if r["id"].startswith("cifar100")]


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(c, generator=g)
            m.bias.data = 0.1 * torch.randn(c, generator=g)
            m.running_mean = 0.1 * torch.randn(c, generator=g)
            m.running_var = 0.5 + torch.rand(c, generator=g)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- parameter counts (targets in paper.yaml)

@pytest.mark.parametrize("row", [r for r in PAPER["rows"] if r["role"] == "teacher"], ids=lambda r: r["id"])
def test_teacher_param_count(row: dict) -> None:
    assert _count(create_model(row["model"], 100)) == row["params"]


@pytest.mark.parametrize("row", STUDENT_ROWS, ids=lambda r: r["id"])
def test_student_param_count_plain_ft_and_folded(row: dict) -> None:
    num_classes = 1000 if row["id"].startswith("imagenet") else 100
    net = create_model(row["student"], num_classes, norm_variant=True)
    assert _count(net) == row["params"]
    student = NORMStudent(net, row["teacher_channels"], row["N"])
    assert _count(student.ft) == row["params_ft"]
    assert _count(student) == row["params"] + row["params_ft"]
    if not row["student"].startswith("wrn"):
        assert _count(student.eval().fold()) == row["params"]


# ---------------------------------------------------------------- FT and loss invariants

def test_ft_shapes_and_no_conv_bias() -> None:
    ft = FeatureTransform(32, 16, n=4)
    assert ft.expand[0].weight.shape == (64, 32, 1, 1) and ft.expand[0].bias is None
    assert ft.contract[0].weight.shape == (32, 64, 1, 1) and ft.contract[0].bias is None
    assert isinstance(ft.expand[1], nn.BatchNorm2d) and isinstance(ft.contract[1], nn.BatchNorm2d)
    e, y = ft(torch.randn(2, 32, 4, 4))
    assert e.shape == (2, 64, 4, 4) and y.shape == (2, 32, 4, 4)


def test_n_to_one_loss_is_sum_of_segment_mses_and_blockwise() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 4, 4, generator=g)
    e = torch.randn(3, 4 * 5, 4, 4, generator=g)
    per_segment = sum(torch.nn.functional.mse_loss(e[:, k * 5:(k + 1) * 5], t) for k in range(4))
    torch.testing.assert_close(n_to_one_loss(e, t), per_segment)
    torch.testing.assert_close(n_to_one_loss(e, t), 4 * torch.nn.functional.mse_loss(e, t.repeat(1, 4, 1, 1)))
    assert n_to_one_loss(t.repeat(1, 4, 1, 1), t).item() == 0.0
    assert n_to_one_loss(t.repeat_interleave(4, dim=1), t).item() > 0.1  # guards the block ordering


def test_loss_invariant_to_permuting_segments_with_the_ft() -> None:
    torch.manual_seed(0)
    ft = FeatureTransform(8, 3, n=4).eval()
    _randomize_bn(ft)
    x, t = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    perm = torch.cat([torch.arange(k * 3, (k + 1) * 3) for k in (2, 0, 3, 1)])
    permuted = FeatureTransform(8, 3, n=4).eval()
    permuted.load_state_dict(ft.state_dict())
    with torch.no_grad():
        permuted.expand[0].weight.copy_(ft.expand[0].weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(permuted.expand[1], name).copy_(getattr(ft.expand[1], name)[perm])
        permuted.contract[0].weight.copy_(ft.contract[0].weight[:, perm])
    (e1, y1), (e2, y2) = ft(x), permuted(x)
    torch.testing.assert_close(n_to_one_loss(e1, t), n_to_one_loss(e2, t))
    torch.testing.assert_close(y1, y2)


def test_larger_teacher_map_is_max_pooled() -> None:
    t = torch.randn(2, 3, 8, 8)
    e = torch.randn(2, 6, 4, 4)
    expected = 2 * torch.nn.functional.mse_loss(e, torch.nn.functional.max_pool2d(t, 2).repeat(1, 2, 1, 1))
    torch.testing.assert_close(n_to_one_loss(e, t), expected)


def test_logit_standardization_and_kd() -> None:
    z = torch.randn(5, 10) * 7 + 3
    s = standardize_logits(z)
    torch.testing.assert_close(s.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.std(1, unbiased=False), torch.full((5,), 2.5), atol=1e-4, rtol=0)
    assert torch.equal(s.argmax(1), z.argmax(1))
    assert kd_loss(z, z.clone(), 4.0).abs().item() < 1e-6


def test_multiplier_scales_with_run_length() -> None:
    w = NormMultiplier((10, 20), (0.1, 0.5, 1.0), reference_epochs=40)
    assert [w(e, 40) for e in (0, 9, 10, 19, 20, 39)] == [0.1, 0.1, 0.5, 0.5, 1.0, 1.0]
    assert [w(e, 4) for e in range(4)] == [0.1, 0.5, 1.0, 1.0]


def test_n_equal_one_keeps_the_ft() -> None:
    student = NORMStudent(create_model("resnet20", 10), teacher_channels=64, n=1)
    e, _ = student.forward_train(torch.randn(2, 3, 32, 32))
    assert e.shape == (2, 64, 8, 8) and student.ft.expand[0].weight.shape == (64, 64, 1, 1)


# ---------------------------------------------------------------- the fold (spec b.5, h.3-4)

FOLDABLE = ["resnet20", "resnet8x4", "vgg8", "mobilenetv2", "shufflev1", "shufflev2", "resnet18",
            "mobilenet_v1", "resnet50_quarter"]


@pytest.mark.parametrize("arch", FOLDABLE)
def test_fold_gives_same_logits_and_plain_param_count(arch: str) -> None:
    torch.manual_seed(0)
    net = create_model(arch, 10, norm_variant=True)
    student = NORMStudent(net, teacher_channels=16, n=2)
    _randomize_bn(student)
    student.eval()
    x = torch.randn(2, 3, 32, 32) if arch not in ("resnet18", "mobilenet_v1", "resnet50_quarter") \
        else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = student.fold()
        torch.testing.assert_close(plain(x), student(x), atol=1e-5, rtol=1e-5)
    assert _count(plain) == _count(create_model(arch, 10))
    create_model(arch, 10, norm_variant=True).load_state_dict(plain.state_dict())  # strict: the plain net


def test_fold_does_not_hold_in_train_mode() -> None:
    torch.manual_seed(0)
    student = NORMStudent(create_model("resnet20", 10), teacher_channels=16, n=2)
    _randomize_bn(student)
    plain = student.eval().fold()
    x = torch.randn(4, 3, 32, 32)
    student.ft.train()
    with torch.no_grad():
        assert (plain(x) - student(x)).abs().max() > 1e-3


def test_wrn_student_refuses_to_fold() -> None:
    student = NORMStudent(create_model("wrn_16_2", 10), teacher_channels=16, n=2)
    with pytest.raises(ValueError, match="cannot be folded"):
        student.eval().fold()


# ---------------------------------------------------------------- every table pair end to end (spec j)

@pytest.mark.parametrize("row", CIFAR_PAIRS, ids=lambda r: r["id"])
def test_cifar_pair_distillation_step(row: dict) -> None:
    torch.manual_seed(0)
    teacher = create_model(row["teacher"], 100)
    net = create_model(row["student"], 100, norm_variant=True)
    student = NORMStudent(net, row["teacher_channels"], row["N"])
    distiller = NORMDistiller(student, teacher, ce_weight=0.1, kd_weight=1.0).train()
    logits, losses = distiller.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert logits.shape == (2, 100) and set(losses) == {"loss_ce", "loss_kd", "loss_norm"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert not teacher.training


# ---------------------------------------------------------------- the distiller (spec h.8)

def _small_distiller(**kw: float) -> NORMDistiller:
    torch.manual_seed(0)
    teacher = create_model("resnet20", 10)
    student = NORMStudent(create_model("resnet20", 10), teacher_channels=64, n=2)
    return NORMDistiller(student, teacher, **kw)


def test_teacher_frozen_in_eval_and_gets_no_gradient() -> None:
    d = _small_distiller(kd_weight=1.0).train()
    assert not d.teacher.training and d.student.training
    buffers = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    _, losses = d.forward_train(torch.randn(4, 3, 32, 32), torch.arange(4))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in buffers.items())
    ids = {id(p) for p in d.student_parameters()}
    assert ids.isdisjoint(id(p) for p in d.extra_parameters())
    assert len(ids) + len(d.extra_parameters()) == len(list(d.student.parameters()))


def test_gradient_routing_with_norm_loss_only() -> None:
    d = _small_distiller(ce_weight=0.0, kd_weight=0.0).train()
    _, losses = d.forward_train(torch.randn(4, 3, 32, 32), torch.arange(4))
    sum(losses.values()).backward()
    s = d.student
    for p in [*s.ft.contract.parameters(), *s.net.fc.parameters()]:
        assert p.grad is None or p.grad.abs().max() == 0
    assert s.ft.expand[0].weight.grad.abs().max() > 0 and s.net.conv1.weight.grad.abs().max() > 0


def test_without_norm_weight_the_loss_ignores_the_teacher_feature() -> None:
    d = _small_distiller(norm_weight=0.0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    e, logits = d.student.forward_train(x)
    t_logits = torch.randn(4, 10)
    a = d.loss_terms(e, logits, torch.randn(4, 64, 8, 8), t_logits, y)
    b = d.loss_terms(e, logits, torch.randn(4, 64, 8, 8), t_logits, y)
    total = [d.ce_weight * t["ce"] + d.norm_weight * t["norm"] + d.kd_weight * t["kd"] for t in (a, b)]
    torch.testing.assert_close(total[0], total[1])


def test_epoch_multiplier_reaches_the_loss() -> None:
    from norm.schedules import CIFAR_MULTIPLIER

    d = _small_distiller(multiplier=CIFAR_MULTIPLIER)  # type: ignore[arg-type]
    d.on_epoch_start(0, 241)
    assert d.current_multiplier == 0.1
    d.on_epoch_start(100, 241)
    assert d.current_multiplier == 1.0
