"""Segmentation readers round-trip with the synthetic writers of each real layout; every promised message."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data import DatasetError, SegmentationDataset, majority_class_miou, write_synthetic_segmentation
from common.data.base import MARKER_NAME
from common.data.segmentation import label_lut

NAMES = ("cityscapes", "voc", "camvid", "ade20k", "coco_stuff_164k")
SIZES = {"cityscapes": {"train": 3, "val": 2}, "voc": {"train": 3, "val": 2}, "camvid": {"train": 3, "val": 2},
         "ade20k": {"train": 3, "val": 2}, "coco_stuff_164k": {"train": 3, "val": 2}}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lists", [True, False], ids=["lists", "derived"])
def test_round_trip(tmp_path: Path, name: str, lists: bool) -> None:
    root = write_synthetic_segmentation(name, tmp_path / name, num_classes=5, sizes=SIZES[name], height=24,
                                        width=32, seed=1, write_lists=lists)
    for split, n in SIZES[name].items():
        ds = SegmentationDataset(name, root, split)
        assert len(ds) == n
        image, label = ds[0]
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8
        assert label.shape == (24, 32) and label.dtype == np.int64
        assert label.min() == -1 and 0 <= label[label >= 0].min() and label.max() < 5
    assert write_synthetic_segmentation(name, root, num_classes=5, sizes=SIZES[name], height=24, width=32, seed=1,
                                        write_lists=lists) == root  # kept, not rewritten


def test_synthetic_labels_are_what_was_drawn(tmp_path: Path) -> None:
    """The raw PNG values map back to the train ids of the scene (Cityscapes labelIds, VOC palette)."""
    root = write_synthetic_segmentation("cityscapes", tmp_path / "c", num_classes=19, sizes={"train": 2, "val": 1})
    ds = SegmentationDataset("cityscapes", root, "train")
    raw = cv2.imread(str(ds.files[0][1]), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(raw)) <= {0, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    assert np.array_equal(ds[0][1], label_lut("cityscapes")[raw])
    assert majority_class_miou(ds) > 0


def test_coco_stuff_171_mapping() -> None:
    lut182, lut171 = label_lut("coco_stuff_164k"), label_lut("coco_stuff_164k", 171)
    assert lut182[181] == 181 and lut171[181] == 170 and lut171[11] == -1 and lut171[12] == 11
    assert sorted(set(lut171[:182].tolist()) - {-1}) == list(range(171))
    with pytest.raises(DatasetError, match="182 classes"):
        label_lut("coco_stuff_164k", 100)


def test_derived_list_checked_against_split_size(tmp_path: Path) -> None:
    root = write_synthetic_segmentation("camvid", tmp_path / "cv", sizes={"train": 3, "val": 2}, write_lists=False)
    (root / MARKER_NAME).unlink()  # no longer marked synthetic: the spec's split sizes apply
    with pytest.raises(DatasetError, match=r"found 3 images .* the split has 367 \(spec d\)"):
        SegmentationDataset("camvid", root, "train")
    (root / "camvid_train_list.txt").write_text("train/train_00000.png trainannot/train_00000.png\n")
    assert len(SegmentationDataset("camvid", root, "train")) == 1  # an explicit list is taken as it is


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"root .*nope does not exist; expected root/leftImg8bit"):
        SegmentationDataset("cityscapes", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="unknown segmentation dataset 'kitti'"):
        SegmentationDataset("kitti", tmp_path, "train")
    root = write_synthetic_segmentation("cityscapes", tmp_path / "c", num_classes=3, sizes={"train": 2, "val": 1})
    with pytest.raises(DatasetError, match="splits train, val, test, not 'training'"):
        SegmentationDataset("cityscapes", root, "training")
    (root / "val.lst").write_text("only_one_field\n")
    with pytest.raises(DatasetError, match=r"val.lst line 1 has 1 fields, expected 2"):
        SegmentationDataset("cityscapes", root, "val")
    (root / "val.lst").write_text("leftImg8bit/val/x.png\tgtFine/val/x.png\n")
    with pytest.raises(DatasetError, match=r"2 listed file\(s\) of cityscapes val are missing, first .*x.png"):
        SegmentationDataset("cityscapes", root, "val")
    with pytest.raises(DatasetError, match="no list at .* and no images found"):
        SegmentationDataset("cityscapes", root, "test")


def test_label_outside_class_set_names_png_and_value(tmp_path: Path) -> None:
    root = write_synthetic_segmentation("camvid", tmp_path / "cv", num_classes=4, sizes={"train": 2, "val": 1})
    ds = SegmentationDataset("camvid", root, "train")
    label_png = ds.files[1][1]
    raw = cv2.imread(str(label_png), cv2.IMREAD_GRAYSCALE)
    raw[0, 0] = 200
    cv2.imwrite(str(label_png), raw)
    with pytest.raises(DatasetError, match=rf"label {label_png} holds value 200, outside the 11 classes of camvid"):
        ds[1]
    label_png.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read label PNG"):
        ds[1]
    ds.files[0][0].write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read image"):
        ds[0]


def test_train_id_beyond_a_shrunk_class_set_names_png_and_value(tmp_path: Path) -> None:
    """data.num_classes below the layout's (smoke): a valid Cityscapes id whose train id is >= num_classes is
    outside the class set, a one-line DatasetError, not an IndexError / device assert in the loss."""
    root = write_synthetic_segmentation("cityscapes", tmp_path / "c", num_classes=5, sizes={"train": 2, "val": 1})
    ds = SegmentationDataset("cityscapes", root, "train", num_classes=5)
    ds[0]  # the writer's own 5 classes read
    label_png = ds.files[0][1]
    raw = cv2.imread(str(label_png), cv2.IMREAD_GRAYSCALE)
    raw[0, 0] = 33  # labelId 33 = train id 18 (bicycle)
    cv2.imwrite(str(label_png), raw)
    assert int(SegmentationDataset("cityscapes", root, "train")[0][1][0, 0]) == 18  # 19 classes: valid
    with pytest.raises(DatasetError, match=rf"label {label_png} holds value 33, outside the 5 classes of cityscapes"):
        ds[0]


def test_voc_train_aug_derived_from_aug_minus_val(tmp_path: Path) -> None:
    root = write_synthetic_segmentation("voc", tmp_path / "v", num_classes=6, sizes={"train": 3, "val": 2},
                                        write_lists=False)
    train = SegmentationDataset("voc", root, "train")
    val = SegmentationDataset("voc", root, "val")  # ImageSets/Segmentation/val.txt, palette PNGs
    assert {p.stem for p, _ in train.files}.isdisjoint({p.stem for p, _ in val.files}) and len(train) == 3
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="VOC val list missing"):
        SegmentationDataset("voc", root, "train")


def test_writer_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("data")
    with pytest.raises(DatasetError, match="holds data that no synthetic writer made"):
        write_synthetic_segmentation("ade20k", tmp_path)
