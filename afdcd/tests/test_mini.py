"""Spec i's mini reproduction (afdcd/mini.py): the models' parameter counts, the data generator, the wiring."""

from __future__ import annotations

from pathlib import Path

import torch

from afdcd.mini import (
    BASE_COLOURS,
    CLASS_NAMES,
    MiniRecipe,
    ShapesPool,
    make_shapes,
    mini_student,
    mini_teacher,
    run_mini,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mini_param_counts_are_spec_i() -> None:
    teacher, student = count(mini_teacher()), count(mini_student())
    assert (teacher, student) == (509_349, 46_461)
    assert (round(teacher / 1000), round(student / 1000)) == (509, 46)  # spec i: "509k" / "46k"


def test_mini_models_work_at_output_stride_4() -> None:
    x = torch.randn(2, 3, 48, 48)
    for net, channels in ((mini_teacher(), 128), (mini_student(), 32)):
        out = net.forward_all(x)
        assert out.logits.shape == (2, len(CLASS_NAMES), 12, 12) and out.aux is None
        assert out.c4.shape == (2, channels, 12, 12) and out.head_feat.shape == (2, 64, 12, 12)


def test_mini_shapes_are_deterministic() -> None:
    images, labels = make_shapes(32, seed=5)
    again = make_shapes(32, seed=5)
    other = make_shapes(32, seed=6)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(labels, other[1])
    assert images.shape == (32, 3, 48, 48) and images.dtype == torch.float32
    assert labels.shape == (32, 48, 48) and labels.dtype == torch.int64


def test_mini_shapes_are_learnable_shaped() -> None:
    images, labels = make_shapes(256, seed=0)
    assert int(labels.min()) == 0 and int(labels.max()) == len(CLASS_NAMES) - 1
    assert bool((labels.flatten(1) > 0).any(1).all())  # every image holds a shape
    share = torch.bincount(labels.flatten(), minlength=len(CLASS_NAMES)).float() / labels.numel()
    assert 0.7 < share[0] < 0.95 and bool((share[1:] > 0.01).all()), share
    # colour carries the class: each class's mean pixel colour is nearest to its own base hue
    for c in range(1, len(CLASS_NAMES)):
        mean = images.permute(1, 0, 2, 3)[:, labels == c].mean(1)
        assert int((BASE_COLOURS - mean).norm(dim=1).argmin()) == c - 1


def test_run_mini_wiring_on_a_tiny_budget(tmp_path: Path) -> None:
    recipe = MiniRecipe(train_images=32, val_images=8, teacher_iterations=2, student_iterations=2)
    results = run_mini(seeds=(0,), out=tmp_path, recipe=recipe)
    assert set(results) == {"teacher", "ce", "kd", "afdcd"} and all(len(v) == 1 for v in results.values())
    assert all(0.0 <= v[0] <= 100.0 for v in results.values())
    keys = {name: set(torch.load(tmp_path / "seed0" / name / "last.pt", weights_only=True)["model"])
            for name in ("ce", "kd", "afdcd")}
    assert not any(k.startswith("teacher.") for k in keys["ce"])
    assert any(k.startswith("teacher.") for k in keys["kd"])
    assert not any(k.startswith("loss_module.") for k in keys["kd"])
    assert "loss_module.generator.0.weight" in keys["afdcd"] and "loss_module.align.weight" in keys["afdcd"]


def test_the_students_of_a_seed_see_the_same_batches(tmp_path: Path, monkeypatch) -> None:
    # the Af-DCD loss draws its mask from the global generator; the flips must not depend on it
    from afdcd import distiller

    seen: list[list[float]] = []
    forward_train = distiller.SegDistiller.forward_train

    def record(self, images, labels):
        if self.training:
            seen.append(images.sum(dim=(1, 2, 3)).tolist())
        return forward_train(self, images, labels)

    monkeypatch.setattr(distiller.SegDistiller, "forward_train", record)
    recipe = MiniRecipe(train_images=32, val_images=8, teacher_iterations=2, student_iterations=3)
    run_mini(seeds=(0,), out=tmp_path, recipe=recipe)
    batches = seen[2:]  # after the teacher's two steps: CE, CE + KD, Af-DCD x 3 steps
    assert len(batches) == 9
    assert batches[0:3] == batches[3:6] == batches[6:9]
    flipped = ShapesPool(*make_shapes(4, seed=0), hflip=True, seed=1)
    first = [flipped[i][0] for i in range(4)]
    torch.rand(100)  # other draws on the global generator change nothing
    flipped.reseed(1)
    assert all(torch.equal(a, flipped[i][0]) for i, a in enumerate(first))
