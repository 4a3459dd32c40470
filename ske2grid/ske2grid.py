"""Ske2Grid (Cai et al., ICML 2023): a skeleton sequence as a sequence of square grid patches.

The learned front end of the paper (spec §b.1-b.4), torch-only and copyable alone:

* data BN over the `V·C` joint-coordinate channels (§b.1);
* UPT, an up-sampling transform per stage, `U_s ∈ R^{n_{s+1}×n_s}`; stage 0 is `U_0·B` with the layout's
  directed-edge adjacency `B` (§b.2);
* GIT, a graph-node index transform per stage: a greedy row-by-row assignment from the score matrix `Θ_s`,
  used as a hard permutation with a straight-through, dense gradient to `Θ_s` (§b.3);
* the PLS cascade `Z_{s+1} = G_s·Ũ_s·Z_s` for any `progressive_joint_seq`, then the raster reshape of the
  last stage's `H·W` nodes into an `H×W` patch (§b.4). Earlier UPT/GIT pairs are frozen (§b.4 step 2).

All node-mixing maps are linear and data independent, so the cascade is composed into one `(H·W)×V` matrix
and applied to the data with a single matmul; value and gradients equal the stage-by-stage product of the
release (associativity), up to float rounding. The assignment depends only on `Θ_s`: it is recomputed on
every training forward for the trainable `Θ`, and cached (with the composed matrix) otherwise, until a
weight changes. The released Gumbel branch and temperature are dead code there and are not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "GraphNodeIndexTransform",
    "Ske2Grid",
    "Ske2GridStage",
    "UpSamplingTransform",
    "greedy_assignment",
    "layout_adjacency",
    "straight_through",
]

# Directed edges (row, col) of the layouts' `edge` lists, self-loops excluded, 0-based (spec §b.2; the
# official utils/graph.py `Graph.get_edge`). Not the `inward` list of the ST-GCN partitions.
_COCO_EDGES_1BASED = [(16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (8, 6), (9, 7),
                      (10, 8), (11, 9), (2, 3), (2, 1), (3, 1), (4, 2), (5, 3), (4, 6), (5, 7)]
_NTU_EDGES_1BASED = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
                     (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19),
                     (22, 23), (23, 8), (24, 25), (25, 12)]
LAYOUTS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "coco": (17, [(i - 1, j - 1) for i, j in _COCO_EDGES_1BASED]),
    "nturgb+d": (25, [(i - 1, j - 1) for i, j in _NTU_EDGES_1BASED]),
}


def layout_adjacency(layout: str) -> Tensor:
    """The binary stage-0 adjacency `B` (§b.2): `B[i, j] = 1` iff `i == j` or `(i, j)` is a directed edge."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown skeleton layout {layout!r}; valid layouts: {', '.join(LAYOUTS)} (spec §b.2)")
    num_joints, edges = LAYOUTS[layout]
    adj = torch.eye(num_joints)
    rows, cols = zip(*edges)
    adj[list(rows), list(cols)] = 1.0
    return adj


