"""Converter: official checkpoint layouts, key rules of spec g, restricted loading and bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from common.testing import fixture_dir
from scalekd.convert import (
    build_dfm,
    build_distiller,
    checkpoint_filter_fn,
    convert_classifier,
    deploy_student,
    load_official,
    swin_merge_permutation,
)
from scalekd.models import mobilenet_v1, resnet, swin, vit
from scalekd.models.mmcls import build_classifier

DISTILLER_FIXTURE = fixture_dir("scalekd") / "distiller_tinyswin_to_tinyresnet.pt"


def test_swin_merge_permutation_matches_both_layouts() -> None:
    """timm concatenates (x00, x10, x01, x11) position-major; mmcls unfolds channel-major (spec g)."""
    c = 3
    x = torch.arange(2 * 2 * c).view(2, 2, c)  # [h, w, c]
    timm_vec = torch.cat([x[0, 0], x[1, 0], x[0, 1], x[1, 1]])
    mmcls_vec = x.permute(2, 0, 1).reshape(-1)  # unfold: c, kh, kw
    assert torch.equal(mmcls_vec[swin_merge_permutation(c)], timm_vec)


def _mmcls_resnet_d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm resnet-d keys -> mmcls ResNetV1d keys, written from spec g independently of the converter."""
    stem = {"conv1.0": "stem.0.conv", "conv1.1": "stem.0.bn", "conv1.3": "stem.1.conv", "conv1.4": "stem.1.bn",
            "conv1.6": "stem.2.conv", "bn1": "stem.2.bn"}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(conv1\.\d|bn1)\.(.+)$", k)
        if m:
            k = f"{stem[m.group(1)]}.{m.group(2)}"
        k = re.sub(r"^layer1\.0\.downsample\.([12])\.", lambda g: f"layer1.0.downsample.{int(g.group(1)) - 1}.", k)
        out["head.fc." + k[3:] if k.startswith("fc.") else "backbone." + k] = v
    return out


