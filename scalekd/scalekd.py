"""ScaleKD's core, torch-only and copyable alone (Fan et al., NeurIPS 2024; spec b.2-b.4).

* `CrossAttentionProjector` (CAP, b.2): student map -> teacher-like tokens by global cross attention
  from (learnable or supplied) queries to the student's positions. One class covers the three released
  variants: `fmdv2.py` (positional grid = query grid, BatchNorm), `fmd.py` (own `pos_hw`: any key grid
  -> any query grid) and `fmd_convnext.py` (`norm="layernorm"`: channels-first LayerNorm).
* `DualViewFeatureMimicking` (DFM, b.3): two CAPs (spatial and frequency view) and their losses; the
  frequency view removes the DC coefficient of a 2-D DCT-II (the reference) or, equivalently, the
  per-channel spatial mean (`frequency_view="mean"`).
* `ScaleKDLoss` (b.4): teacher parameter perception - CAP3 tokens go through the frozen teacher's last
  stage (with autograd), are compared with the teacher's last features, and serve (undetached) as the
  queries of CAP4 - plus logit KD (soft cross-entropy x T^2, class loss x (1 - alpha_kd)).

Defaults are those of the official code (`mmcls/models/dis_losses/{fmd,fmdv2,fmd_convnext,attention,kd}.py`).
Token tensors are B x L x C with row-major grids (token index = h * W + w); maps are B x C x H x W.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerNorm2d", "CrossAttentionProjector", "DualViewFeatureMimicking", "ScaleKDLoss",
    "dct_matrix", "idct_matrix", "dct_2d", "idct_2d", "remove_dc", "spatial_view_loss",
    "frequency_view_loss", "kd_loss", "tokens_to_map",
]

Grid = tuple[int, int]


def _pair(v: int | Sequence[int]) -> Grid:
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a B x C x H x W map (mmcls `LayerNorm2d`, eps 1e-5; `fmd_convnext.py`)."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CrossAttentionProjector(nn.Module):
    """CAP (b.2): conv3x3-norm-ReLU + pos_embed keys/values, ReLU(1x1) queries, global attention, LN + FFN.

    `pos_hw` is the student grid (the `fmd.py` variant); omitted, it equals `query_hw` (`fmdv2.py`).
    `norm="layernorm"` is the `fmd_convnext.py` variant. Output: B x (Hq*Wq) x teacher_dims tokens.
    """

    def __init__(self, student_dims: int, teacher_dims: int, query_hw: int | Sequence[int],
                 pos_hw: int | Sequence[int] | None = None, pos_dims: int | None = None,
                 self_query: bool = True, softmax_scale: float = 1.0, num_heads: int = 8,
                 norm: str = "batchnorm") -> None:
        super().__init__()
        if teacher_dims % num_heads:
            raise ValueError(f"teacher_dims {teacher_dims} is not divisible by num_heads {num_heads}")
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"norm must be 'batchnorm' or 'layernorm', got {norm!r}")
        self.student_dims, self.teacher_dims = student_dims, teacher_dims
        self.query_hw = _pair(query_hw)
        self.pos_hw = _pair(pos_hw) if pos_hw is not None else self.query_hw
        self.pos_dims = teacher_dims if pos_dims is None else pos_dims
        self.num_heads = num_heads
        self.softmax_scale = float(softmax_scale)
        norm_layer = nn.BatchNorm2d(student_dims) if norm == "batchnorm" else LayerNorm2d(student_dims)
        self.proj_student = nn.Sequential(nn.Conv2d(student_dims, student_dims, 3, padding=1), norm_layer,
                                          nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, student_dims, *self.pos_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # bounds +-2 absolute, as mmengine's trunc_normal_
        # queries: learnable (nn.Embedding, N(0, 1)) unless supplied; 1x1 conv + ReLU on the query map
        self.query = nn.Embedding(self.query_hw[0] * self.query_hw[1], self.pos_dims) if self_query else None
        self.proj_pos = nn.Sequential(nn.Conv2d(self.pos_dims, self.pos_dims, 1), nn.ReLU())
        self.attn = nn.ModuleDict({
            "q": nn.Linear(self.pos_dims, teacher_dims), "k": nn.Linear(student_dims, teacher_dims),
            "v": nn.Linear(student_dims, teacher_dims), "proj": nn.Linear(teacher_dims, teacher_dims)})
        self.norm = nn.LayerNorm(teacher_dims)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(teacher_dims, 4 * teacher_dims),
                                  "fc2": nn.Linear(4 * teacher_dims, teacher_dims)})

    @property
    def num_queries(self) -> int:
        return self.query_hw[0] * self.query_hw[1]

    def _queries(self, batch: int, query: Tensor | None) -> Tensor:
        """Q0 -> ReLU(conv1x1(Q0)) as tokens; a supplied query overrides the learnable one (b.2 step 3)."""
        conv = self.proj_pos[0]
        weight = conv.weight.flatten(1)  # a 1x1 conv on the query map is a linear map on its tokens
        if query is not None:
            if query.dim() != 3 or query.shape[1] != self.num_queries or query.shape[2] != self.pos_dims:
                raise ValueError(f"CAP queries must be B x {self.num_queries} x {self.pos_dims} "
                                 f"(query grid {self.query_hw}), got {tuple(query.shape)}")
            return F.relu(F.linear(query, weight, conv.bias))
        if self.query is None:
            raise ValueError("this CAP has no learnable queries (self_query=False): pass `query`")
        return F.relu(F.linear(self.query.weight, weight, conv.bias)).unsqueeze(0).expand(batch, -1, -1)

    def forward(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        """B x Cs x Hs x Ws student map (+ B x Hq*Wq x pos_dims queries) -> B x Hq*Wq x Ct tokens."""
        if tuple(x.shape[-2:]) != self.pos_hw or x.shape[1] != self.student_dims:
            raise ValueError(f"CAP expects a student map B x {self.student_dims} x {self.pos_hw[0]} x "
                             f"{self.pos_hw[1]}, got {tuple(x.shape)}")
        b = x.shape[0]
        keys = (self.proj_student(x) + self.pos_embed).flatten(2).transpose(1, 2)  # B x Hs*Ws x Cs
        q_tokens = self._queries(b, query)
        heads, d = self.num_heads, self.teacher_dims // self.num_heads
        q = self.attn["q"](q_tokens).view(b, -1, heads, d).transpose(1, 2)
        k = self.attn["k"](keys).view(b, -1, heads, d).transpose(1, 2)
        v = self.attn["v"](keys).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5 * self.softmax_scale)
        out = self.attn["proj"](out.transpose(1, 2).reshape(b, -1, self.teacher_dims))
        out = self.norm(out)
        return out + self.mlp["fc2"](F.relu(self.mlp["fc1"](out)))  # mmcv FFN: identity from the normed input


# --------------------------------------------------------------------------------------------------
# Dual-view feature mimicking (b.3)
# --------------------------------------------------------------------------------------------------


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """M with M[i, k] = 2 cos(pi k (2i + 1) / 2n): the unnormalised DCT-II along an axis is y = x @ M."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    return (2 * torch.cos(math.pi * i[None, :] * (2 * i[:, None] + 1) / (2 * n))).to(dtype)


