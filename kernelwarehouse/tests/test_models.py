"""convert_model on timm backbones, the official-checkpoint converter, and forward passes of each family."""

from __future__ import annotations

import pytest
import timm
import torch

from kernelwarehouse.convert import load_official
from kernelwarehouse.models import convert_model, create_model, official_model, set_temperature


def test_convert_model_on_a_timm_resnet_gives_the_official_budget() -> None:
    import kernelwarehouse

    with torch.device("meta"):
        model = convert_model(timm.create_model("resnet18"), cell_num_ratio=2)
        quarter = kernelwarehouse.convert_model(timm.create_model("resnet18"), budget=0.25)
    assert sum(p.numel() for p in model.parameters()) == 23_242_127
    assert sum(p.numel() for p in quarter.parameters()) == 4_031_768


@pytest.mark.parametrize("name,size", [("kw1x_mobilenetv2_050", 32), ("kw1x_deit_tiny", 32)])
def test_forward_and_backward_each_family(name: str, size: int) -> None:
    torch.manual_seed(0)
    if "deit" in name:
        with torch.device("cpu"):
            model = convert_model(timm.create_model("deit_tiny_patch16_224", img_size=size, num_classes=5,
                                                    depth=3), cell_num_ratio=1)
    else:
        model = create_model(name, num_classes=5)
    set_temperature(model, 0.5)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert model.warehouse_manager.weights[0].grad is not None


def test_official_state_dict_round_trip_and_bad_keys() -> None:
    torch.manual_seed(0)
    model = official_model("kw_resnet18", 10, cell_num_ratio=1, sharing_range="layer_conv")
    official = {k: v for k, v in model.state_dict().items() if not k.endswith("temperature")}
    fresh = official_model("kw_resnet18", 10, cell_num_ratio=1, sharing_range="layer_conv")
    load_official(fresh, official)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    broken = dict(official)
    broken["layer9.extra.weight"] = broken.pop("layer1.0.conv1.attention.fc1.weight")
    pattern = r"missing: layer1\.0\.conv1\.attention\.fc1\.weight.*unexpected: layer9"
    with pytest.raises(ValueError, match=pattern):
        load_official(fresh, broken)
    with pytest.raises(ValueError, match="unknown official model"):
        official_model("kw_vgg16")
