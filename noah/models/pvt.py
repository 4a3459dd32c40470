"""PVT v1 (Wang et al., ICCV 2021) as used by NOAH (``vit/pvt/classification/{pvt,noah_pvt}.py``, spec c.2),
written with timm layers (timm ships PVT v2 only).

Four stages of conv patch embedding (+ LayerNorm), a learned per-stage ``pos_embed`` and transformer blocks
whose attention reads keys/values from a spatially reduced map (conv with kernel = stride = ``sr_ratio``, then
LayerNorm). The baseline prepends a class token in stage 4 (``pos_embed4`` 50 rows at 224 px); the NOAH model
has none (49 rows) and hands all stage-4 tokens to the head. Key names follow the official files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from torch import Tensor, nn


class SRAttention(nn.Module):
    """Multi-head attention with spatial-reduction of keys/values (PVT v1)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sr_ratio: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PVT dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # official: default eps

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with SR attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SRAttention(dim, num_heads, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm (official: default eps)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        img, patch = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PyramidVisionTransformer(nn.Module):
    """PVT v1 backbone without classifier; ``class_token`` = the baseline's stage-4 class token."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 depths: tuple[int, ...] = (2, 2, 2, 2), sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
                 drop_path_rate: float = 0.0, class_token: bool = False) -> None:
        super().__init__()
        self.num_stages = len(embed_dims)
        self.num_features = embed_dims[-1]
        self.num_prefix_tokens = int(class_token)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear over depth
        cur = 0
        for i in range(self.num_stages):
            embed = PatchEmbed(img_size if i == 0 else img_size // (2 ** (i + 1)), patch_size if i == 0 else 2,
                               3 if i == 0 else embed_dims[i - 1], embed_dims[i])
            extra = self.num_prefix_tokens if i == self.num_stages - 1 else 0
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, embed.num_patches + extra, embed_dims[i])))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], dpr[cur + j])
                for j in range(depths[i])))
            cur += depths[i]
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
            trunc_normal_(self.cls_token, std=0.02)
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def _resize_pos_embed(pos: Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> Tensor:
        """Bilinear resize of a stage's position table to another input size (official ``_get_pos_embed``)."""
        if grid == hw:
            return pos
        pos = pos.reshape(1, *grid, -1).permute(0, 3, 1, 2)
        return F.interpolate(pos, size=hw, mode="bilinear").flatten(2).transpose(1, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        for i in range(1, self.num_stages + 1):
            embed: PatchEmbed = getattr(self, f"patch_embed{i}")
            pos: Tensor = getattr(self, f"pos_embed{i}")
            x, hw = embed(x)
            if i == self.num_stages and self.num_prefix_tokens:
                x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
                pos = torch.cat([pos[:, :1], self._resize_pos_embed(pos[:, 1:], embed.grid, hw)], dim=1)
            else:
                pos = self._resize_pos_embed(pos, embed.grid, hw)
            x = x + pos
            for blk in getattr(self, f"block{i}"):
                x = blk(x, hw)
            if i != self.num_stages:
                x = x.transpose(1, 2).reshape(b, -1, *hw)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = True) -> Tensor:
        """The baseline's class token."""
        return x[:, 0]
