"""Viewed training samples (paper Table 4, spec d.5): sum over training stages of dataset size x epochs.

The teacher's own pre-training is not counted. Sizes are in millions as the paper rounds them. Every
training run also records its own count: optimizer steps x global batch (student data only).
"""

from __future__ import annotations

from collections.abc import Sequence

# dataset sizes (millions of images) as the paper rounds them
DATASET_SIZES_M = {"IN-1K": 1.28, "IN-12K": 12.1, "IN-22K": 13.7, "JFT-300M": 300.0, "LAION-2B": 2320.0}

Stages = Sequence[tuple[float, float]]  # (dataset size in M, epochs)


def viewed_samples(sizes: Sequence[float], epochs: Sequence[float]) -> float:
    """Sum_i sizes[i] * epochs[i] (same unit as `sizes`), one entry per training stage."""
    if len(sizes) != len(epochs):
        raise ValueError(f"{len(sizes)} dataset sizes but {len(epochs)} epoch counts")
    return float(sum(s * e for s, e in zip(sizes, epochs, strict=True)))


def run_viewed_samples(optimizer_steps: int, global_batch: int) -> int:
    """What one of our runs viewed: optimizer steps x global batch (student images only)."""
    return int(optimizer_steps) * int(global_batch)


# Table 4 rows: (group, student, method, [(dataset, epochs), ...], top-1). ScaleKD rows are IN-1K x 300.
_S = DATASET_SIZES_M
SCALEKD = ((_S["IN-1K"], 300),)
TABLE4: tuple[tuple[str, str, str, tuple[tuple[float, float], ...], float], ...] = (
    ("supervised", "ViT-B/16", "IN-22K => IN-1K", ((_S["IN-22K"], 90), (_S["IN-1K"], 32)), 83.97),
    ("supervised", "ViT-B/16", "JFT-300M => IN-1K", ((_S["JFT-300M"], 7), (_S["IN-1K"], 32)), 84.15),
    ("supervised", "ViT-B/16", "ScaleKD (Swin-L teacher)", SCALEKD, 85.53),
    ("self-supervised", "ViT-B/16", "BEiT IN-22K => IN-1K", ((_S["IN-22K"], 150), (_S["IN-1K"], 100)), 83.70),
    ("self-supervised", "ViT-B/16", "iBOT IN-22K => IN-1K", ((_S["IN-22K"], 320), (_S["IN-1K"], 100)), 84.40),
    ("self-supervised", "ViT-B/16", "ScaleKD (Swin-L teacher)", SCALEKD, 85.64),
    ("cross-modal", "ViT-B/16", "CLIP LAION-2B => IN-1K", ((_S["LAION-2B"], 32), (_S["IN-1K"], 50)), 85.47),
    ("cross-modal", "ViT-B/16", "CLIP LAION-2B => IN-12K => IN-1K",
     ((_S["LAION-2B"], 32), (_S["IN-12K"], 60), (_S["IN-1K"], 50)), 86.17),
    # NB: the 195x pair is a CLIP ViT-B/16 against a ScaleKD ViT-B/14 student
    ("cross-modal", "ViT-B/14", "ScaleKD (BEiT-L/14 EVA teacher)", SCALEKD, 86.43),
    ("EVA hybrid", "EVA02-S/14 (384 px)", "EVA-02 IN-22K => IN-1K", ((_S["IN-22K"], 240), (_S["IN-1K"], 50)), 85.80),
    ("EVA hybrid", "EVA02-S/14 (384 px)", "ScaleKD (BEiT-L/14 EVA teacher)", SCALEKD, 86.22),
)


def table4_ratios(rows: Sequence[tuple] = TABLE4) -> dict[str, float]:
    """Per group: the largest counterpart's viewed samples over ScaleKD's (the paper's headline ratios)."""
    out: dict[str, float] = {}
    for group in dict.fromkeys(r[0] for r in rows):
        members = [r for r in rows if r[0] == group]
        ours = [viewed_samples(*zip(*r[3], strict=True)) for r in members if r[2].startswith("ScaleKD")]
        others = [viewed_samples(*zip(*r[3], strict=True)) for r in members if not r[2].startswith("ScaleKD")]
        out[group] = max(others) / ours[0]
    return out


def table4_lines(ours_samples: float | None = None) -> list[str]:
    """Table 4 as text lines (viewed samples in M), with this run's count when given."""
    lines = [f"{'group':16} {'student':20} {'method':36} {'viewed (M)':>10} {'top-1':>6}"]
    for group, student, method, stages, top1 in TABLE4:
        viewed = viewed_samples(*zip(*stages, strict=True))
        lines.append(f"{group:16} {student:20} {method:36} {viewed:10.0f} {top1:6.2f}")
    lines += [f"ratio ({g}): {r:.2f}x" for g, r in table4_ratios().items()]
    if ours_samples is not None:
        lines.append(f"this run: {ours_samples / 1e6:.1f} M viewed samples")
    return lines