def _mmcls_vit(sd: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    out = {"backbone.cls_token": torch.zeros(1, 1, width)}
    for k, v in sd.items():
        if k == "pos_embed":
            v = torch.cat([torch.zeros(1, 1, width), v], 1)
        k = k.replace("patch_embed.proj.", "patch_embed.projection.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
        k = k.replace(".mlp.fc2.", ".ffn.layers.1.").replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
        k = re.sub(r"^blocks\.", "layers.", k)
        k = re.sub(r"^norm\.", "ln1.", k)
        out["head.fc." + k[5:] if k.startswith("head.") else "backbone." + k] = v
    return out


def _mmcls_mbv1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    official = [f"s1.{i}" for i in (1, 2, 3)] + [f"s{s}.{i}" for s in (2, 3) for i in range(4)] + ["s4.0", "s4.1"]
    flat = [(s, j) for s, n in enumerate((1, 2, 2, 6, 2)) for j in range(n)]
    sub = {"conv_dw": "0", "bn1": "1", "conv_pw": "3", "bn2": "4"}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)$", k)
        if m:
            name = official[flat.index((int(m.group(1)), int(m.group(2))))]
            k = f"backbone.{name}.{sub[m.group(3)]}.{m.group(4)}"
        elif k.startswith(("conv_stem.", "bn1.")):
            k = "backbone.s1.0." + ("0." if k.startswith("conv_stem.") else "1.") + k.split(".", 1)[1]
        else:
            k = "head.fc." + k.split(".", 1)[1]
        out[k] = v
    return out


@pytest.mark.parametrize("family", ["resnet_d", "vit", "mobilenet_v1"])
def test_mmcls_classifier_round_trip(family: str) -> None:
    torch.manual_seed(0)
    if family == "resnet_d":
        model, to_mmcls = resnet(50, 16, 8, deep_stem=True, avg_down=True, num_classes=7), _mmcls_resnet_d
    elif family == "vit":
        model = vit(32, 2, 2, patch_size=16, img_size=32, num_classes=7)
        to_mmcls = lambda sd: _mmcls_vit(sd, 32)  # noqa: E731
    else:
        model, to_mmcls = mobilenet_v1(num_classes=7), _mmcls_mbv1
    ref = model.state_dict()
    converted = convert_classifier(to_mmcls(dict(ref)), model)
    assert set(converted) == set(ref)
    assert all(torch.equal(converted[k], ref[k]) for k in ref)


def test_filter_passes_timm_and_our_distiller_keys_through() -> None:
    model = resnet(18, 8, 8, num_classes=3)
    sd = model.state_dict()
    assert checkpoint_filter_fn(sd, model).keys() == sd.keys()
    ours = {"student." + k: v for k, v in sd.items()} | {"distill.mimic_s3.cap_spatial.pos_embed": torch.zeros(1)}
    assert checkpoint_filter_fn(ours, model).keys() == sd.keys()


def test_official_distillation_checkpoint_ema_raw_and_deploy(tmp_path: Path) -> None:
    if not DISTILLER_FIXTURE.is_file():
        pytest.skip("distiller fixture not available")
    data = torch.load(DISTILLER_FIXTURE, weights_only=True)
    sd = data["state_dict"]
    raw = {"module." + k: v + 1 if v.is_floating_point() else v for k, v in sd.items()} | {"steps": torch.tensor(9)}
    path = tmp_path / "epoch_300.pth"  # mmengine layout: state_dict = EMA weights, ema_state_dict = raw
    torch.save({"meta": {"epoch": 300}, "state_dict": sd, "ema_state_dict": raw, "optimizer": {}}, path)
    model = build_distiller(data["config"])
    load_official(path, model)  # strict: linear.* dropped, every other key named if missing
    w = model.student.fc.weight.detach().clone()
    load_official(path, model, key="ema_state_dict")
    torch.testing.assert_close(model.student.fc.weight, w + 1)
    student = build_classifier(data["config"]["student_cfg"])
    load_official(path, student)  # the student alone, as pth_transfer.py
    torch.testing.assert_close(student.fc.weight, w)
    out = deploy_student(model, tmp_path / "student.pt")
    fresh = build_classifier(data["config"]["student_cfg"])
    load_official(out, fresh)
    torch.testing.assert_close(fresh.fc.weight, w + 1)


def test_teacher_of_another_architecture_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "swin.pth"
    torch.save({"state_dict": swin(16, (1, 1, 1, 1), (1, 1, 2, 2), num_classes=4).state_dict()}, path)
    with pytest.raises(UserError, match=r"shape mismatch: .*\(16") as err:
        load_official(path, swin(8, (1, 1, 1, 1), (1, 1, 2, 2), num_classes=4))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="missing"):
        load_official(path, swin(16, (1, 1, 2, 1), (1, 1, 2, 2), num_classes=4))


def test_missing_and_corrupt_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_official(tmp_path / "nope.pth", resnet(18, 8, 8))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_official(bad, resnet(18, 8, 8))


def test_official_config_errors_name_the_key() -> None:
    cfg = {"official_class": "FreqMaskingDistillLoss", "alpha": [0.016, 0.008], "student_dims": 8, "teacher_dims": 16,
           "query_hw": [4, 4], "pos_hw": [8, 8], "pos_dims": 16}
    assert build_dfm(cfg).cap_spatial.pos_hw == (8, 8)
    assert build_dfm(cfg).cap_spatial.num_heads == 8  # official default
    with pytest.raises(UserError, match="alpha_jfd"):
        build_dfm({**cfg, "alpha_jfd": [0.016, 0.008]})
    with pytest.raises(UserError, match="window_shapes"):
        build_dfm({**cfg, "window_shapes": [2, 2]})
    with pytest.raises(UserError, match="not a ScaleKD CAP loss"):
        build_dfm({**cfg, "official_class": "FooLoss"})
    with pytest.raises(UserError, match="'foo'"):
        build_classifier({"backbone": {"type": "ResNet", "depth": 18, "foo": 1}, "head": {"num_classes": 3}})
    with pytest.raises(UserError, match="arch"):
        build_classifier({"backbone": {"type": "SwinTransformer", "arch": "huge"}, "head": {"num_classes": 3}})
