"""NORM: Knowledge Distillation via N-to-One Representation Matching (Liu, Li, Li, Yao; ICLR 2023).

The method core, torch-only and copyable alone:

- `FeatureTransform`   the linear Feature Transform (FT) after the student's last convolutional stage:
                       expand C_s -> N*C_t (1x1 conv + BN), contract back to C_s (1x1 conv + BN), linear
                       shortcut (paper Sec. 3, "default FT"; spec b.2).
- `n_to_one_loss`      the N-to-one matching loss: the N consecutive C_t-wide segments of the expanded feature
                       are each regressed onto the same teacher feature, losses summed (spec b.3).
- `align_spatial`      integer max-pooling of the larger map onto the smaller one (spec b.3).
- `fold_into_linear`   the exact merge of an eval-mode FT into the classifier that follows global average
                       pooling, so the deployed student has the plain architecture (spec b.5).
- `standardize_logits`, `kd_loss`, `NormMultiplier`: the rest of the official objective
                       `gamma*CE + a*KD + w(epoch)*b*L_NORM` on 2.5*LayerNorm-standardized logits (spec b.4).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureTransform",
    "NormMultiplier",
    "align_spatial",
    "fold_into_linear",
    "kd_loss",
    "n_to_one_loss",
    "standardize_logits",
]


def _conv1x1_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))


class FeatureTransform(nn.Module):
    """FT of NORM (Sec. 3): e = BN(W1 x) with N*C_t channels; y = BN(W2 e) + x.

    `forward` returns `(e, y)`: `e` is the expanded feature matched to the teacher (no activation), `y`
    replaces `x` in the rest of the student. `residual=False` gives the paper's "plain FT" ablation.
    """

    def __init__(self, student_channels: int, teacher_channels: int, n: int = 8, residual: bool = True):
        super().__init__()
        if n < 1:
            raise ValueError(f"N must be >= 1, got {n}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.n = n
        self.residual = residual
        self.expand = _conv1x1_bn(student_channels, n * teacher_channels)
        self.contract = _conv1x1_bn(n * teacher_channels, student_channels)
        for seq in (self.expand, self.contract):  # official init: kaiming fan-out conv, BN 1/0
            nn.init.kaiming_normal_(seq[0].weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(seq[1].weight)
            nn.init.zeros_(seq[1].bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = self.expand(x)
        y = self.contract(e)
        return e, (y + x if self.residual else y)

    @torch.no_grad()
    def affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode FT as a per-pixel affine map y = A x + c, in float64 (spec b.5)."""

        def conv_bn(seq: nn.Sequential) -> tuple[Tensor, Tensor]:
            conv, bn = seq[0], seq[1]
            w = conv.weight.detach().double().flatten(1)  # [out, in]
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() - scale * bn.running_mean.double()
            return scale[:, None] * w, shift

        m1, t1 = conv_bn(self.expand)
        m2, t2 = conv_bn(self.contract)
        a = m2 @ m1
        if self.residual:
            a = a + torch.eye(self.student_channels, dtype=a.dtype, device=a.device)
        return a, m2 @ t1 + t2


@torch.no_grad()
def fold_into_linear(ft: FeatureTransform, fc: nn.Linear) -> nn.Linear:
    """Merge an eval-mode FT into the linear classifier after global average pooling (spec b.5).

    pool(A x + c) = A pool(x) + c, so W_fc (A p + c) + b_fc = (W_fc A) p + (W_fc c + b_fc).
    Computed in float64 and cast back; returns a new `nn.Linear` of the original shape.
    """
    a, c = ft.affine()
    w = fc.weight.double()
    b = fc.bias.double() if fc.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    merged = nn.Linear(fc.in_features, fc.out_features, bias=True, device=fc.weight.device)
    merged.weight.copy_((w @ a).to(fc.weight.dtype))
    merged.bias.copy_((w @ c + b).to(fc.weight.dtype))
    return merged


def align_spatial(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Max-pool the larger map by the integer factor H_large // H_small (spec b.3; never interpolation).

    The official CIFAR branch pools the teacher, the ImageNet branch the student; on every reported pair
    this is the same as pooling whichever map is larger.
    """
    hs, ht = student_feat.shape[-1], teacher_feat.shape[-1]
    if ht > hs and ht // hs > 1:
        teacher_feat = F.max_pool2d(teacher_feat, ht // hs, ht // hs)
    elif hs > ht and hs // ht > 1:
        student_feat = F.max_pool2d(student_feat, hs // ht, hs // ht)
    return student_feat, teacher_feat


def n_to_one_loss(expanded: Tensor, teacher_feat: Tensor) -> Tensor:
    """N-to-one representation matching (Sec. 3): sum_k MSE(e_k, t) over the N channel segments.

    `expanded` is [B, N*C_t, H, W]; segment k holds channels k*C_t ... (k+1)*C_t - 1 (block-wise, the
    official `repeat` of the teacher along channels, not interleaved). Equal to N * MSE(e, tile(t, N)).
    """
    expanded, teacher_feat = align_spatial(expanded, teacher_feat)
    b, c_t = teacher_feat.shape[:2]
    if expanded.shape[1] % c_t:
        raise ValueError(f"expanded channels {expanded.shape[1]} are not a multiple of C_t={c_t}")
    n = expanded.shape[1] // c_t
    segments = expanded.float().unflatten(1, (n, c_t))  # [B, N, C_t, H, W]; float32 under autocast
    diff = segments - teacher_feat.detach().float().unsqueeze(1)
    return diff.pow(2).mean() * n


def standardize_logits(logits: Tensor, scale: float = 2.5, eps: float = 1e-7) -> Tensor:
    """Official logit standardization: scale * LayerNorm(z) over classes, no affine (spec b.4 item 2)."""
    return F.layer_norm(logits, logits.shape[-1:], None, None, eps) * scale


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


class NormMultiplier:
    """Epoch-wise multiplier w(epoch) of the NORM loss (hard-coded in the official loop, spec b.4 item 6).

    `values[i]` holds while `epoch < milestones[i]`, `values[-1]` afterwards. Milestones are in epochs of a
    run of `reference_epochs` epochs (CIFAR 241, ImageNet 101); a run of another length scales them.
    """

    def __init__(self, milestones: Sequence[int], values: Sequence[float], reference_epochs: int):
        if len(values) != len(milestones) + 1:
            raise ValueError("NormMultiplier needs len(values) == len(milestones) + 1")
        if list(milestones) != sorted(milestones):
            raise ValueError("NormMultiplier milestones must be increasing")
        self.milestones = list(milestones)
        self.values = [float(v) for v in values]
        self.reference_epochs = int(reference_epochs)

    def __call__(self, epoch: int, num_epochs: int) -> float:
        # epoch < milestone * num_epochs / ref  <=>  epoch < ceil(...), in integers (exact at full length)
        scaled = [-(-m * num_epochs // self.reference_epochs) for m in self.milestones]
        return self.values[bisect.bisect_right(scaled, epoch)]
