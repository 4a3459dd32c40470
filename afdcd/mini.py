"""Spec i's mini reproduction: procedural shapes data and two small dilated conv nets. Not a paper model.

It runs the whole Af-DCD pipeline at toy scale to show the direction of the effect on CPU in minutes:
a teacher is trained first, then three students per seed, CE only, CE + KD and CE + KD + Af-DCD, through
the same code path as the table rows (`SegDistiller` with our `AfDCDLoss`, on `common.engine.Trainer` with
the iteration budget, poly lr and clipping of the loss module only; mIoU by `common.tasks.SegmentationTask`).

    python -m afdcd.mini                   # teacher + 3 seeds x 3 students, prints the table (1 thread)
    python -m afdcd.mini seeds=0 out=/tmp/mini

* Data (`make_shapes`): 48 x 48 RGB, random-colour background, 2-4 shapes of 4 classes (disc, square,
  triangle, ring; class 0 = background), radius 4-10 px, colour = the class's base hue + uniform noise of width 0.35,
  Gaussian pixel noise (sigma 0.15). Generated once, vectorised over images: 512 training images (random
  horizontal flip) and 128 validation images from a separate seed.
* Models (`MiniSegNet`): seven conv3x3 + BN + ReLU layers at output stride 4, (3 -> w, s2), (w -> w),
  (w -> 2w, s2), (2w -> 2w), (2w -> F), (F -> F, dilation 2), (F -> F, dilation 4), then conv3x3 (-> 64) + BN +
  ReLU and a 1x1 conv to 5 classes. Teacher w 32, F 128 (509,349 params); student w 8, F 32 (46,461 params).
  "c4" is the last body feature (12 x 12).
* Recipe (`MiniRecipe`): SGD lr 0.02, momentum 0.9, wd 1e-4, poly 0.9, batch 16; teacher 400 iterations,
  students 300; KD T 1, l_kd 1; Af-DCD align 1x1 32 -> 128, plain generator, mask 0.75, no pooling, 4 x 4
  patches, M 8, tau 0.07, l_fd 2e-4 (L_fm sums over C x H x W: rescale it for other map sizes), l_ctr 0.02,
  clip 15 on the loss module's gradients.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.cli import parse_overrides, split_list
from common.config import Amp, OptimConfig, ScheduleConfig, ScheduleName, Switch, TrainerConfig
from common.engine import Trainer
from common.errors import cli_guard
from common.tasks import SegmentationTask

from .afdcd import AfDCDLoss
from .distiller import SegDistiller
from .models import SegOutputs

__all__ = ["CLASS_NAMES", "MiniRecipe", "MiniSegNet", "ShapesPool", "make_shapes", "run_mini"]

SIZE = 48
CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
# class-specific base hue (RGB in [0, 1]) of disc, square, triangle, ring
BASE_COLOURS = torch.tensor([[0.85, 0.20, 0.20], [0.20, 0.80, 0.25], [0.25, 0.30, 0.90], [0.90, 0.80, 0.15]])
MAX_SHAPES = 4


# ----------------------------------------------------------------------------------------------- data
def make_shapes(num_images: int, seed: int, size: int = SIZE, colour_noise: float = 0.35,
                pixel_noise: float = 0.15) -> tuple[Tensor, Tensor]:
    """(images (N, 3, size, size) float32, labels (N, size, size) int64) of spec i, from one seeded generator.

    Each image has 2-4 shapes painted in order (a later one covers an earlier one); the draw is vectorised
    over images, one pass per shape slot. The colour noise is uniform of width `colour_noise` per channel
    (+-0.175 for 0.35): this reading gives the prototype's teacher (~70 mIoU); +-0.35 gave 65 and a CE
    student 13 points below the prototype's (README, spec i section).
    """
    g = torch.Generator().manual_seed(seed)
    n = num_images
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size).clone()
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    count = torch.randint(2, MAX_SHAPES + 1, (n,), generator=g)
    for slot in range(MAX_SHAPES):
        cls = torch.randint(1, len(CLASS_NAMES), (n,), generator=g)
        radius = 4.0 + 6.0 * torch.rand(n, generator=g)
        cy, cx = (radius[:, None] + (size - 2 * radius[:, None]) * torch.rand(n, 2, generator=g)).unbind(1)
        colour = BASE_COLOURS[cls - 1] + colour_noise * (torch.rand(n, 3, generator=g) - 0.5)
        dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
        r = radius[:, None, None]
        dist = torch.hypot(dy, dx)
        inside = torch.stack([
            dist <= r,                                                    # disc
            torch.maximum(dy.abs(), dx.abs()) <= 0.8 * r,                  # square
            (dy >= -r) & (dy <= r) & (2 * dx.abs() <= dy + r),             # triangle, apex up
            (dist <= r) & (dist >= 0.5 * r),                               # ring
        ], dim=1).gather(1, (cls - 1)[:, None, None, None].expand(n, 1, size, size)).squeeze(1)
        inside &= (slot < count)[:, None, None]
        images = torch.where(inside[:, None], colour[:, :, None, None], images)
        labels = torch.where(inside, cls[:, None, None], labels)
    images = images + pixel_noise * torch.randn(images.shape, generator=g)
    return images, labels


class ShapesPool(Dataset):
    """A pre-generated pool of (image, label) pairs; with `hflip`, each sample is mirrored with probability 0.5.

    The flips come from the pool's own generator (`reseed(seed)` before each run), not the global one: the
    Af-DCD loss draws its random mask from the global generator (as the official code), and with global flips
    every mask draw shifted the flip sequence, so the Af-DCD student saw other flips than the CE and CE + KD
    students of its seed. With the pool's generator the three students see the same batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, hflip: bool = False, seed: int = 0) -> None:
        self.images, self.labels, self.hflip = images, labels, hflip
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the flip sequence (workers=0: the draws follow the sampler's order)."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.images[index], self.labels[index]
        if self.hflip and bool(torch.rand((), generator=self.generator) < 0.5):
            image, label = image.flip(-1), label.flip(-1)
        return image, label


# ----------------------------------------------------------------------------------------------- models
def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MiniSegNet(nn.Module):
    """Spec i's dilated conv net at output stride 4: a 7-layer body ("c4" = its output) and a 2-layer head."""

    def __init__(self, width: int, feature_channels: int, num_classes: int = len(CLASS_NAMES),
                 head_channels: int = 64) -> None:
        super().__init__()
        w, f = width, feature_channels
        self.num_classes, self.feature_channels = num_classes, f
        self.body = nn.Sequential(
            _conv_bn_relu(3, w, stride=2), _conv_bn_relu(w, w),
            _conv_bn_relu(w, 2 * w, stride=2), _conv_bn_relu(2 * w, 2 * w),
            _conv_bn_relu(2 * w, f), _conv_bn_relu(f, f, dilation=2), _conv_bn_relu(f, f, dilation=4))
        self.head = _conv_bn_relu(f, head_channels)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward_all(self, x: Tensor, aux: bool = False) -> SegOutputs:
        """(logits, None, c4, head feature) at stride 4, the `SegOutputs` of the table models (no aux head)."""
        c4 = self.body(x)
        feat = self.head(c4)
        return SegOutputs(self.classifier(feat), None, c4, feat)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_all(x).logits


def mini_teacher() -> MiniSegNet:
    """Width 32, c4 128 channels: 509,349 params."""
    return MiniSegNet(32, 128)


def mini_student() -> MiniSegNet:
    """Width 8, c4 32 channels: 46,461 params."""
    return MiniSegNet(8, 32)


# ----------------------------------------------------------------------------------------------- recipe
@dataclass
class MiniRecipe:
    """Spec i's values."""

    train_images: int = 512
    val_images: int = 128
    train_seed: int = 0
    val_seed: int = 1
    teacher_iterations: int = 400
    student_iterations: int = 300
    batch: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    teacher_seed: int = 0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    fm_weight: float = 2e-4
    ctr_weight: float = 0.02
    clip_grad: float = 15.0
    loss: dict = field(default_factory=lambda: {"mask": "random", "mask_ratio": 0.75, "generator": "plain",
                                                "pool_size": 0, "patch_size": (4, 4), "groups": 8, "tau": 0.07})


def _fit(method: nn.Module, model: nn.Module, train_set: Dataset, val_set: Dataset, iterations: int, seed: int,
         out: Path, recipe: MiniRecipe, clip: list[nn.Parameter] | None = None) -> float:
    """Train `method` on the common loop for `iterations` steps and return the final val mIoU (%)."""
    trainer_cfg = TrainerConfig(iterations=iterations, global_batch=recipe.batch, workers=0, amp=Amp.off,
                                channels_last=Switch.off, eval_every=10**6, eval_batch=len(val_set),
                                clip_grad=recipe.clip_grad if clip else None, log_every=100, seed=seed,
                                resume="none")
    optim = OptimConfig(name="sgd", lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    schedule = ScheduleConfig(name=ScheduleName.poly, power=recipe.power, warmup_epochs=0.0, per_step=True)
    params = [p for p in method.parameters() if p.requires_grad]
    if isinstance(train_set, ShapesPool):
        train_set.reseed(seed)
    trainer = Trainer(method, train_set, val_set, trainer_cfg, optim, schedule, out, task=SegmentationTask(5),
                      model=model, params=params, clip_params=clip)
    return trainer.fit()["mIoU"]


def run_mini(seeds: Sequence[int] = (0, 1, 2), out: str | Path | None = None,
             recipe: MiniRecipe | None = None) -> dict[str, list[float]]:
    """Teacher once, then CE, CE + KD and Af-DCD students per seed; {"teacher": [..], "ce": [..], ...} in %.

    The three students of a seed start from the same weights and see the same batches.
    """
    recipe = recipe or MiniRecipe()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out is not None else Path(tmp)
        train_set = ShapesPool(*make_shapes(recipe.train_images, recipe.train_seed), hflip=True)
        val_set = ShapesPool(*make_shapes(recipe.val_images, recipe.val_seed))
        torch.manual_seed(recipe.teacher_seed)
        teacher = mini_teacher()
        results: dict[str, list[float]] = {"teacher": [], "ce": [], "kd": [], "afdcd": []}
        results["teacher"].append(_fit(SegDistiller(teacher, aux_weight=0.0), teacher, train_set, val_set,
                                       recipe.teacher_iterations, recipe.teacher_seed, root / "teacher", recipe))
        for seed in seeds:
            torch.manual_seed(seed)
            init = mini_student().state_dict()
            for name in ("ce", "kd", "afdcd"):
                student = mini_student()
                student.load_state_dict(init)
                loss_module = None
                if name == "afdcd":
                    torch.manual_seed(seed)
                    loss_module = AfDCDLoss(student.feature_channels, teacher.feature_channels, **recipe.loss)
                method = SegDistiller(student, teacher if name != "ce" else None, loss_module, aux_weight=0.0,
                                      kd_weight=recipe.kd_weight, kd_temperature=recipe.kd_temperature,
                                      fm_weight=recipe.fm_weight, ctr_weight=recipe.ctr_weight)
                clip = method.clip_parameters() or None
                results[name].append(_fit(method, student, train_set, val_set, recipe.student_iterations, seed,
                                          root / f"seed{seed}" / name, recipe, clip))
    return results


def format_table(results: dict[str, list[float]], seeds: Sequence[int]) -> str:
    """Markdown table: mIoU (%) per seed and the mean; the teacher is trained once."""
    lines = [f"teacher mIoU {results['teacher'][0]:.2f}", "", "| seed | CE | CE + KD | CE + KD + Af-DCD |",
             "|---|---|---|---|"]
    for i, seed in enumerate(seeds):
        lines.append(f"| {seed} | {results['ce'][i]:.2f} | {results['kd'][i]:.2f} | {results['afdcd'][i]:.2f} |")
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    lines.append(f"| mean | {mean['ce']:.2f} | {mean['kd']:.2f} | {mean['afdcd']:.2f} |")
    return "\n".join(lines)


@cli_guard
def main(argv: Sequence[str] | None = None) -> None:
    args, _ = parse_overrides(sys.argv[1:] if argv is None else list(argv), {"seeds": "0,1,2", "out": "", "threads": 1},
                              "python -m afdcd.mini", __doc__ or "")
    seeds = [int(s) for s in split_list(args["seeds"])]
    torch.set_num_threads(int(args["threads"]))
    t0 = time.time()
    results = run_mini(seeds, args["out"] or None)
    print(format_table(results, seeds))
    print(f"wall {time.time() - t0:.0f} s, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
