"""Hosts x heads (spec b.6, b.8, c): shapes, host changes, reset_classifier, init rules, bad names."""

from __future__ import annotations

import math

import pytest
import torch

from common.report import load_paper_yaml
from noah.models import create_model, list_models
from noah.noah import NOAH

# (name, image size): one small host per family, both heads, real tensors
FAMILY_HOSTS = [("resnet18", 64), ("mobilenetv2_035", 64), ("mobilenetv3_small", 64), ("shufflenetv2_050", 64),
                ("deit_tiny_050_patch16_224", 32), ("pvt_tiny_050", 64), ("mixer_s16_050_224", 32),
                ("gmlp_ti16_050_224", 32)]


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("name", "size"), FAMILY_HOSTS)
@pytest.mark.parametrize("head", ["baseline", "noah"])
def test_forward_shapes(name: str, size: int, head: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, head=head, num_classes=7, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    torch.testing.assert_close(model(x), out)
    assert isinstance(model.head, NOAH) == (head == "noah")
    if head == "noah":
        assert model.head.in_channels == model.num_features
        assert model.head.dropout.p == model.head.head_config()["dropout"]


def test_noah_prefix_and_aliases() -> None:
    with torch.device("meta"):
        assert isinstance(create_model("noah_resnet18", num_classes=3).head, NOAH)
        assert isinstance(create_model("resnet18", head="linear", num_classes=3).head, torch.nn.Linear)
    hosts = {r.extra["model"] for r in load_paper_yaml("noah").rows}
    assert len(hosts) == 27 and hosts <= set(list_models())  # 26 ImageNet hosts + ViT-Large (MS-COCO)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"name": "resnet19"}, "unknown model"),
    ({"name": "resnet18", "head": "gap"}, "head must be"),
    ({"name": "noah_resnet18", "head": "baseline"}, "NOAH model"),
    ({"name": "resnet50", "head": "noah", "head_num": 3}, "multiples of head_num"),
    ({"name": "resnet18", "pre_logits": True}, "DeiT hosts only"),
])
def test_bad_model_arguments_are_one_line_errors(kwargs: dict, words: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError) as err:
        create_model(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_vit_host_changes() -> None:
    """No class token and 196/49-row pos_embed for NOAH (spec b.6); pre_logits for D < 192 as a switch."""
    with torch.device("meta"):
        deit_b, deit_n = create_model("deit_small_patch16_224", "baseline"), create_model("deit_small_patch16_224")
        pvt_b, pvt_n = create_model("pvt_tiny", "baseline"), create_model("pvt_tiny")
        tiny = create_model("deit_tiny_050_patch16_224")
        tiny_b_off = create_model("deit_tiny_050_patch16_224", "baseline", pre_logits=False)
        tiny_n_off = create_model("deit_tiny_050_patch16_224", pre_logits=False)
    assert deit_b.backbone.pos_embed.shape[1] == 197 and deit_b.backbone.cls_token is not None
    assert deit_n.backbone.pos_embed.shape[1] == 196 and deit_n.backbone.cls_token is None
    assert pvt_b.backbone.pos_embed4.shape[1] == 50 and hasattr(pvt_b.backbone, "cls_token")
    assert pvt_n.backbone.pos_embed4.shape[1] == 49 and not hasattr(pvt_n.backbone, "cls_token")
    assert isinstance(deit_n.pre_logits, torch.nn.Identity)
    assert tiny.pre_logits.fc.weight.shape == (192, 96) and tiny.head.in_channels == 192
    # without pre_logits the counts are the README's (spec c.2 notes, k.3)
    assert (count(tiny_b_off), count(tiny_n_off)) == (1_532_104, 1_538_912)
    assert deit_n.no_weight_decay() == {"backbone.pos_embed"} and pvt_n.no_weight_decay() == set()


def test_mobilenetv3_last_conv_before_pooling_for_noah() -> None:
    base = create_model("mobilenetv3_small", "baseline", num_classes=10)
    noah = create_model("mobilenetv3_small", num_classes=10)
    assert isinstance(base.backbone.features[13], torch.nn.AdaptiveAvgPool2d)
    assert isinstance(noah.backbone.features[13], torch.nn.Conv2d) and noah.backbone.features[13].out_channels == 1280
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert noah.forward_features(x).shape == (1, 1280, 2, 2)
        assert base.forward_features(x).shape == (1, 1280, 1, 1)


def test_reset_classifier_keeps_head_settings() -> None:
    model = create_model("deit_tiny_050_patch16_224", num_classes=1000, head_num=2, key_ratio=0.25, head_dropout=0.3,
                         img_size=32)
    model.reset_classifier(17)
    h = model.head
    assert (h.num_classes, h.in_channels, h.head_num, h.key_ratio, h.dropout.p) == (17, 192, 2, 0.25, 0.3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 17)
    base = create_model("resnet18", "baseline", num_classes=5)
    base.reset_classifier(3)
    assert base.head.out_features == 3


def test_head_init_follows_the_host() -> None:
    """Spec b.4: Kaiming fan_out (CNN/ViT), LeCun normal with fan_in = in_channels/groups (Mixer/gMLP)."""
    torch.manual_seed(0)
    mixer = create_model("mixer_s16_050_224", img_size=32)
    fan_in = mixer.head.value.weight.shape[1]
    assert abs(mixer.head.value.weight.std().item() * math.sqrt(fan_in) - 1) < 0.05
    resnet = create_model("resnet18", num_classes=1000)
    assert abs(resnet.head.value.weight.std().item() / math.sqrt(2 / 4000) - 1) < 0.02
    base = create_model("resnet18", "baseline", num_classes=1000)
    assert abs(base.head.weight.std().item() / 0.01 - 1) < 0.02 and torch.count_nonzero(base.head.bias) == 0
    assert torch.count_nonzero(create_model("mixer_s16_050_224", "baseline", img_size=32).head.weight) == 0


def test_baselines_have_no_classifier_dropout() -> None:
    with torch.device("meta"):
        for name in ("resnet50", "mobilenetv2_100"):
            assert create_model(name, "baseline").backbone.drop_rate == 0