@torch.no_grad()
def greedy_assignment(scores: Tensor) -> Tensor:
    """GIT assignment `π` (§b.3): visit rows in order, give row r its highest-scoring column not yet taken.

    Each row depends on the rows before it, so the rows are visited in turn; each visit is one vectorised
    argmax over the row, after which the chosen column is masked for every later row. The square matrix
    (at most 64×64 in the released grids) is processed on the CPU; the result is moved to `scores.device`.
    Returns an int64 permutation of `range(n)`.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"GIT scores must be a square matrix, got shape {tuple(scores.shape)}")
    work = scores.detach().to("cpu", torch.float32, copy=True)
    if not torch.isfinite(work).all():
        raise FloatingPointError("GIT scores hold NaN/inf (training diverged); lower the learning rate or "
                                 "restart from an earlier checkpoint")
    n = work.shape[0]
    perm = torch.empty(n, dtype=torch.long)
    for r in range(n):
        j = torch.argmax(work[r])
        perm[r] = j
        work[:, j] = -math.inf
    return perm.to(scores.device)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """`hard − stopgrad(soft) + soft` (§b.3): the value of `hard` exactly, the gradient of `soft` (identity)."""
    if not (soft.requires_grad and torch.is_grad_enabled()):
        return hard
    return hard + (soft - soft.detach())


def _weight_key(*tensors: Tensor) -> tuple:
    """Identifies the current values of `tensors`: in-place updates bump `_version`, re-allocation the pointer."""
    return tuple((id(t), t.data_ptr(), t._version, t.device) for t in tensors)


class UpSamplingTransform(nn.Module):
    """UPT of one stage (§b.2): a free dense `n_out×n_in` map; init `[I; softmax(U[0,1))]` row-wise."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        if num_out < num_in:
            raise ValueError(f"UPT must not reduce the node count ({num_in} -> {num_out}); spec §b.2")
        self.num_in, self.num_out = num_in, num_out
        self.weight = nn.Parameter(torch.empty(num_out, num_in))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity rows for the kept nodes, softmax of U[0,1) draws for the new ones (official init)."""
        with torch.no_grad():
            new = torch.softmax(torch.rand(self.num_out - self.num_in, self.num_in), dim=-1)
            self.weight.copy_(torch.cat([torch.eye(self.num_in), new], 0))

    def extra_repr(self) -> str:
        return f"{self.num_in} -> {self.num_out}"


class GraphNodeIndexTransform(nn.Module):
    """GIT of one stage (§b.3): scores `Θ` (rows = output cells, columns = input nodes) -> hard permutation.

    `index_sel` (a float buffer, as in the release's state_dict) holds the last assignment; it is derived
    state, rewritten whenever the assignment is recomputed, never a source of truth.
    """

    def __init__(self, num_nodes: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.theta = nn.Parameter(torch.rand(num_nodes, num_nodes))
        self.register_buffer("index_sel", torch.zeros(num_nodes))
        self._cache_key: tuple | None = None
        self._cache_perm: Tensor | None = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.theta.uniform_(0.0, 1.0)

    def assignment(self) -> Tensor:
        """`π` (int64, `π[r]` = the node placed in cell r): recomputed on every training forward of a trainable
        `Θ`; otherwise cached until `Θ` changes (an optimiser step, a state_dict load, a device move)."""
        key = _weight_key(self.theta)
        trainable = self.training and self.theta.requires_grad and torch.is_grad_enabled()
        if trainable or self._cache_perm is None or key != self._cache_key:
            with torch.inference_mode(False), torch.no_grad():
                perm = greedy_assignment(self.theta)
                self.index_sel.copy_(perm.to(self.index_sel.dtype))
            self._cache_key, self._cache_perm = _weight_key(self.theta), perm
        return self._cache_perm

    def forward(self) -> Tensor:
        """The matrix applied to the nodes: `G = onehot(π) − stopgrad(Θ) + Θ` (value one-hot, gradient dense)."""
        perm = self.assignment()
        hard = torch.zeros_like(self.theta, requires_grad=False).scatter_(1, perm[:, None], 1.0)
        return straight_through(hard, self.theta)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module signature
        self._cache_key = self._cache_perm = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}"


class Ske2GridStage(nn.Module):
    """One UPT+GIT pair of the cascade: `n_in` nodes -> `n_out` nodes placed on a `√n_out × √n_out` grid."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        side = math.isqrt(num_out)
        if side * side != num_out:
            raise ValueError(f"every stage's node count must be a perfect square, got {num_out} (spec §b)")
        self.upt = UpSamplingTransform(num_in, num_out)
        self.git = GraphNodeIndexTransform(num_out)

    def matrix(self, adjacency: Tensor | None = None) -> Tensor:
        """`G_s · Ũ_s` with `Ũ_0 = U_0 · B` (stage 0 only) — the stage's linear node map."""
        upt = self.upt.weight if adjacency is None else self.upt.weight @ adjacency
        return self.git() @ upt


class Ske2Grid(nn.Module):
    """Data BN -> PLS cascade of UPT+GIT pairs -> grid patch (§b.1-b.4).

    Input `(N, M, T, V, C)` (pyskl layout); output `(N·M, C, T, H, W)` laid out in memory as
    `(N·M, T, H, W, C)` (channels-last), so the grid network's per-frame 3×3 and temporal 9×1 convolutions
    read it without copies.
    """

    def __init__(
        self,
        layout: str = "coco",
        in_channels: int = 3,
        grid_shape: Sequence[int] = (5, 5),
        progressive_joint_seq: Sequence[int] = (17,),
    ) -> None:
        super().__init__()
        adjacency = layout_adjacency(layout)
        num_joints = adjacency.shape[0]
        grid_shape = tuple(int(g) for g in grid_shape)
        seq = [int(n) for n in progressive_joint_seq]
        if len(grid_shape) != 2 or min(grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {grid_shape} (spec §b.4)")
        if not seq or seq[0] != num_joints:
            raise ValueError(f"progressive_joint_seq must start with the layout's {num_joints} joints "
                             f"({layout}), got {seq} (spec §b)")
        nodes = seq + [grid_shape[0] * grid_shape[1]]
        if any(b < a for a, b in zip(nodes, nodes[1:])):
            raise ValueError(f"node cascade {nodes} must not decrease (spec §b.2)")
        self.layout, self.in_channels = layout, in_channels
        self.grid_shape: tuple[int, int] = grid_shape  # type: ignore[assignment]
        self.progressive_joint_seq = seq
        self.data_bn = nn.BatchNorm1d(num_joints * in_channels)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.stages = nn.ModuleList(Ske2GridStage(a, b) for a, b in zip(nodes, nodes[1:]))
        for stage in self.stages[:-1]:  # PLS: only the newest UPT/GIT pair learns (§b.4, official init_weights)
            stage.requires_grad_(False)
        self._cache_key: tuple | None = None
        self._cache_matrix: Tensor | None = None

    @property
    def num_joints(self) -> int:
        return self.adjacency.shape[0]

    @property
    def node_counts(self) -> list[int]:
        """`[n_0, ..., n_S]`: the node count before and after every stage."""
        return self.progressive_joint_seq + [self.grid_shape[0] * self.grid_shape[1]]

    def assignments(self) -> list[Tensor]:
        """Every stage's GIT permutation `π_s`."""
        return [stage.git.assignment() for stage in self.stages]

    def effective_upt(self, stage: int) -> Tensor:
        """`Ũ_s`: `U_0·B` for stage 0, `U_s` otherwise."""
        weight = self.stages[stage].upt.weight
        return weight @ self.adjacency if stage == 0 else weight

    def _compose(self) -> Tensor:
        matrix = self.stages[0].matrix(self.adjacency)
        for stage in self.stages[1:]:
            matrix = stage.matrix() @ matrix
        return matrix

    def transform_matrix(self) -> Tensor:
        """The whole cascade `∏_s G_s Ũ_s` as one `(H·W)×V` matrix; cached while no gradient is needed."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.stages.parameters())
        if needs_grad:
            return self._compose()
        key = _weight_key(self.adjacency, *self.stages.parameters())
        if self._cache_matrix is None or key != self._cache_key:
            with torch.inference_mode(False), torch.no_grad():
                self._cache_matrix = self._compose()
            self._cache_key = key
        return self._cache_matrix

    def forward(self, x: Tensor) -> Tensor:
        """`(N, M, T, V, C)` skeletons -> `(N·M, C, T, H, W)` grid patches (§b.1 data BN, §b.4 raster order)."""
        if x.dim() != 5 or x.shape[3] != self.num_joints or x.shape[4] != self.in_channels:
            raise ValueError(f"expected (N, M, T, {self.num_joints}, {self.in_channels}) skeletons for layout "
                             f"{self.layout!r}, got {tuple(x.shape)}")
        n, m, t, v, c = x.shape
        # BatchNorm1d over the V·C channels (index v·C + c) with statistics over N·M·T: the same as the
        # release's (N·M, V·C, T) view, without the copy.
        z = self.data_bn(x.float().reshape(n * m * t, v * c)).view(n * m * t, v, c)
        z = torch.matmul(self.transform_matrix().to(z.dtype), z)  # (N·M·T, H·W, C)
        h, w = self.grid_shape
        return z.view(n * m, t, h, w, c).permute(0, 4, 1, 2, 3)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module signature
        self._cache_key = self._cache_matrix = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, grid_shape={self.grid_shape}, nodes={self.node_counts}"
