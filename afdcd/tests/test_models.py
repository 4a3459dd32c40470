"""Spec c: exact parameter counts (paper.yaml), output shapes, converter round trips and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from afdcd import convert
from afdcd.afdcd import AfDCDLoss
from afdcd.models import MODEL_NAMES, create_model, feature_channels
from common.errors import UserError

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, num_classes: int, aux: bool | None = None) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes, aux)


@pytest.mark.parametrize("row", PAPER["rows"], ids=lambda r: r["id"])
def test_param_count_of_every_row(row: dict) -> None:
    assert count(meta_model(row["model"], row["num_classes"])) == row["params"]
    if "params_generator" in row:
        with torch.device("meta"):
            loss = AfDCDLoss(feature_channels(row["model"]), feature_channels(row["teacher"]),
                             generator=row["generator"])
        assert count(loss.align) == row["params_align"]
        assert count(loss.generator) == row["params_generator"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_counts_all_class_numbers(name: str) -> None:
    for classes, expected in PAPER["param_counts"][name].items():
        assert count(meta_model(name, int(classes))) == expected, (name, classes)
    model = meta_model(name, 19)
    for part, expected in PAPER["param_breakdown_19"][name].items():
        assert count(getattr(model, part)) == expected, (name, part)


def test_param_loss_module_variants() -> None:
    with torch.device("meta"):
        assert count(AfDCDLoss(512, 2048).align) == 1_050_624
        assert count(AfDCDLoss(320, 2048).align) == 657_408
        assert count(AfDCDLoss(512, 2048).generator) == 75_501_568
        assert count(AfDCDLoss(512, 2048, generator="enhanced").generator) == 151_003_136


@pytest.mark.parametrize("name,c4,width,aux", [
    ("deeplabv3_resnet18", 512, 128, True), ("deeplabv3_mobilenetv2", 320, 128, False),
    ("pspnet_resnet18", 512, 128, True),
])
def test_output_shapes_stride8(name: str, c4: int, width: int, aux: bool) -> None:
    torch.manual_seed(0)
    model = create_model(name, 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model.forward_all(x)
        assert out.logits.shape == (1, 5, 8, 12)
        assert out.c4.shape == (1, c4, 8, 12) and out.head_feat.shape == (1, width, 8, 12)
        assert (out.aux is not None) == aux
        assert torch.equal(model(x), out.logits)
        assert model.forward_all(torch.randn(1, 3, 45, 45)).c4.shape[-2:] == (6, 6)  # ceil(45 / 8)


def test_resnet101_is_output_stride_8_on_meta() -> None:
    with torch.device("meta"):
        out = create_model("deeplabv3_resnet101", 19).forward_all(torch.empty(2, 3, 512, 1024))
    assert out.logits.shape == (2, 19, 64, 128) and out.c4.shape == (2, 2048, 64, 128)
    assert out.head_feat.shape == (2, 256, 64, 128) and out.aux.shape == (2, 19, 64, 128)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_round_trip_and_architecture_inference(name: str) -> None:
    model = meta_model(name, 7)
    official = convert.to_official(model.state_dict(), model)
    assert all(k.startswith(("pretrained.", "head.", "auxlayer.")) for k in official)
    if "resnet" in name:
        assert "pretrained.conv3.weight" in official and "pretrained.bn3.weight" in official
    else:
        assert "pretrained.net.features.17.conv.6.weight" in official
    back = convert.checkpoint_filter_fn(official, model)
    assert list(back) == list(model.state_dict())
    assert convert.infer_architecture(official) == (name, 7, name != "deeplabv3_mobilenetv2")
    assert convert.infer_architecture(back) == (name, 7, name != "deeplabv3_mobilenetv2")


def test_official_key_counts() -> None:
    """Spec g entry counts: DeepLabV3-R18+aux 190, R101+aux 688, MBV2 350, PSP-R18+aux 178."""
    for name, n in [("deeplabv3_resnet18", 190), ("deeplabv3_resnet101", 688), ("deeplabv3_mobilenetv2", 350),
                    ("pspnet_resnet18", 178)]:
        assert len(meta_model(name, 19).state_dict()) == n


def test_load_model_strict_loads_and_names_mismatches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("pspnet_resnet18", 11)
    official = convert.to_official(model.state_dict(), model)
    path = tmp_path / "kd_psp_resnet18_camvid_best_model.pth"
    torch.save({"module." + k: v for k, v in official.items()}, path)
    loaded = convert.load_model(path, name="pspnet_resnet18", num_classes=11)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UserError, match="holds a pspnet_resnet18 model, but deeplabv3_resnet18"):
        convert.load_model(path, name="deeplabv3_resnet18")
    with pytest.raises(UserError, match="has 11 classes, but the dataset has 19"):
        convert.load_model(path, num_classes=19)
    broken = dict(official)
    broken.pop("head.block.0.weight")
    broken["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing.*head\.block\.0\.weight.*unexpected.*head\.extra\.weight"):
        convert.load_model(broken)


def test_load_model_refuses_non_segmentation_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="segmentation checkpoint"):
        convert.load_model({"fc.weight": torch.zeros(2, 2)})
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        convert.load_model(bad)


def test_loss_module_keys_both_ways() -> None:
    for gen, keys in [("plain", {"projetor.0.weight", "projetor.2.bias"}),
                      ("enhanced", {"projetor.block_1.0.weight", "projetor.adpator_2.bias"})]:
        module = AfDCDLoss(8, 16, groups=4, generator=gen)
        official = convert.loss_to_official(module.state_dict())
        assert keys <= set(official) and {"align.weight", "align.bias"} <= set(official)
        assert list(convert.loss_filter_fn(official)) == list(module.state_dict())
        with pytest.raises(UserError, match="unexpected"):
            convert.load_loss_module({**official, "projetor.9.weight": torch.zeros(1)}, module)


def test_imagenet_init_by_intersection() -> None:
    torch.manual_seed(0)
    src = create_model("deeplabv3_resnet18", 19)
    csail = {k[len("pretrained."):]: v for k, v in convert.to_official(src.state_dict(), src).items()
             if k.startswith("pretrained.")}
    csail["fc.weight"] = torch.zeros(1000, 512)
    dst = create_model("deeplabv3_resnet18", 19)
    left = convert.load_imagenet_backbone(dst, csail)
    assert left == []
    assert torch.equal(dst.backbone.conv1[0].weight, src.backbone.conv1[0].weight)
    with pytest.raises(UserError, match="CSAIL"):
        convert.load_imagenet_backbone(dst, {"foo": torch.zeros(1)})


def test_unknown_model_and_aux_on_mobilenet() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        create_model("deeplabv3_resnet50", 19)
    with pytest.raises(ValueError, match="no aux head"):
        create_model("deeplabv3_mobilenetv2", 19, aux=True)


@pytest.mark.parametrize("name,width,c4", [
    ("deeplabv3_mobilenetv2", 0.125, 40), ("deeplabv3_mobilenetv2", 0.25, 80), ("deeplabv3_resnet18", 0.125, 64),
    ("pspnet_resnet18", 0.125, 64), ("deeplabv3_resnet101", 0.125, 256),
])
def test_smoke_widths_build_forward_and_reload(name: str, width: float, c4: int) -> None:
    """Every spec c model has a smoke width: stride 8 kept, c4 scaled (MobileNetV2 by timm's rounded multiplier),
    and an official-format state dict of it reloads at the same width."""
    torch.manual_seed(0)
    model = create_model(name, 5, width=width).eval()
    full = meta_model(name, 5)
    assert model.c4_channels == feature_channels(name, width) == c4 and count(model) < count(full) / 10
    with torch.no_grad():
        out = model.forward_all(torch.randn(2, 3, 64, 48))
    assert out.logits.shape == (2, 5, 8, 6) and out.c4.shape == (2, c4, 8, 6)
    assert (out.aux is not None) == ("resnet" in name)
    back = convert.load_model(convert.to_official(model.state_dict(), model))
    assert back.width == width
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_forward_all_without_aux_skips_the_aux_head() -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnet18", 5, width=0.125).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full, lean = model.forward_all(x), model.forward_all(x, aux=False)
    assert lean.aux is None and full.aux is not None
    assert torch.equal(lean.logits, full.logits) and torch.equal(lean.c4, full.c4)
