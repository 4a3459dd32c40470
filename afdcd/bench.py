"""`make bench-afdcd`: what Af-DCD costs, side by side with CE + KD in one run (``common.bench``).

1. Training: an Af-DCD step (student forward/backward, frozen teacher forward, align + generator + L_fm + L_ctr,
   loss-module clipping, SGD step) against the CE + KD step of the same student, teacher, crop and batch, and
   the contrastive term alone (forward + backward on maps of the step's shapes).
2. Inference: the student as Af-DCD deploys it against the baseline student (the loss module never ships).

    python -m afdcd.bench                                  # CPU defaults: crop 256x512, batch 2, 3 rounds
    python -m afdcd.bench device=cuda crop=512,1024 batch=2    # the recipe's per-GPU batch at the Cityscapes crop
    python -m afdcd.bench row=cityscapes_deeplabv3_mobilenetv2_afdcd   # MobileNetV2 student (~4.2x MACs)
    python -m afdcd.bench row=cityscapes_deeplabv3_resnet18_afdcd      # the enhanced generator (~5.1x MACs)

Everything comes from the row's experiment config (random weights): models, loss weights, mask, generator,
the optimizer (``common.engine.build_optimizer``) and the loss-module clipping. The default row is the issue's
reference: DeepLabV3-R101 -> DeepLabV3-R18, random mask, plain generator (~3.1x MACs at any crop).
It prints time, peak memory and MACs, and the two ratios the issue sets: the Af-DCD / CE + KD step time against
the MAC ratio of the two steps (a training step = 3 x the forward MACs of the trained parts + the frozen
teacher's forward, each counted on what the step runs), and the contrastive term's share of the Af-DCD step.
Every ``common.bench`` key works (``device``, ``threads``, ``repeats``, ``warmup``, ``modes``, ``memory``,
``macs``). GPU: bf16 autocast, channels_last. Like every afdcd entry point it keeps large host allocations on
the heap (``afdcd/__init__.py``; ``AFDCD_HEAP=off`` keeps glibc's default, which re-faults the generator's
151 MB gradients every CPU step).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from common.allocator import heap_kept
from common.bench import BENCH_DEFAULTS, Candidate, amp_dtype, bench_config, compare, describe, print_table, ratio
from common.cli import parse_overrides, split_list
from common.config import compose
from common.engine import build_optimizer
from common.errors import UserError, cli_guard
from common.profiling import count_flops

from .afdcd import AfDCDLoss, dense_contrastive_loss
from .config import build_distiller
from .distiller import SegDistiller
from .models import create_model
from .train import CONFIG_DIR, parse

# 3 timed rounds: a CPU round of the default crop takes ~25 s (2 threads)
DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "row": "cityscapes_deeplabv3_resnet18_afdcd_randmask", "batch": 2,
                            "crop": "auto", "repeats": 3, "warmup": 1}
REFERENCE_CROP = (512, 1024)  # the recipe's Cityscapes crop; the MAC targets are per such crop
# CPU: a quarter of its area, one round ~25 s. Every crop meets the target (README: 128x256, 256x512, 512x1024);
# at 128x256 only with large allocations on the heap (the generator's weight gradients reduce over B*H*W = 1024).
CPU_CROP = (256, 512)


def train_step(method: SegDistiller, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               clip: float | None) -> Any:
    """One recipe step (b.4): summed weighted losses, backward, loss-module clipping, the recipe's SGD step."""
    dtype = amp_dtype(x.device)
    clipped = method.clip_parameters()

    def step() -> None:
        method.train()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            _, losses = method.forward_train(x, y)
        sum(losses.values()).backward()
        if clip and clipped:
            torch.nn.utils.clip_grad_norm_(clipped, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def contrastive_step(loss: AfDCDLoss, g: torch.Tensor, t: torch.Tensor) -> Any:
    """L_ctr alone on the step's reconstructed and teacher maps: reduce, partition, -L1/tau, backward."""
    dtype = amp_dtype(g.device)

    def step() -> None:
        g.grad = None
        with torch.autocast(g.device.type, dtype=dtype, enabled=dtype is not None):
            value = dense_contrastive_loss(loss.reduce(g), loss.reduce(t), loss.groups, loss.patch_size, loss.tau,
                                           loss.contrast)
        value.backward()

    return step


class _Forward(nn.Module):
    """What a training step runs forward, for the MAC count: a student's forward_all (aux head when trained),
    a frozen teacher's forward_all without its unused aux head."""

    def __init__(self, net: nn.Module, aux: bool) -> None:
        super().__init__()
        self.net, self.aux = net, aux

    def forward(self, x: torch.Tensor) -> Any:
        return self.net.forward_all(x, aux=self.aux)


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "afdcd.bench", __doc__ or "")
    rows = {r["id"]: r for r in yaml.safe_load((Path(__file__).parent / "paper.yaml").read_text())["rows"]}
    row = rows.get(opts["row"])
    if row is None or row.get("role") != "afdcd":
        raise UserError(f"afdcd.bench: row={opts['row']}: choose an afdcd row of afdcd/paper.yaml")
    cfg = bench_config(opts)
    device, batch = cfg.device, int(opts["batch"])
    crop = REFERENCE_CROP if device.type == "cuda" else CPU_CROP
    if opts["crop"] != "auto":
        crop = tuple(int(v) for v in split_list(str(opts["crop"])))  # type: ignore[assignment]
        if len(crop) != 2 or crop[0] % 128 or crop[1] % 128:
            raise UserError(f"afdcd.bench: crop={opts['crop']}: height,width, multiples of 128 (stride 8, max-pool 4, "
                            "4x4 patches)")
    if batch < 2:
        raise UserError(f"afdcd.bench: batch={batch}: a training step needs >= 2 images (the ASPP image-pooling BN "
                        "sees one value per channel per image; the recipe runs 2 per GPU)")
    run = parse(compose(CONFIG_DIR, [f"experiment={row['id']}"]))  # the row's own recipe (random weights)
    nc, method = run.data.num_classes, run.method
    mf = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *crop).to(device, memory_format=mf)
    y = torch.randint(0, nc, (batch, *crop), device=device)

    def prepare(m: nn.Module) -> nn.Module:
        return m.to(device=device, memory_format=mf)

    afdcd = prepare(build_distiller(run.model, method, nc))  # student, frozen teacher, align + generator
    teacher, loss = afdcd.teacher, afdcd.loss_module
    assert teacher is not None and loss is not None
    kd = prepare(SegDistiller(create_model(run.model.student, nc), teacher, aux_weight=method.aux_weight,
                              kd_weight=method.kd_weight, kd_temperature=method.kd_temperature))
    baseline = prepare(create_model(run.model.student, nc))

    def optimizer(m: SegDistiller) -> torch.optim.Optimizer:
        return build_optimizer([p for p in m.parameters() if p.requires_grad], run.optim, run.trainer.global_batch)

    h, w = crop[0] // 8, crop[1] // 8
    g = torch.randn(batch, teacher.c4_channels, h, w, device=device, requires_grad=True)
    t = torch.randn(batch, teacher.c4_channels, h, w, device=device)
    candidates = [
        Candidate("CE+KD step", kd.student, {"train": train_step(kd, x, y, optimizer(kd), None)}, batch),
        Candidate("Af-DCD step", afdcd.student, {"train": train_step(afdcd, x, y, optimizer(afdcd),
                                                                      run.trainer.clip_grad)}, batch),
        Candidate("contrastive term", loss, {"train": contrastive_step(loss, g, t)}, batch),
        Candidate("baseline student", baseline, {"infer": _infer(baseline, x)}, batch),
        Candidate("Af-DCD student", afdcd.student, {"infer": _infer(afdcd.eval_model(), x)}, batch),
    ]
    macs = None
    if cfg.macs:  # per image at the crop: forward MACs of what each step runs
        one = torch.zeros(1, 3, *crop, device=device)
        fs = torch.zeros(1, afdcd.student.c4_channels, h, w, device=device)
        ft = torch.zeros(1, teacher.c4_channels, h, w, device=device)
        macs = {"student": count_flops(_Forward(kd.student, bool(method.aux_weight)), one)["macs"],
                "teacher": count_flops(_Forward(teacher, False), one)["macs"],
                "loss module": count_flops(loss, (fs, ft))["macs"]}
    print(f"Af-DCD bench ({row['id']}): {run.model.teacher} -> {run.model.student}, {method.loss.mask} mask, "
          f"{method.loss.generator} generator, crop {crop[0]}x{crop[1]}, batch {batch}, {nc} classes, "
          f"{describe(cfg)}, large allocations on the heap: {'yes' if heap_kept() else 'no (AFDCD_HEAP=off)'}")
    records = compare(candidates, cfg)
    for mode, base in (("train", "CE+KD step"), ("infer", "baseline student")):
        if mode in cfg.modes:
            print_table([r for r in records if r["mode"] == mode], baseline=base)
    if macs is not None:
        kd_step = 3 * macs["student"] + macs["teacher"]
        af_step = kd_step + 3 * macs["loss module"]
        scale = REFERENCE_CROP[0] * REFERENCE_CROP[1] / (crop[0] * crop[1])
        parts = ", ".join(f"{k} {v / 1e9:.1f}" + (f" (x{scale:g} = {v * scale / 1e9:.0f} per 512x1024)"
                                                  if scale != 1 else "") for k, v in macs.items())
        print(f"forward GMACs per image ({parts}); training step = 3 x trained forward + teacher forward: "
              f"CE+KD {kd_step / 1e9:.0f}, Af-DCD {af_step / 1e9:.0f} -> MAC ratio {af_step / kd_step:.2f}x")
    if "train" in cfg.modes:
        time_ratio = ratio(records, "train", "Af-DCD step", "CE+KD step")
        share = ratio(records, "train", "contrastive term", "Af-DCD step")
        line = f"Af-DCD / CE+KD step time {time_ratio:.2f}x"
        if macs is not None:
            met = "met" if time_ratio <= af_step / kd_step else "NOT met"
            line += f" (target <= the MAC ratio {af_step / kd_step:.2f}x: {met})"
        print(line + f"; contrastive term {100 * share:.1f}% of the Af-DCD step (target <= 5%: "
              f"{'met' if share <= 0.05 else 'NOT met'})")
    if "infer" in cfg.modes:
        print(f"inference: Af-DCD student / baseline student time "
              f"{ratio(records, 'infer', 'Af-DCD student', 'baseline student'):.2f}x (same network, target 1.00x)")
    return records


def _infer(model: nn.Module, x: torch.Tensor) -> Any:
    dtype = amp_dtype(x.device)

    def step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    return step


if __name__ == "__main__":
    main()
