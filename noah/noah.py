"""NOAH, the Non-glObal Attentive Head (Li, Zhou & Yao, arXiv 2402.02377): torch only, copyable alone.

The last feature map ``X`` (C channels, L positions) is split into key channels ``[0, k)`` and value channels
``[k, C)`` with ``k = int(C * key_ratio)``; each part is then cut into N contiguous groups (the official code's
order, spec b.2). Group n gives, for every class c, a spatial attention ``P^n[c] = softmax_l(W_q^n X_key^n +
b_q^n)`` (a pairwise object category attention, POCA) and per-position class scores ``V^n[c] = W_v^n X_val^n +
b_v^n``; the logits are ``z_c = sum_n sum_l P^n[c, l] * V^n[c, l]``.

The two grouped 1x1 convolutions of the official module are kept as ``nn.Conv2d`` parameters (so state_dicts,
parameter counts and host init loops are the official ones) but run as one batched matrix product per
branch, with the batch and the positions as one GEMM dimension (the (N, K, B, L) layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NOAH", "ValueDropout", "noah_channels"]


def noah_channels(in_channels: int, head_num: int, key_ratio: float, kv_split: bool = True) -> tuple[int, int]:
    """(key channels k, value channels v) of spec b.1; a one-line ValueError when N does not divide both."""
    if head_num < 1:
        raise ValueError(f"NOAH head_num must be >= 1, got {head_num}")
    if kv_split:
        if not 0.0 < key_ratio < 1.0:
            raise ValueError(f"NOAH key_ratio must lie in (0, 1) with kv_split=True, got {key_ratio}")
        k = int(in_channels * key_ratio)
        v = in_channels - k
    else:
        k = v = in_channels
    if k == 0 or k % head_num or v % head_num:
        raise ValueError(
            f"NOAH(in_channels={in_channels}, head_num={head_num}, key_ratio={key_ratio}, kv_split={kv_split}): "
            f"key channels int(C*r)={k} and value channels {v} must both be positive multiples of head_num "
            "(spec b.1); pick another head_num or key_ratio"
        )
    return k, v


class ValueDropout(nn.Dropout):
    """``nn.Dropout`` on NOAH's values (spec b.2): each value kept with probability 1 - p and scaled by 1 / (1 - p).

    On CPU the keep mask is one uniform draw and a compare (``rand >= p``), which costs about a third of
    ``F.dropout``'s Bernoulli draw on the ``(N, K, B, L)`` values (31 ms -> 10 ms for ResNet50's head at B=16) and
    does not page-fault a scratch buffer every step; the distribution is the same. Elsewhere it is ``F.dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).div_(1.0 - self.p)


class NOAH(nn.Module):
    """NOAH head (spec b.2): ``(B, C, H, W)``, ``(B, C, L, 1)`` or ``(B, C, L)`` features -> ``(B, K)`` logits.

    Args:
        in_channels: C, channels of the backbone's last feature map.
        num_classes: K.
        head_num: N, the number of POCA blocks (official ``head_num``).
        key_ratio: r; ``k = int(C * r)`` channels drive the attention (official ``key_ratio``).
        dropout: dropout on the values only (official ``dropout``).
        head_split: group the two 1x1 convs by N (True) or let every block see all key/value channels.
        kv_split: split channels into key and value parts (True) or feed all C channels to both branches.
    """

    def __init__(self, in_channels: int, num_classes: int, head_num: int = 4, key_ratio: float = 0.5,
                 dropout: float = 0.0, head_split: bool = True, kv_split: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"NOAH num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"NOAH dropout must lie in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.head_num = head_num
        self.key_ratio = key_ratio
        self.head_split = head_split
        self.kv_split = kv_split
        self.k_channels, self.v_channels = noah_channels(in_channels, head_num, key_ratio, kv_split)
        self.groups = head_num if head_split else 1
        out = head_num * num_classes
        self.query = nn.Conv2d(self.k_channels, out, kernel_size=1, groups=self.groups)
        self.value = nn.Conv2d(self.v_channels, out, kernel_size=1, groups=self.groups)
        self.dropout = ValueDropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``_init_weight`` (spec b.4): Kaiming-normal fan_out (std sqrt(2 / (N*K))), zero biases."""
        for conv in (self.query, self.value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")
            nn.init.zeros_(conv.bias)

    def head_config(self) -> dict[str, float | int | bool]:
        """The constructor arguments other than C and K (what ``reset_classifier`` keeps)."""
        return {"head_num": self.head_num, "key_ratio": self.key_ratio, "dropout": self.dropout.p,
                "head_split": self.head_split, "kv_split": self.kv_split}

    def _branch(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """A grouped 1x1 conv over positions as one batched GEMM per group: (B, c, L) -> (N, K, B, L).

        The batch and positions form one GEMM dimension (``baddbmm`` of G = N or 1 products of
        ``(N*K/G, c/G) @ (c/G, B*L)``, bias fused), which is far faster than B*G products of width L; only the
        small input is rearranged, never the (N, K, B, L) output.
        """
        b, c, length = x.shape
        g = self.groups
        xg = x.reshape(b, g, c // g, length).permute(1, 2, 0, 3).reshape(g, c // g, b * length)
        y = torch.baddbmm(conv.bias.view(g, -1, 1), conv.weight.view(g, -1, c // g), xg)  # (G, N*K/G, B*L)
        return y.view(self.head_num, self.num_classes, b, length)

    def flatten_positions(self, x: Tensor) -> Tensor:
        """The three accepted layouts (spec b.2 step 1) -> ``(B, C, L)``."""
        if x.dim() not in (3, 4) or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NOAH expects (B, {self.in_channels}, H, W), (B, {self.in_channels}, L, 1) or "
                f"(B, {self.in_channels}, L), got {tuple(x.shape)}"
            )
        return x.flatten(2)

    def _logits_and_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attention logits ``A`` and values ``V`` (before dropout), each ``(N, K, B, L)``."""
        x = self.flatten_positions(x)
        if self.kv_split:
            keys, values = x[:, : self.k_channels], x[:, self.k_channels:]
        else:
            keys = values = x
        return self._branch(self.query, keys), self._branch(self.value, values)

    def attention_and_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attention logits ``A`` and values ``V`` (before dropout), each ``(B, N, K, L)`` (spec b.2 steps 2-5)."""
        attn_logits, values = self._logits_and_values(x)
        return attn_logits.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        attn_logits, values = self._logits_and_values(x)  # (N, K, B, L)
        attn = F.softmax(attn_logits, dim=-1)  # over positions, per batch item, group and class
        if self.training or torch.is_grad_enabled():
            product = attn * self.dropout(values)  # dropout on the values only, never on the attention
        else:
            product = attn.mul_(values)  # inference: the product overwrites the attention, no third tensor
        logits = product.sum(dim=(0, 3))  # sum over groups and positions -> (K, B)
        if logits.requires_grad:  # the (B, K) gradient arrives with K fastest: made (K, B)-contiguous here, the
            logits.register_hook(torch.Tensor.contiguous)  # backward through (N, K, B, L) keeps that layout
        return logits.t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, head_num={self.head_num}, "
                f"key_ratio={self.key_ratio}, dropout={self.dropout.p}, head_split={self.head_split}, "
                f"kv_split={self.kv_split}")
