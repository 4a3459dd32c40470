"""NYUv2 reader (spec f) with Fast's mIoU, teacher loading through convert.py, and bad input: one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import DatasetError, NYUv2, NYUv2Transform, write_synthetic_nyuv2
from common.errors import UserError
from common.metrics import ConfusionMatrix, miou_from_confusion
from ssdkd import convert
from ssdkd.models import create_model


def test_nyuv2_reader_transform_and_miou(tmp_path: Path) -> None:
    write_synthetic_nyuv2(tmp_path, n_train=6, n_test=3, size=(40, 52))
    train, test = NYUv2(tmp_path, "train", NYUv2Transform(train=True, resize=48, crop=32)), NYUv2(tmp_path, "test")
    assert len(train) == 6 and len(test) == 3
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(range(13)) | {255}
    img, lbl = NYUv2(tmp_path / "NYUv2", "test", NYUv2Transform(train=False, resize=48))[1]
    assert img.shape[1] == 48 and -1 <= img.min() and img.max() <= 1
    # Fast's mIoU: mean over all 13 classes of diag / (row + col - diag + 1e-9), void ignored
    pred = torch.randint(0, 13, lbl.shape)
    cm = ConfusionMatrix(13)
    cm.update(pred[None], lbl[None])
    fast = cm.mat.double()
    fast_miou = (fast.diag() / (fast.sum(0) + fast.sum(1) - fast.diag() + 1e-9)).mean().item() * 100
    assert abs(miou_from_confusion(cm.mat, absent_as_zero=True)[0] - fast_miou) < 1e-6
    model = create_model("deeplabv3_mobilenet", 13).eval()
    with torch.no_grad():
        assert model(img[None]).shape == (1, 13, *img.shape[1:])


def test_nyuv2_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="NYUv2 not found"):
        NYUv2(tmp_path, "train")
    root = write_synthetic_nyuv2(tmp_path, n_train=4, n_test=2, size=(16, 16))
    with pytest.raises(DatasetError, match="split must be"):
        NYUv2(tmp_path, "val")
    (root / "seg13" / "train" / "00001.png").unlink()
    with pytest.raises(DatasetError, match="00001.png is missing"):
        NYUv2(tmp_path, "train")
    Image.fromarray(np.full((16, 16), 40, np.uint8)).save(root / "seg13" / "test" / "00000.png")
    with pytest.raises(DatasetError, match="holds value 40"):
        NYUv2(tmp_path, "test")[0]
    (root / ".osvai_synthetic.json").unlink()  # a "real" copy: sizes are checked against splits.mat
    shutil.copy(root / "image" / "test" / "00001.png", root / "image" / "test" / "00009.png")
    shutil.copy(root / "seg13" / "test" / "00001.png", root / "seg13" / "test" / "00009.png")
    with pytest.raises(DatasetError, match="splits.mat lists 2"):
        NYUv2(tmp_path, "test")
    (root / "splits.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="unreadable"):
        NYUv2(tmp_path, "test")


def _save_teacher(path: Path, arch: str, c: int, prefix: str = "") -> dict:
    model = create_model(arch, c)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 200, "best_acc1": 94.87}, path)
    return model.state_dict()


def test_load_teacher_released_format(tmp_path: Path) -> None:
    ref = _save_teacher(tmp_path / "cifar10_wrn16_1.pth", "wrn16_1", 10, prefix="module.")
    t = convert.load_teacher(tmp_path / "cifar10_wrn16_1.pth", "wrn16_1", 10)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert all(torch.equal(ref[k], v) for k, v in t.state_dict().items())


@pytest.mark.parametrize("arch,classes,match", [
    ("wrn40_2", 10, "expected wrn40_2, found wrn16_1"),
    ("wrn16_1", 100, "has 10 classes, expected 100"),
])
def test_teacher_of_another_architecture_or_class_count(tmp_path: Path, arch: str, classes: int, match: str) -> None:
    _save_teacher(tmp_path / "t.pth", "wrn16_1", 10)
    with pytest.raises(UserError, match=match) as err:
        convert.load_teacher(tmp_path / "t.pth", arch, classes)
    assert "\n" not in str(err.value)


def test_teacher_absent_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found; pass model.teacher_checkpoint"):
        convert.load_teacher(tmp_path / "none.pth", "wrn16_1", 10)
    (tmp_path / "bad.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError, match="bad.pth"):
        convert.load_teacher(tmp_path / "bad.pth", "wrn16_1", 10)


def test_checkpoint_filter_fn_torchvision_deeplab() -> None:
    model = create_model("deeplabv3_mobilenet", 13)
    ours = model.state_dict()
    tv = {("classifier." + k[len("classifier.classifier."):] if k.startswith("classifier.classifier.") else k): v
          for k, v in ours.items()}
    tv["aux_classifier.0.weight"] = torch.zeros(1)
    out = convert.checkpoint_filter_fn(tv, model)
    assert set(out) == set(ours)


def test_fixture_dispatch_names_unknown_sources() -> None:
    src = "datafree/hooks.py::DeepInversionHook (zju-vipa/Fast-Datafree)"
    assert convert.fixture_kind({"source": src}) == "bn_loss"
    assert convert.fixture_kind({"source": "datafree/synthesis/fast_meta.py::FastMetaSynthesizer.synthesize "
                                           "(loss block), datafree/criterions.py::kldiv"}) == "inversion_losses"
    with pytest.raises(UserError, match="unknown fixture source datafree/synthesis/contrastive.py::CMISynthesizer"):
        convert.fixture_kind({"source": "datafree/synthesis/contrastive.py::CMISynthesizer"})
    with pytest.raises(UserError, match="no 'source'"):
        convert.fixture_kind({})
    with pytest.raises(UserError, match="known registry key"):
        convert.registry_key("wrn99_9 (copy)")
    assert convert.registry_key("wrn16_1 (perturbed copy of the teacher)") == "wrn16_1"
    with pytest.raises(UserError, match="augmentation 'kornia crop' cannot be replayed"):
        convert.augmentation_disabled({"augmentation": "kornia crop"})
    with pytest.raises(UserError, match="always in train mode"):
        convert.generator_from_record({"nz": 8, "ngf": 4, "img_size": 8, "nc": 3, "mode": "eval"})


def test_unknown_model_name() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet99'"):
        create_model("resnet99", 10)
