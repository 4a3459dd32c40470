"""ST-GCN baseline (spec §c, §e): pyskl's graph network `STGCN` with the Ske2Grid channel plan.

pyskl defaults (`pyskl/models/gcns/stgcn.py`): `stgcn_spatial` partitions (hop 0, hop 1 closer/further from
the centre, column-normalised), `unit_gcn` with learnable importance `PA` (init 1) multiplying `A`, a 1×1
conv to `K·C_out` channels before the graph product, BN and ReLU inside the graph unit; `unit_tcn` (9×1 conv
+ BN); residual zero / identity / 1×1-conv+BN; data BN over V·C; the head pools (T, V), averages persons and
applies a linear layer. pyskl leaves convolutions at PyTorch's default init and the head at N(0, 0.01).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ske2grid.models.grid_net import BlockSpec, PersonAveragingHead, stgcn_block_plan

__all__ = ["STGCN", "stgcn_spatial_partitions"]

# (child, parent) "inward" lists and centre joints of pyskl's Graph (not the Ske2Grid stage-0 edge list).
_INWARD = {
    "coco": ([(15, 13), (13, 11), (16, 14), (14, 12), (11, 5), (12, 6), (9, 7), (7, 5), (10, 8), (8, 6), (5, 0),
              (6, 0), (1, 0), (3, 1), (2, 0), (4, 2)], 17, 0),
    "nturgb+d": ([(i - 1, j - 1) for i, j in [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7),
                                               (9, 21), (10, 9), (11, 10), (12, 11), (13, 1), (14, 13), (15, 14),
                                               (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 8), (23, 8),
                                               (24, 12), (25, 12)]], 25, 20),
}


def stgcn_spatial_partitions(layout: str) -> Tensor:
    """pyskl `Graph(layout, mode='stgcn_spatial', max_hop=1).A`: (3, V, V) = [self, closer, further]."""
    if layout not in _INWARD:
        raise ValueError(f"unknown skeleton layout {layout!r}; valid layouts: {', '.join(_INWARD)}")
    inward, v, center = _INWARD[layout]
    link = torch.eye(v, dtype=torch.float64)
    for i, j in inward:
        link[i, j] = link[j, i] = 1.0
    # pyskl's hop distances with max_hop = 1: 0 on the diagonal, 1 for neighbours, inf beyond
    hop = torch.full((v, v), float("inf"), dtype=torch.float64)
    hop[link > 0] = 1.0
    hop.fill_diagonal_(0.0)
    cdist = hop[:, center]
    norm = link / link.sum(0, keepdim=True)  # normalize_digraph: divide column i by its in-degree
    a_self = torch.where(hop == 0, norm, torch.zeros_like(norm))
    # a[j, i] for hop_dis[j, i] == 1: closer if hop_dis[j, center] >= hop_dis[i, center]
    closer_mask = (hop == 1) & (cdist[:, None] >= cdist[None, :])
    further_mask = (hop == 1) & ~(cdist[:, None] >= cdist[None, :])
    a_close = torch.where(closer_mask, norm, torch.zeros_like(norm))
    a_further = torch.where(further_mask, norm, torch.zeros_like(norm))
    return torch.stack([a_self, a_close, a_further]).float()


class GraphConvUnit(nn.Module):
    """pyskl `unit_gcn` (adaptive='importance', conv_pos='pre'): ReLU(BN(Σ_k W_k x (A_k ⊙ PA_k)))."""

    def __init__(self, in_channels: int, out_channels: int, A: Tensor) -> None:
        super().__init__()
        self.num_subsets = A.shape[0]
        self.register_buffer("A", A.clone())
        self.PA = nn.Parameter(torch.ones_like(A))
        self.conv = nn.Conv2d(in_channels, out_channels * self.num_subsets, 1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        n, _, t, v = x.shape
        y = self.conv(x).view(n, self.num_subsets, -1, t, v)
        y = torch.einsum("nkctv,kvw->nctw", y, self.A * self.PA)
        return self.act(self.bn(y))


class TemporalConvUnit(nn.Sequential):
    """pyskl `unit_tcn`: Conv(k×1, stride s) + BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 9, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), (stride, 1), ((kernel_size - 1) // 2, 0))
        self.bn = nn.BatchNorm2d(out_channels)


class STGCNBlock(nn.Module):
    """pyskl `STGCNBlock`: ReLU(tcn(gcn(x)) + residual(x))."""

    def __init__(self, spec: BlockSpec, A: Tensor) -> None:
        super().__init__()
        cin, cout, s = spec.in_channels, spec.out_channels, spec.stride
        self.gcn = GraphConvUnit(cin, cout, A)
        self.tcn = TemporalConvUnit(cout, cout, spec.kernel_size[0], s)
        self.residual: nn.Module | None
        if not spec.residual:
            self.residual = None
        elif cin == cout and s == 1:
            self.residual = nn.Identity()
        else:
            self.residual = TemporalConvUnit(cin, cout, 1, s)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.tcn(self.gcn(x))
        if self.residual is not None:
            y = y + self.residual(x)
        return self.relu(y)


class STGCN(nn.Module):
    """pyskl ST-GCN (graph baseline): data BN -> graph blocks -> person-averaging head; `(N, M, T, V, C)` -> logits."""

    def __init__(self, num_classes: int, layout: str = "coco", in_channels: int = 3,
                 blocks: Sequence[BlockSpec | Mapping] | None = None, num_person: int = 2) -> None:
        super().__init__()
        specs = [BlockSpec.parse(b) for b in (blocks if blocks is not None else stgcn_block_plan(in_channels))]
        A = stgcn_spatial_partitions(layout)
        self.layout, self.in_channels, self.num_person, self.num_classes = layout, in_channels, num_person, num_classes
        self.data_bn = nn.BatchNorm1d(A.shape[1] * in_channels)
        self.blocks = nn.Sequential(*(STGCNBlock(s, A) for s in specs))
        self.num_features = specs[-1].out_channels
        self.head = PersonAveragingHead(self.num_features, num_classes, num_person)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        n, m, t, v, c = x.shape
        if m != self.num_person or v * c != self.data_bn.num_features:
            raise ValueError(f"expected (N, {self.num_person}, T, V, C) with V·C = {self.data_bn.num_features} "
                             f"for layout {self.layout!r}, got {tuple(x.shape)}")
        z = self.data_bn(x.float().reshape(n * m * t, v * c))
        z = z.view(n * m, t, v, c).permute(0, 3, 1, 2)  # (N·M, C, T, V)
        return self.blocks(z)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
