"""Readers round-trip with the synthetic writers; every promised error message; the real MNIST test set."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import (
    CIFAR,
    MNIST,
    DatasetError,
    ImageFolder,
    build_dataset,
    build_transforms,
    read_idx,
    split_indices,
    write_idx,
    write_synthetic_cifar,
    write_synthetic_imagefolder,
)
from common.data.mnist import IMAGES_MAGIC, LABELS_MAGIC
from common.errors import UserError
from common.testing import require_or_skip, shared_data_dir

LAYOUT = "root/{train,val}/<class>/<image>"


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_synthetic_imagefolder(
        root, num_classes=3, train_per_class=4, val_per_class=2, image_size=32, seed=0
    )
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar(root, num_classes=10, train_per_class=5, test_per_class=2, seed=0)
    write_synthetic_cifar(root, num_classes=100, train_per_class=2, test_per_class=1, seed=0)
    return root


# ----------------------------------------------------------------------------------------- image folders
def test_imagefolder_round_trip(folder_root):
    train, val = ImageFolder(folder_root, "train"), ImageFolder(folder_root, "val")
    assert train.classes == val.classes == ["class_000", "class_001", "class_002"]
    assert len(train) == 12 and len(val) == 6
    assert train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    img, label = train[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32) and label == 1
    assert train.path(5).parent.name == "class_001" and train.path(5).suffix == ".JPEG"
    assert train.samples[5] == (str(train.path(5)), 1)
    x, _ = ImageFolder(folder_root, "val", transform=build_transforms("imagenet", False, 32))[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_synthetic_writer_is_deterministic_and_skips(tmp_path, folder_root):
    args = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=32)
    one = folder_root / "train/class_002/class_002_00003.JPEG"
    mtime = one.stat().st_mtime_ns
    write_synthetic_imagefolder(folder_root, seed=0, **args)  # matching marker: nothing rewritten
    assert one.stat().st_mtime_ns == mtime
    write_synthetic_imagefolder(tmp_path / "same", seed=0, **args)
    write_synthetic_imagefolder(tmp_path / "other", seed=1, **args)
    rel = "train/class_002/class_002_00003.JPEG"
    assert (tmp_path / "same" / rel).read_bytes() == one.read_bytes()
    assert (tmp_path / "other" / rel).read_bytes() != one.read_bytes()
    # other arguments: the old synthetic set is replaced, not mixed in
    write_synthetic_imagefolder(tmp_path / "same", seed=0, **{**args, "train_per_class": 2})
    assert len(ImageFolder(tmp_path / "same", "train")) == 6


def test_synthetic_writer_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="no synthetic writer made"):
        write_synthetic_imagefolder(tmp_path, num_classes=2, train_per_class=1, val_per_class=1)
    assert (tmp_path / "mine.txt").exists()


def _colour_and_orientation(x: np.ndarray) -> np.ndarray:
    """Per image: mean colour and the dominant grating orientation (doubled angle of the power spectrum)."""
    x = x.astype(np.float32) / 255
    g = x.mean(-1)
    power = np.abs(np.fft.fft2(g - g.mean(axis=(1, 2), keepdims=True))) ** 2
    f = np.fft.fftfreq(g.shape[1])
    fy, fx = np.meshgrid(f, f, indexing="ij")
    ang = 2 * np.arctan2(fy, fx)
    c, s = (power * np.cos(ang)).sum((1, 2)), (power * np.sin(ang)).sum((1, 2))
    r = np.hypot(c, s)
    return np.concatenate([4 * x.mean(axis=(1, 2)), np.stack([c / r, s / r], 1)], 1)


def test_synthetic_classes_are_learnable():
    """100 classes: a nearest-class-mean rule on colour + orientation, fitted on train images, labels held-out
    images almost perfectly (chance is 1 %), so the classes differ in what a small CNN picks up."""
    from common.data.synthetic import class_images

    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(100), 10), np.repeat(np.arange(100), 3)
    f_train = _colour_and_orientation(class_images(y_train, 100, 32, rng))
    f_test = _colour_and_orientation(class_images(y_test, 100, 32, rng))
    centres = np.stack([f_train[y_train == c].mean(0) for c in range(100)])
    pred = np.linalg.norm(f_test[:, None] - centres[None], axis=-1).argmin(1)
    assert (pred == y_test).mean() > 0.95


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(DatasetError) as e:
        ImageFolder(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and LAYOUT in msg and "\n" not in msg


def test_imagefolder_missing_split(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(DatasetError, match=r"train does not exist \(folders present: \['training'\]\)"):
        ImageFolder(tmp_path, "train")


def test_imagefolder_wrong_layout(tmp_path):
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetError) as e:
        ImageFolder(tmp_path, "val")
    msg = str(e.value)
    assert "no class folders in" in msg and "1 images lie directly in it" in msg and LAYOUT in msg


def test_imagefolder_empty_class(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"class folder .*train/dog has no images"):
        ImageFolder(tmp_path, "train")


def test_imagefolder_class_mismatch(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "emu"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "a.jpg")
    with pytest.raises(DatasetError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        ImageFolder(tmp_path, "train")


def test_imagefolder_corrupt_image_named_when_read(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    bad = tmp_path / "train" / "cat" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = ImageFolder(tmp_path, "train")  # the list is built without opening files
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert f"cannot read image {bad}" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_round_trip(cifar_root, num_classes):
    per_class = 5 if num_classes == 10 else 2
    folder = cifar_root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    for root in (cifar_root, folder):  # the parent or the extracted folder itself
        ds = CIFAR(root, num_classes, "train")
        assert ds.data.shape == (num_classes * per_class, 32, 32, 3) and ds.data.dtype == np.uint8
        assert np.bincount(ds.targets).tolist() == [per_class] * num_classes
        assert ds.classes[:2] == ["class_000", "class_001"] and len(ds.classes) == num_classes
    test = build_dataset(f"cifar{num_classes}", cifar_root, "val")
    assert len(test) == num_classes * (2 if num_classes == 10 else 1)
    img, label = test[0]
    assert img.size == (32, 32) and 0 <= label < num_classes
    x, _ = CIFAR(cifar_root, num_classes, "test", transform=build_transforms("cifar", True))[0]
    assert x.shape == (3, 32, 32)


def test_cifar10_train_is_five_batches_and_coarse_labels(cifar_root):
    names = sorted(os.listdir(cifar_root / "cifar-10-batches-py"))
    expected = ["batches.meta"] + [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert [n for n in names if not n.startswith(".")] == expected
    fine = CIFAR(cifar_root, 100, "train")
    coarse = CIFAR(cifar_root, 100, "train", label_type="coarse")
    assert (coarse.targets == fine.targets // 5).all() and len(coarse.classes) == 20


def _official_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f, protocol=2)


def test_cifar_pixel_layout_is_channel_planes(tmp_path):
    """b'data' rows are 1024 R, 1024 G, 1024 B values (row-major 32x32): check one pixel by hand."""
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0], row[0, 1024], row[0, 2048] = 10, 20, 30  # pixel (0, 0) = (10, 20, 30)
    row[0, 1 * 32 + 2] = 99  # red plane, row 1, column 2
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _official_batch(folder / name, row, [7])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    ds = CIFAR(tmp_path, 10, "test")
    assert ds.data[0, 0, 0].tolist() == [10, 20, 30] and ds.data[0, 1, 2, 0] == 99 and ds.targets[0] == 7
    assert len(CIFAR(tmp_path, 10, "train")) == 5


def test_cifar_missing_root(tmp_path):
    with pytest.raises(DatasetError) as e:
        CIFAR(tmp_path, 100, "train")
    msg = str(e.value)
    assert f"CIFAR-100 not found at {tmp_path}" in msg and "cifar-100-python/{train, test, meta}" in msg


def test_cifar_missing_batch_named(tmp_path):
    write_synthetic_cifar(tmp_path, num_classes=10, train_per_class=1, test_per_class=1)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DatasetError, match=f"missing CIFAR file {missing}"):
        CIFAR(tmp_path, 10, "train")


def test_cifar_wrong_key_and_corrupt_pickle(tmp_path):
    folder = write_synthetic_cifar(tmp_path, num_classes=100, train_per_class=1, test_per_class=1)
    _official_batch(folder / "test", np.zeros((1, 3072), np.uint8), [0], label_key=b"labels")
    keys = r"has no key b'fine_labels' \(keys: \['batch_label', 'data', 'labels'\]\)"
    with pytest.raises(DatasetError, match=keys):
        CIFAR(tmp_path, 100, "test")
    (folder / "test").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(DatasetError) as e:
        CIFAR(tmp_path, 100, "test")
    assert f"corrupt CIFAR file {folder / 'test'}" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- MNIST / IDX
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, images)
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(tmp_path / name, expect_magic=IMAGES_MAGIC)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and (out == images).all()
    floats = np.array([[1.5, -2.0]], dtype=np.float32)
    write_idx(tmp_path / "f.idx", floats)
    assert (tmp_path / "f.idx").read_bytes()[:4] == bytes([0, 0, 0x0D, 2])
    assert (read_idx(tmp_path / "f.idx") == floats).all()


def test_idx_header_is_big_endian_by_hand(tmp_path):
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])  # 1-D ubyte, 3 values
    (tmp_path / "l").write_bytes(raw)
    assert read_idx(tmp_path / "l", expect_magic=LABELS_MAGIC).tolist() == [7, 8, 9]


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DatasetError, match=r"bad IDX magic 0x12340801 in .*bad"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="IDX magic 0x00000801 .* expected 0x00000803"):
        read_idx(tmp_path / "labels", expect_magic=IMAGES_MAGIC)


def test_idx_truncated_and_corrupt_gzip(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 28, 28), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-10])
    sizes = r"header says shape \(5, 28, 28\) \(3920 data bytes\) but the file holds 3910"
    with pytest.raises(DatasetError, match=sizes):
        read_idx(tmp_path / "x")
    write_idx(tmp_path / "y.gz", np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8))
    (tmp_path / "y.gz").write_bytes((tmp_path / "y.gz").read_bytes()[:1000])
    with pytest.raises(DatasetError, match=r"cannot decompress .*y\.gz"):
        read_idx(tmp_path / "y.gz")
    with pytest.raises(DatasetError, match="missing IDX file"):
        read_idx(tmp_path / "absent.gz")


def test_split_indices_deterministic_partition():
    tr, te = split_indices(100, 80, seed=3)
    assert len(tr) == 80 and len(te) == 20
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(100))
    assert (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
    tr2, _ = split_indices(100, 80, seed=3)
    tr3, _ = split_indices(100, 80, seed=4)
    assert (tr == tr2).all() and not (tr == tr3).all()


def test_mnist_pair_and_missing_files(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.full((6, 28, 28), 200, np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    ds = MNIST.from_root(tmp_path, "test", indices=np.array([1, 4]))
    img, label = ds[1]
    assert len(ds) == 2 and label == 4 and img.mode == "L" and img.size == (28, 28)
    with pytest.raises(DatasetError, match=r"MNIST train file train-images-idx3-ubyte\[\.gz\] not found"):
        build_dataset("mnist", tmp_path, "train")


def test_real_mnist_t10k():
    mnist_dir = require_or_skip(shared_data_dir("mnist"), "the real MNIST test set (shared/data/mnist)")
    ds = MNIST.from_root(mnist_dir, "test")
    assert ds.data.shape == (10_000, 28, 28) and ds.data.dtype == np.uint8
    # the published per-digit counts of the MNIST test set
    assert np.bincount(ds.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.data.max() == 255 and 0.10 < ds.data.mean() / 255 < 0.16  # mostly black, white strokes
    tr, te = split_indices(len(ds), 8_000, seed=0)
    train = MNIST.from_root(mnist_dir, "test", indices=tr)
    assert len(train) == 8_000 and len(MNIST.from_root(mnist_dir, "test", indices=te)) == 2_000
    x, _ = MNIST.from_root(mnist_dir, "test", transform=build_transforms("mnist", False))[0]
    assert x.shape == (1, 28, 28)


# ------------------------------------------------------------------------------ transforms, dispatch
def test_transforms():
    mean = tuple(round(m * 255) for m in (0.5071, 0.4867, 0.4408))
    x = build_transforms("cifar100", False)(Image.new("RGB", (32, 32), mean))
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.01  # the CIFAR-100 mean maps to ~0
    tr = build_transforms("imagenet", True, 64, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    assert "RandAugment" in repr(tr) and "RandomErasing(p=0.25" in repr(tr)
    assert tr(Image.new("RGB", (80, 70))).shape == (3, 64, 64)
    ev = build_transforms("imagenet", False, 64, crop_pct=0.875, interpolation="bicubic")
    assert "Resize(size=73, interpolation=bicubic" in repr(ev)
    assert build_transforms("mnist", True, to_rgb=True)(Image.new("L", (28, 28))).shape == (3, 28, 28)
    with pytest.raises(UserError, match="unknown augmentation option 'mixup' for cifar"):
        build_transforms("cifar", True, mixup=0.8)


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    """RandAugment inc1 at magnitude 10 posterizes to 0 bits; Pillow >= 12 raises there, timm passes it on."""
    from timm.data.auto_augment import rand_augment_transform

    build_transforms("imagenet", True, 32, auto_augment="rand-m9-mstd0.5-inc1")  # installs the guard
    op = rand_augment_transform("rand-n1-m10-mstd0-inc1", {}).ops
    (posterize,) = [o for o in op if o.name == "PosterizeIncreasing"]
    posterize.prob = 1.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize(img).getextrema() == ((0, 0), (0, 0), (0, 0))  # 4 - int(10 / 10 * 4) = 0 bits kept


def test_build_dataset_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'; valid names: imagenet, imagefolder, cif"):
        build_dataset("svhn", tmp_path, "train")
