"""convert.py: the official containers of spec g, ``module.`` stripping, head-config inference, bad checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from noah.convert import checkpoint_filter_fn, infer_head_config, load_official_checkpoint, sniff_container
from noah.models import create_model


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our ShuffleNetV2 state_dict under the official names (torchvision backbone keys, ``head.*`` / ``head.2.*``)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            out[k[len("backbone."):]] = v
        elif isinstance(model.head, torch.nn.Linear):
            out["head.2." + k.split(".", 1)[1]] = v
        else:
            out[k] = v
    return out


def containers(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    ddp = {"module." + k: v for k, v in sd.items()}
    return {
        "CNN main.py checkpoint": {"epoch": 3, "state_dict": ddp, "acc": 1.0, "best_acc": 2.0, "optimizer": {}},
        "DeiT/PVT main.py checkpoint": {"model": sd, "optimizer": {}, "lr_scheduler": {}, "epoch": 3, "args": None},
        "timm MLP train.py checkpoint": {"state_dict": sd, "state_dict_ema": sd, "arch": "x", "epoch": 1},
        "bare state_dict": sd,
    }


@pytest.mark.parametrize("head", ["noah", "baseline"])
def test_every_official_container_loads(tmp_path: Path, head: str) -> None:
    torch.manual_seed(0)
    src = create_model("shufflenetv2_050", head=head, num_classes=10)
    for what, obj in containers(official_state_dict(src)).items():
        assert sniff_container(obj)[0] == what
        path = tmp_path / f"{what.split()[0].replace('/', '_')}.pth"
        torch.save(obj, path)
        dst = create_model("shufflenetv2_050", head=head, num_classes=10)
        missing, unexpected = load_official_checkpoint(dst, path)
        assert not missing and not unexpected
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (what, k)


def test_official_file_of_plain_tensors_never_reaches_the_restricted_unpickler(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Official files: weights_only=True under the allow-list first, the restricted unpickler only as the
    fallback for objects the allow-list cannot express (issue 8 item 3)."""
    import common.checkpoint
    import noah.convert

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("restricted unpickler used for a file weights_only=True reads")

    monkeypatch.setattr(common.checkpoint, "load_foreign", refuse)
    monkeypatch.setattr(noah.convert, "load_foreign", refuse, raising=False)
    torch.manual_seed(0)
    src = create_model("shufflenetv2_050", num_classes=10)
    path = tmp_path / "release.pth"
    torch.save(containers(official_state_dict(src))["CNN main.py checkpoint"], path)
    dst = create_model("shufflenetv2_050", num_classes=10)
    assert load_official_checkpoint(dst, path) == ([], [])
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_our_own_state_dict_passes_through() -> None:
    model = create_model("shufflenetv2_050", num_classes=4)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    assert list(checkpoint_filter_fn(sd, model)) == list(model.state_dict())


def test_infer_head_config_from_keys() -> None:
    sd = official_state_dict(create_model("mobilenetv2_035", num_classes=12, head_num=4, key_ratio=0.375))
    cfg = infer_head_config({"module." + k: v for k, v in sd.items()}, 1280)
    assert cfg == {"pre_logits": False, "head": "noah", "num_classes": 12, "head_num": 4, "key_ratio": 0.375}
    with torch.device("meta"):
        deit = create_model("deit_tiny_050_patch16_224", num_classes=5)
    cfg = infer_head_config(deit.state_dict(), 96)
    assert cfg["pre_logits"] and cfg["head_num"] == 4 and cfg["key_ratio"] == 0.5 and cfg["num_classes"] == 5
    base = official_state_dict(create_model("shufflenetv2_050", "baseline", num_classes=6))
    assert infer_head_config(base, 1024) == {"pre_logits": False, "head": "baseline", "num_classes": 6}


def test_finetune_to_another_class_count_drops_head_keys(tmp_path: Path, caplog) -> None:
    path = tmp_path / "k1000.pth"
    src = create_model("shufflenetv2_050", num_classes=1000)
    torch.save({"state_dict": official_state_dict(src), "epoch": 1, "best_acc": 0.0}, path)
    dst = create_model("shufflenetv2_050", num_classes=10)
    with pytest.raises(UserError, match=r"head\.query\.weight \(8000, 32, 1, 1\) vs model \(80, 32, 1, 1\)"):
        load_official_checkpoint(dst, path)
    with caplog.at_level(logging.WARNING, logger="noah.convert"):
        missing, unexpected = load_official_checkpoint(dst, path, drop_head_on_mismatch=True)
    assert sorted(missing) == ["head.query.bias", "head.query.weight", "head.value.bias", "head.value.weight"]
    assert not unexpected
    assert len([r for r in caplog.records if "dropped 4 head keys" in r.getMessage()]) == 1
    assert torch.equal(dst.state_dict()["backbone.conv5.0.weight"], src.state_dict()["backbone.conv5.0.weight"])


def test_checkpoint_of_another_architecture_names_shapes(tmp_path: Path) -> None:
    path = tmp_path / "mbv2.pth"
    torch.save(official_state_dict(create_model("shufflenetv2_100", num_classes=10)), path)
    with pytest.raises(UserError) as err:
        load_official_checkpoint(create_model("shufflenetv2_050", num_classes=10), path)
    msg = str(err.value)
    assert "\n" not in msg and "shape mismatch" in msg and "vs model" in msg and str(path) in msg


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    model = create_model("shufflenetv2_050", num_classes=10)
    with pytest.raises(UserError, match="does not exist"):
        load_official_checkpoint(model, tmp_path / "absent.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_official_checkpoint(model, bad)
    odd = tmp_path / "odd.pth"
    torch.save({"weights": {"a": 1}}, odd)
    with pytest.raises(UserError, match="spec g"):
        load_official_checkpoint(model, odd)