def idct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """M^-1 in closed form: M^-1[k, i] = c_k cos(pi k (2i + 1) / 2n) / n, c_0 = 1/2, c_k = 1."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    inv = torch.cos(math.pi * k[:, None] * (2 * k[None, :] + 1) / (2 * n)) / n
    inv[0] /= 2
    return inv.to(dtype)


@functools.lru_cache(maxsize=32)
def _dct_basis(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(M^T, M^-1) for one axis length, built once per (n, dtype, device); the official code rebuilds them
    every call. Plain (non-inference) constants, so a first call under inference mode cannot poison autograd."""
    with torch.inference_mode(False), torch.no_grad():
        return dct_matrix(n, dtype, device).t().contiguous(), idct_matrix(n, dtype, device)


def dct_2d(x: Tensor) -> Tensor:
    """2-D DCT-II over the last two axes: Y = M_H^T X M_W (official `DCT.forward`)."""
    mh_t = _dct_basis(x.shape[-2], x.dtype, x.device)[0]
    mw = _dct_basis(x.shape[-1], x.dtype, x.device)[0].t()
    return mh_t @ x @ mw


def idct_2d(y: Tensor) -> Tensor:
    """Inverse of `dct_2d` (official `DCT.inverse`)."""
    ih = _dct_basis(y.shape[-2], y.dtype, y.device)[1]
    iw = _dct_basis(y.shape[-1], y.dtype, y.device)[1]
    return ih.t() @ y @ iw


