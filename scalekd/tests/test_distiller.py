"""The distiller: taps, teacher adapters, gradient routing (spec h.8-h.9), switches and bad input."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from scalekd.distiller import ClassLoss, ScaleKDDistiller, StageConfig
from scalekd.models import (
    create_student,
    create_teacher,
    mixer,
    resnet,
    student_taps,
    swin,
    teacher_adapter,
    vit,
)

# (S3, S4) shapes of b.4's table at 224^2
STUDENT_TAPS = {
    "resnet50": ((1024, 14, 14), (2048, 7, 7)), "resnet50d": ((1024, 14, 14), (2048, 7, 7)),
    "mobilenet_v1": ((512, 14, 14), (1024, 7, 7)), "convnext_tiny": ((384, 14, 14), (768, 7, 7)),
    "swin_t": ((384, 14, 14), (768, 7, 7)), "vit_s16": ((384, 14, 14), (384, 14, 14)),
    "vit_b14": ((768, 16, 16), (768, 16, 16)), "mixer_s16": ((512, 14, 14), (512, 14, 14)),
    "mixer_b16": ((768, 14, 14), (768, 14, 14)),
}


@pytest.mark.parametrize("name", sorted(STUDENT_TAPS))
def test_student_taps_shapes(name: str) -> None:
    with torch.device("meta"):
        model = create_student(name)
        s3, s4, logits = student_taps(model)(torch.empty(2, 3, 224, 224))
    assert (tuple(s3.shape[1:]), tuple(s4.shape[1:])) == STUDENT_TAPS[name]
    assert tuple(logits.shape) == (2, 1000)


def test_student_tap_indices_follow_official_out_indices() -> None:
    with torch.device("meta"):
        assert student_taps(create_student("vit_b16")).s3_index == 8  # [2, 5, 8, 11]
        assert student_taps(create_student("mixer_s16")).s3_index == 5  # out_indices -3 of 8 blocks
        assert student_taps(create_student("mixer_b16")).s3_index == 9


def test_tpp_proxy_shape_swin_l() -> None:
    """h.9: CAP3 output (B,196,768) -> Swin-L last stage -> (B,49,1536)."""
    with torch.device("meta"):
        adapter = teacher_adapter(create_teacher("swin_l"))
        assert adapter.last_stage(torch.empty(2, 196, 768), (14, 14)).shape == (2, 49, 1536)
        t3, t4, logits = adapter.stage_outputs(torch.empty(2, 3, 224, 224))
    assert t3.shape == (2, 768, 14, 14) and t4.shape == (2, 1536, 7, 7) and logits.shape == (2, 1000)


def test_vit_teacher_splits() -> None:
    """EVA-L: Phi = last 2 blocks + norm, no tail; ViT-B: Phi = blocks 9-11, tail = block 12 + norm (b.4)."""
    with torch.device("meta"):
        eva = teacher_adapter(create_teacher("eva_l14"))
        t3, t4, _ = eva.stage_outputs(torch.empty(1, 3, 224, 224))
        assert t3.shape == t4.shape == (1, 1024, 16, 16) and eva.split == 22 and eva.tail_start == 24
    torch.manual_seed(0)
    model = vit(32, 12, 2, patch_size=16, img_size=64, num_classes=5, class_token=True).eval()
    vb = teacher_adapter(model, phi_blocks=3, tail_blocks=1)
    x = torch.randn(2, 3, 64, 64)
    t3, t4, logits = vb.stage_outputs(x)
    tokens = t3.flatten(2).transpose(1, 2)
    full = vb.tail(vb.last_stage(tokens))
    h = model.norm(model.blocks[8:](torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1)))
    assert full.shape == (2, 16, 32)
    torch.testing.assert_close(logits, model(x))
    assert vb.split == 8 and not torch.allclose(full, h[:, 1:])  # Phi runs on patch tokens only (no cls)


def _tiny_pair(student: str = "resnet", **kw: object) -> ScaleKDDistiller:
    torch.manual_seed(0)
    teacher = swin(8, (1, 1, 1, 1), (1, 1, 2, 2), num_classes=5)
    if student == "resnet":
        net = resnet(18, stem_channels=8, base_channels=8, num_classes=5)
    elif student == "mixer":
        net = mixer(16, 4, 8, 32, patch_size=16, num_classes=5)
    else:
        net = vit(16, 4, 2, patch_size=16, num_classes=5)
    s3 = StageConfig(num_heads=2, softmax_scale=(5.0, 5.0))
    s4 = StageConfig(num_heads=4, softmax_scale=(5.0, 5.0), self_query=False)
    return ScaleKDDistiller(net, teacher, s3, s4, kd_temperature=1.0, kd_alpha=0.5, **kw)


def _grads(model: ScaleKDDistiller, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()
            if p.requires_grad}


def test_gradient_routing() -> None:
    """h.8: no teacher grads; loss_s4 reaches CAP3_sp only, loss_s4_alt CAP3_fr only; loss_kd no CAP."""
    model = _tiny_pair().train()
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 3])
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    _, losses = model.forward_train(x, y)
    assert set(losses) == {"loss_cls", "loss_s3", "loss_s3_alt", "loss_s4", "loss_s4_alt", "loss_kd"}
    g = _grads(model, losses["loss_s4"])
    assert any(v for k, v in g.items() if k.startswith("distill.mimic_s3.cap_spatial."))
    assert not any(v for k, v in g.items() if k.startswith("distill.mimic_s3.cap_frequency."))
    assert g["student.layer3.0.downsample.0.weight"]  # S3 (residual branches start at zero: zero_init_last)
    g = _grads(model, losses["loss_s4_alt"])
    assert any(v for k, v in g.items() if k.startswith("distill.mimic_s3.cap_frequency."))
    assert not any(v for k, v in g.items() if k.startswith("distill.mimic_s3.cap_spatial."))
    g = _grads(model, losses["loss_kd"])
    assert not any(v for k, v in g.items() if k.startswith("distill."))
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())


def test_class_loss_scaled_by_one_minus_alpha() -> None:
    model = _tiny_pair().train()
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 3])
    logits, losses = model.forward_train(x, y)
    torch.testing.assert_close(losses["loss_cls"], 0.5 * torch.nn.functional.cross_entropy(logits, y))


@pytest.mark.parametrize("student", ["mixer", "vit"])
def test_v1_cap_maps_14x14_keys_to_7x7_queries(student: str) -> None:
    model = _tiny_pair(student, cap_variant="v1").train()
    cap = model.distill.mimic_s4.cap_spatial
    assert cap.pos_hw == (14, 14) and cap.query_hw == (7, 7)
    _, losses = model.forward_train(torch.randn(2, 3, 224, 224), torch.tensor([0, 1]))
    assert all(torch.isfinite(v) for v in losses.values())


def test_cap_grid_must_match_teacher_grid() -> None:
    with pytest.raises(UserError, match="cap_variant=v1"):
        _tiny_pair("mixer")  # v2 with 14x14 student keys against a 7x7 teacher grid


def test_teacher_train_mode_switch() -> None:
    model = _tiny_pair()
    model.train()
    assert model.teacher.training and model.student.training  # released behaviour (b.5)
    model.teacher_train_mode = False
    model.train()
    assert not model.teacher.training and model.student.training
    model.eval()
    assert not model.teacher.training


def test_eval_model_is_the_student() -> None:
    model = _tiny_pair()
    assert model.eval_model() is model.student
    assert {id(p) for p in model.extra_parameters()}.isdisjoint({id(p) for p in model.student_parameters()})
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_bce_class_loss_sums_classes_over_batch() -> None:
    logits, y = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    onehot = torch.nn.functional.one_hot(y, 6).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1).mean()
    torch.testing.assert_close(ClassLoss("bce")(logits, y), ref)
    with pytest.raises(UserError, match="class loss"):
        ClassLoss("focal")


def test_bad_cap_variant() -> None:
    with pytest.raises(UserError, match="cap_variant"):
        _tiny_pair(cap_variant="v3")
