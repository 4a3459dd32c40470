"""Af-DCD: augmentation-free dense contrastive distillation (Fan et al., NeurIPS 2023), the loss module.

Torch-only and copyable alone. `AfDCDLoss(feat_s, feat_t)` returns the two unweighted terms of spec b.2-b.3
on the backbone's last feature maps (`c4`, stride 8) of student and frozen teacher:

* masked feature mimicking (b.2): A = align(F_s); G = generator(A * keep); L_fm = sum (G - F_t)^2 / B;
* Omni-Contrasting (b.3) on (G, F_t): spatially reduced (max-pool, or the CamVid top-left crop), cut into
  N_h x N_w patches and M contiguous channel groups; every student sample (position, group) is pulled to the
  teacher sample at the same place and pushed from the teacher samples of the *other* groups of its patch,
  with similarity -||.||_1 / tau. L_ctr = sum over anchors of the CE / (H'W') / B (= M x the mean CE).

The similarity is one batched `torch.cdist(p=1)` per patch, (patches, K, K) with K = N^2 M: the
anchor x candidate x d difference tensor is never materialised. Official names: `projetor` -> `generator`
and `adpator` -> `adaptor` here (afdcd/convert.py maps both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AfDCDLoss",
    "CONTRAST_MODES",
    "EnhancedGenerator",
    "centre_keep_mask",
    "contrastive_samples",
    "dense_contrastive_loss",
    "feature_mimicking_loss",
    "plain_generator",
    "random_keep_mask",
]

CONTRAST_MODES = ("omni", "omni_all", "spatial", "channel")
MASK_MODES = ("random", "centre")
GENERATORS = ("plain", "enhanced")


# ----------------------------------------------------------------------------------------------- masks
def random_keep_mask(shape: tuple[int, int, int, int], mask_ratio: float, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> Tensor:
    """Random spatial keep-mask (b.2.2): u ~ U[0,1) per (b,1,h,w); keep (1) where u <= 1 - mask_ratio.

    `mask_ratio` is the fraction *removed*. Drawn on `device` from `generator` (default: that device's global
    generator, so `torch.manual_seed` reproduces the official CPU draw).
    """
    u = torch.rand(shape, generator=generator, device=device)
    return (u <= 1.0 - mask_ratio).to(dtype)


def centre_keep_mask(shape: tuple[int, int, int, int], *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Deterministic keep-mask (b.2.2, `rand_mask=False`): ones, zero on rows [H//3, 2H//3) x cols [W//3, 2W//3)."""
    keep = torch.ones(shape, device=device, dtype=dtype)
    h, w = shape[-2:]
    keep[..., h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 0
    return keep


# ----------------------------------------------------------------------------------------------- generators
def plain_generator(channels: int) -> nn.Sequential:
    """The default generator (b.2.3): conv3x3 -> ReLU -> conv3x3, C_t -> C_t, with bias."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class EnhancedGenerator(nn.Module):
    """The enhanced generator (b.2.3): x1 = ReLU(conv(x)), x2 = ReLU(conv(x1)), out = (conv_a(x1) + conv_b(x2)) / 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adaptor_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adaptor_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.block_1(x)
        x2 = self.block_2(x1)
        return (self.adaptor_1(x1) + self.adaptor_2(x2)) / 2.0


# ----------------------------------------------------------------------------------------------- loss terms
def feature_mimicking_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """L_fm (b.2.4): sum of squared errors over (B, C, H, W), divided by the batch size only."""
    return F.mse_loss(reconstruction.float(), target.float(), reduction="sum") / target.shape[0]


def contrastive_samples(x: Tensor, groups: int, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B * patches, N_h N_w M, C/M): patches row-major, sample index = position * M + group
    (the official `_to_ctr_format` layout, b.3.2)."""
    b, c, h, w = x.shape
    ph, pw = patch_size
    d = c // groups
    x = x.reshape(b, groups, d, h // ph, ph, w // pw, pw)
    return x.permute(0, 3, 5, 4, 6, 1, 2).reshape(b * (h // ph) * (w // pw), ph * pw * groups, d)


def _excluded_pairs(mode: str, positions: int, groups: int, device: torch.device) -> Tensor | None:
    """(K, K) bool: candidate pairs that are neither positive nor negative; None when every other sample is a
    negative. For "omni" these are same-group samples at other positions (b.3.4)."""
    if mode != "omni":
        return None
    k = torch.arange(positions * groups, device=device)
    same_group = (k % groups)[:, None] == (k % groups)[None, :]
    return same_group & ~torch.eye(positions * groups, dtype=torch.bool, device=device)


def dense_contrastive_loss(pred: Tensor, target: Tensor, groups: int = 16, patch_size: tuple[int, int] = (4, 4),
                           tau: float = 0.07, mode: str = "omni") -> Tensor:
    """Sum over anchors of -s(a,a)/tau + logsumexp over {a} U negatives, divided by H'W' (not by B; b.3.5-6).

    `pred`/`target` are the already reduced (B, C, H', W') maps, s = -L1 distance. Modes:
    * "omni" (official, b.3.4): negatives = other channel groups of the same patch, N^2 (M-1) per anchor;
    * "omni_all" (k.3 reading): every other sample of the patch, N^2 M - 1 per anchor;
    * "spatial" (README figure, [unverified]): whole C-dim pixel vectors, negatives = other pixels of the patch;
    * "channel" (README figure, [unverified]): the M groups of one pixel, negatives = its other groups.
    """
    if mode not in CONTRAST_MODES:
        raise ValueError(f"contrast mode must be one of {CONTRAST_MODES}, not '{mode}'")
    b, c, h, w = pred.shape
    if mode == "spatial":
        groups = 1
    elif mode == "channel":
        patch_size = (1, 1)
    ph, pw = patch_size
    if c % groups or h % ph or w % pw:
        raise ValueError(f"contrastive map (C={c}, H'={h}, W'={w}) must divide into {groups} channel groups "
                         f"and {ph}x{pw} patches (spec b.3.2)")
    p = contrastive_samples(pred.float(), groups, patch_size)
    t = contrastive_samples(target.float(), groups, patch_size)
    logits = torch.cdist(p, t, p=1) * (-1.0 / tau)  # (patches, K, K); the positive of row a is column a
    positive = logits.diagonal(dim1=1, dim2=2)
    excluded = _excluded_pairs(mode, ph * pw, groups, logits.device)
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    return (torch.logsumexp(logits, dim=-1) - positive).sum() / (h * w)


# ----------------------------------------------------------------------------------------------- module
class AfDCDLoss(nn.Module):
    """Af-DCD's trainable loss module (b.2-b.3): align conv + generator; `forward` -> (L_fm, L_ctr), unweighted.

    Args:
        student_channels, teacher_channels: C_s and C_t of the distilled `c4` maps.
        tau: contrastive temperature (0.07). groups: M, channel groups (16). patch_size: (N_h, N_w) (4, 4).
        pool_size: max-pool kernel = stride before the contrastive partition (4; 0 = none).
        crop: crop both maps to their top-left crop x crop first (CamVid: 44 with pool_size 0; None = no crop).
        mask: "random" (mask_ratio of positions removed) or "centre" (the deterministic centre mask).
        mask_ratio: fraction of positions removed by the random mask (0.75).
        generator: "plain" (two convs, 75.5M params at C_t = 2048) or "enhanced" (four convs).
        contrast: "omni" (official), "omni_all" (k.3), "spatial" or "channel" (ablations, [unverified]).
        align_conv: when C_s == C_t, use a 1x1 conv anyway (the official code crashes there); else identity.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, tau: float = 0.07, groups: int = 16,
                 patch_size: tuple[int, int] = (4, 4), pool_size: int = 4, crop: int | None = None,
                 mask: str = "random", mask_ratio: float = 0.75, generator: str = "plain",
                 contrast: str = "omni", align_conv: bool = False) -> None:
        super().__init__()
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, not '{mask}'")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, not '{generator}'")
        if contrast not in CONTRAST_MODES:
            raise ValueError(f"contrast must be one of {CONTRAST_MODES}, not '{contrast}'")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio is the removed fraction, in [0, 1); got {mask_ratio}")
        if tau <= 0 or groups < 1 or pool_size < 0 or min(patch_size) < 1 or (crop is not None and crop < 1):
            raise ValueError(f"invalid Af-DCD settings: tau={tau}, groups={groups}, patch_size={patch_size}, "
                             f"pool_size={pool_size}, crop={crop}")
        if contrast != "spatial" and teacher_channels % groups:
            raise ValueError(f"teacher_channels {teacher_channels} is not divisible by groups {groups}")
        self.tau, self.groups, self.patch_size = tau, groups, tuple(patch_size)
        self.pool_size, self.crop = pool_size, crop
        self.mask, self.mask_ratio, self.contrast = mask, mask_ratio, contrast
        self.align = (nn.Conv2d(student_channels, teacher_channels, 1)
                      if student_channels != teacher_channels or align_conv else nn.Identity())
        self.generator = plain_generator(teacher_channels) if generator == "plain" else EnhancedGenerator(
            teacher_channels)

    def keep_mask(self, feat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The (B, 1, H, W) keep-mask of this step (b.2.2), on `feat`'s device."""
        shape = (feat.shape[0], 1, feat.shape[2], feat.shape[3])
        if self.mask == "random":
            return random_keep_mask(shape, self.mask_ratio, device=feat.device, dtype=feat.dtype,
                                    generator=generator)
        return centre_keep_mask(shape, device=feat.device, dtype=feat.dtype)

    def reconstruct(self, feat_s: Tensor, keep: Tensor | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """G = generator(align(F_s) * keep) (b.2.1-3)."""
        aligned = self.align(feat_s)
        if keep is None:
            keep = self.keep_mask(aligned, generator)
        return self.generator(aligned * keep.to(aligned.dtype))

    def reduce(self, x: Tensor) -> Tensor:
        """Spatial reduction before the partition (b.3.1): optional top-left crop, then optional max-pool."""
        if self.crop is not None:
            x = x[:, :, : self.crop, : self.crop]
        return F.max_pool2d(x, self.pool_size) if self.pool_size > 0 else x

    def forward(self, feat_s: Tensor, feat_t: Tensor, keep: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(L_fm, L_ctr), both divided by the batch size; `keep` (B,1,H,W) overrides the drawn mask."""
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(f"student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} maps must share "
                             "batch and spatial size (both stride 8)")
        recon = self.reconstruct(feat_s, keep, generator)
        loss_fm = feature_mimicking_loss(recon, feat_t)
        loss_ctr = dense_contrastive_loss(self.reduce(recon), self.reduce(feat_t), self.groups, self.patch_size,
                                          self.tau, self.contrast) / feat_t.shape[0]
        return loss_fm, loss_ctr
