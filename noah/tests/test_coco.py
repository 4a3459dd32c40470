"""MS-COCO multi-label (spec d.5): the reader on the synthetic writer's files, mAP, bad layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import COCOMultiLabel, DatasetError, write_synthetic_coco
from common.data.coco import synthetic_category_ids
from common.metrics import average_precision, mean_average_precision


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco"), num_classes=6, train_images=40, val_images=12,
                                image_size=32, max_objects=3, unlabelled_fraction=0.2, seed=1)


def test_reader_matches_the_json(coco: Path) -> None:
    ds = COCOMultiLabel(coco, "train")
    data = json.loads((coco / "annotations" / "instances_train2014.json").read_text())
    ids = synthetic_category_ids(6)
    assert ds.category_ids == ids and ds.classes == [f"class_{c:03d}" for c in range(6)]
    by_image: dict[int, set[int]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], set()).add(ids.index(a["category_id"]))
    labelled = [im for im in data["images"] if im["id"] in by_image]
    assert 0 < len(labelled) < len(data["images"])  # some images have no object: dropped by default
    assert len(ds) == len(labelled)
    for i, im in enumerate(labelled):
        img, target = ds[i]
        assert img.size == (32, 32) and target.dtype == torch.float32
        assert set(torch.nonzero(target).flatten().tolist()) == by_image[im["id"]]
    assert len(COCOMultiLabel(coco, "train", keep_unlabelled=True)) == len(data["images"])
    assert abs(ds.labels.mean() - 2 / 6) < 0.1  # prevalence ~ mean objects / classes (docstring)


def test_writer_is_deterministic_and_idempotent(coco: Path, tmp_path: Path) -> None:
    other = write_synthetic_coco(tmp_path / "c", num_classes=6, train_images=40, val_images=12, image_size=32,
                                 max_objects=3, unlabelled_fraction=0.2, seed=1)
    a = (coco / "annotations" / "instances_val2014.json").read_text()
    assert (other / "annotations" / "instances_val2014.json").read_text() == a
    stamp = (coco / "annotations" / "instances_val2014.json").stat().st_mtime_ns
    write_synthetic_coco(coco, num_classes=6, train_images=40, val_images=12, image_size=32, max_objects=3,
                         unlabelled_fraction=0.2, seed=1)
    assert (coco / "annotations" / "instances_val2014.json").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="holds data"):
        write_synthetic_coco(foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_bad_layouts_are_one_line_errors(coco: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        COCOMultiLabel(tmp_path / "nowhere")
    (tmp_path / "r" / "train2014").mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_train2014.json not found"):
        COCOMultiLabel(tmp_path / "r")
    with pytest.raises(DatasetError, match=r"val2014 not found"):
        COCOMultiLabel(tmp_path / "r", "val")
    (tmp_path / "r" / "annotations").mkdir()
    (tmp_path / "r" / "annotations" / "instances_train2014.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="not a COCO instances file") as err:
        COCOMultiLabel(tmp_path / "r")
    assert "\n" not in str(err.value)


def brute_ap(scores: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's definition, one threshold at a time."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = (pred & (y == 1)).sum()
        recall, precision = tp / y.sum(), tp / pred.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_average_precision_against_the_definition() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((50, 7)) < 0.3).astype(np.int64)
    y[0] = 1
    scores = np.round(rng.normal(size=(50, 7)) + y, 1)  # rounded: many ties
    ap = average_precision(torch.from_numpy(scores), torch.from_numpy(y))
    for k in range(7):
        assert ap[k].item() == pytest.approx(brute_ap(scores[:, k], y[:, k]), abs=1e-12)
    assert mean_average_precision(torch.from_numpy(y).float(), torch.from_numpy(y)) == pytest.approx(100.0)
    y[:, 3] = 0
    ap = average_precision(torch.from_numpy(scores), torch.from_numpy(y))
    assert torch.isnan(ap[3]) and not torch.isnan(ap[[0, 1, 2, 4, 5, 6]]).any()
    # random scores: mAP is about the prevalence (the smoke floor's reference)
    yy = torch.rand(4000, 5) < 0.2
    assert abs(mean_average_precision(torch.rand(4000, 5), yy) - 20.0) < 3.0


def test_asymmetric_loss_reduces_to_bce_and_downweights_easy_negatives() -> None:
    from noah.multilabel import AsymmetricLoss

    logits, y = torch.randn(8, 5, dtype=torch.float64), (torch.rand(8, 5) < 0.3).double()
    plain = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, y)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    assert plain.item() == pytest.approx(bce.item(), rel=1e-6)
    easy = torch.full((1, 1), -4.0)
    assert AsymmetricLoss()(easy, torch.zeros(1, 1)).item() == 0.0  # p < clip: shifted to zero
    assert AsymmetricLoss()(-easy, torch.ones(1, 1)).item() > 0.0


def test_multilabel_training_object_and_evaluation(coco: Path) -> None:
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from common.dist import DistEnv
    from common.tasks import EvalContext, MultiLabelTask
    from noah.models import create_model
    from noah.multilabel import MultiLabelClassifier

    tf = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    ds = COCOMultiLabel(coco, "val", transform=tf)
    model = create_model("resnet18", head="noah", num_classes=ds.num_classes)
    for loss in ("bce", "asl"):
        method = MultiLabelClassifier(model, loss=loss)
        images, targets = next(iter(DataLoader(ds, batch_size=4)))
        logits, losses = method.forward_train(images, targets)
        assert logits.shape == (4, 6) and set(losses) == {f"loss_{loss}"} and losses[f"loss_{loss}"].ndim == 0
        assert method.eval_model() is model
    metrics = MultiLabelTask().evaluate(model, DataLoader(ds, batch_size=5), EvalContext(DistEnv()))
    assert set(metrics) == {"mAP", "loss", "prevalence"} and 0 <= metrics["mAP"] <= 100
    assert metrics["prevalence"] == pytest.approx(ds.labels.mean() * 100)
    with pytest.raises(ValueError, match="bce' or 'asl"):
        MultiLabelClassifier(model, loss="focal")