def remove_dc(x: Tensor, method: str = "dct") -> Tensor:
    """Frequency view of a map: zero the (0, 0) DCT coefficient per channel ("dct", the reference) or,
    identically, subtract the per-channel spatial mean ("mean")."""
    if method == "mean":
        return x - x.mean(dim=(-2, -1), keepdim=True)
    if method != "dct":
        raise ValueError(f"frequency_view must be 'dct' or 'mean', got {method!r}")
    y = dct_2d(x)
    mask = torch.ones(y.shape[-2:], dtype=y.dtype, device=y.device)
    mask[0, 0] = 0
    return idct_2d(y * mask)


def tokens_to_map(tokens: Tensor, hw: Sequence[int]) -> Tensor:
    """B x (H*W) x C row-major tokens -> B x C x H x W (official `permute(0,2,1).view`)."""
    h, w = hw
    if tokens.shape[1] != h * w:
        raise ValueError(f"{tokens.shape[1]} projected tokens do not fill the teacher grid {h}x{w}; "
                         f"the CAP's query grid must equal the teacher's")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def spatial_view_loss(pred: Tensor, target: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha * sum_{b,c,h,w} (P^ - F^)^2 / B with P^, F^ L2-normalised over channels per position (b.3)."""
    p = F.normalize(tokens_to_map(pred, target.shape[-2:]) if pred.dim() == 3 else pred, dim=1)
    t = F.normalize(target, dim=1)
    return alpha * (p - t).pow(2).sum() / target.shape[0]


def frequency_view_loss(pred: Tensor, target: Tensor, alpha: float = 1.0, method: str = "dct") -> Tensor:
    """The spatial loss on maps whose DC component was removed ("alternative" view, b.3)."""
    p = tokens_to_map(pred, target.shape[-2:]) if pred.dim() == 3 else pred
    return spatial_view_loss(remove_dc(p, method), remove_dc(target, method), alpha)


class DualViewFeatureMimicking(nn.Module):
    """DFM (b.3): `cap_spatial` (official `projector_0`) and `cap_frequency` (`projector_1`) with
    their two losses, weighted by `alpha = (alpha_spatial, alpha_frequency)`.

    `softmax_scale` may be one number for both CAPs (the released Swin-B config passes a scalar,
    which crashes the official code; the intended value is used here). Defaults follow
    `FreqMaskingDistillLoss{,v2}`: softmax_scale 1, 8 heads, learnable queries.
    """

    def __init__(self, student_dims: int, teacher_dims: int, query_hw: int | Sequence[int],
                 alpha: Sequence[float], pos_hw: int | Sequence[int] | None = None,
                 pos_dims: int | None = None, self_query: bool = True,
                 softmax_scale: float | Sequence[float] = 1.0, num_heads: int = 8, norm: str = "batchnorm",
                 frequency_view: str = "dct") -> None:
        super().__init__()
        if len(alpha) != 2:
            raise ValueError(f"alpha must be (alpha_spatial, alpha_frequency), got {alpha!r}")
        scales = [float(softmax_scale)] * 2 if isinstance(softmax_scale, (int, float)) else list(softmax_scale)
        if len(scales) != 2:
            raise ValueError(f"softmax_scale must be a number or two numbers, got {softmax_scale!r}")
        if frequency_view not in ("dct", "mean"):
            raise ValueError(f"frequency_view must be 'dct' or 'mean', got {frequency_view!r}")
        self.alpha = (float(alpha[0]), float(alpha[1]))
        self.self_query = self_query
        self.frequency_view = frequency_view
        kw = dict(student_dims=student_dims, teacher_dims=teacher_dims, query_hw=query_hw, pos_hw=pos_hw,
                  pos_dims=pos_dims, self_query=self_query, num_heads=num_heads, norm=norm)
        self.cap_spatial = CrossAttentionProjector(softmax_scale=scales[0], **kw)
        self.cap_frequency = CrossAttentionProjector(softmax_scale=scales[1], **kw)

    def spatial_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return spatial_view_loss(pred, target, self.alpha[0])

    def frequency_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return frequency_view_loss(pred, target, self.alpha[1], self.frequency_view)

    def forward(self, feat_s: Tensor, feat_t: Tensor, query_spatial: Tensor | None = None,
                query_frequency: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(spatial loss, frequency loss) of the two projections of `feat_s` against `feat_t`."""
        return (self.spatial_loss(self.cap_spatial(feat_s, query_spatial), feat_t),
                self.frequency_loss(self.cap_frequency(feat_s, query_frequency), feat_t))


# --------------------------------------------------------------------------------------------------
# Logit KD and teacher parameter perception (b.4)
# --------------------------------------------------------------------------------------------------


def kd_loss(logit_s: Tensor, logit_t: Tensor, temperature: float = 4.0,
            alpha: float = 0.5) -> tuple[float, Tensor]:
    """Official `KDLoss`: (1 - alpha, -alpha T^2 mean_b sum_c softmax(z_t/T) log softmax(z_s/T)).

    A soft-target cross-entropy (= KL + teacher entropy); `log_softmax` replaces `log(softmax)`.
    """
    p_t = F.softmax(logit_t / temperature, dim=1)
    loss = -(p_t * F.log_softmax(logit_s / temperature, dim=1)).sum(dim=1).mean()
    return 1.0 - alpha, alpha * temperature ** 2 * loss


TokenFn = Callable[[Tensor], Tensor]


class ScaleKDLoss(nn.Module):
    """The ScaleKD objective over student maps S3, S4 and teacher outputs (b.4).

    `last_stage` is the frozen teacher's last stage Phi (tokens on the teacher's stage-(n-1) grid ->
    tokens on its last grid, final norm included); `tail` the extra teacher blocks a plain-ViT teacher
    applies to the CAP4 output (`is_vit`, b.4), None otherwise. Returns the weighted losses
    `loss_s3, loss_s3_alt, loss_s4, loss_s4_alt, loss_kd` present for the configured parts, and the
    factor (1 - alpha_kd) by which the caller scales its class loss.
    """

    def __init__(self, mimic_s3: DualViewFeatureMimicking | None, mimic_s4: DualViewFeatureMimicking | None,
                 kd_temperature: float = 4.0, kd_alpha: float | None = 0.5) -> None:
        super().__init__()
        if mimic_s3 is not None and not mimic_s3.self_query:
            raise ValueError("the stage-3 CAPs need learnable queries (self_query=True): TPP feeds them none")
        self.mimic_s3 = mimic_s3
        self.mimic_s4 = mimic_s4
        self.kd_temperature = kd_temperature
        self.kd_alpha = kd_alpha

    def forward(self, s3: Tensor, s4: Tensor, t4: Tensor, last_stage: TokenFn,
                logit_s: Tensor | None = None, logit_t: Tensor | None = None,
                tail: TokenFn | None = None) -> tuple[dict[str, Tensor], float, dict[str, Tensor]]:
        """-> (weighted losses, class-loss factor, intermediates: CAP/proxy tokens by name)."""
        losses: dict[str, Tensor] = {}
        inter: dict[str, Tensor] = {}
        q_sp = q_fr = None
        if self.mimic_s3 is not None:
            m = self.mimic_s3
            inter["s3_proj_spat"] = m.cap_spatial(s3)
            inter["s3_proj_freq"] = m.cap_frequency(s3)
            # Phi runs with autograd: teacher weights are frozen, activations carry gradients back
            q_sp = inter["s3_spat_proxy"] = last_stage(inter["s3_proj_spat"])
            q_fr = inter["s3_freq_proxy"] = last_stage(inter["s3_proj_freq"])
            losses["loss_s3"] = m.spatial_loss(q_sp, t4)
            losses["loss_s3_alt"] = m.frequency_loss(q_fr, t4)
        if self.mimic_s4 is not None:
            m = self.mimic_s4
            p_sp = inter["s4_proj_spat"] = m.cap_spatial(s4, q_sp)  # proxy outputs as queries, not detached
            p_fr = inter["s4_proj_freq"] = m.cap_frequency(s4, q_fr)
            if tail is not None:
                p_sp, p_fr = tail(p_sp), tail(p_fr)
            losses["loss_s4"] = m.spatial_loss(p_sp, t4)
            losses["loss_s4_alt"] = m.frequency_loss(p_fr, t4)
        cls_factor = 1.0
        if self.kd_alpha is not None and logit_s is not None and logit_t is not None:
            cls_factor, losses["loss_kd"] = kd_loss(logit_s, logit_t, self.kd_temperature, self.kd_alpha)
        return losses, cls_factor, inter
