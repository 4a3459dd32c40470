"""KernelWarehouse: the method core, torch-only and copyable alone.

Chao Li, Anbang Yao. "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024.

Three ideas (paper §3; spec §b):
  1. kernel partition: every kernel is cut into ``m`` disjoint cells of shape ``[c_o, c_i, 1, .., 1]``;
  2. warehouse sharing: same-stage layers share one warehouse ``E`` of ``n`` cells, and each of a layer's
     ``m`` cells is a linear mixture of all ``n`` warehouse cells;
  3. the contrasting-driven attention function (CAF): signed, L1-normalised mixture weights (with an extra
     "zero cell"), blended with a fixed one-hot attention initialisation ``beta`` by a temperature ``tau``.

Usage (the same protocol as the official code)::

    manager = WarehouseManager(cell_num_ratio=1, sharing_range="layer_conv")
    conv = manager.reserve(64, 64, 3, padding=1, warehouse_name="stage0_layer0_conv0")  # no weight yet
    ...                                                   # build the whole network through the manager
    net.warehouse_manager = manager
    manager.finalize(net)                                 # store() warehouses, allocate() cells + attention

Everything is vectorised over the batch: per-sample kernels are assembled by one matmul per layer and
applied by one grouped convolution (or one batched matmul for 1x1 / linear layers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ContrastingAttention",
    "KWConv1d",
    "KWConv2d",
    "KWConv3d",
    "KWConvNd",
    "KWLinear",
    "KWLayer",
    "WarehouseManager",
    "fuse_warehouse_name",
    "parse_sharing_range",
    "temperature_at",
]

_EPS_L1 = 1e-3  # the CAF normaliser's epsilon (spec §b.4 step 4), not 1e-5


# ---------------------------------------------------------------------------------------------------------
# naming and schedules
# ---------------------------------------------------------------------------------------------------------
def parse_sharing_range(sharing_range: str | Iterable[str] | None) -> tuple[str, ...]:
    """Sharing prefixes as a token tuple; a string such as ``"layer_conv"`` is split on ``_`` (spec §b.1)."""
    if sharing_range is None:
        return ()
    if isinstance(sharing_range, str):
        return tuple(t for t in sharing_range.split("_") if t)
    return tuple(str(t) for t in sharing_range)


def fuse_warehouse_name(layer_name: str, sharing_range: Sequence[str]) -> str:
    """Warehouse of a layer: a token starting with a sharing prefix becomes the prefix (last match wins)."""
    tokens = []
    for token in layer_name.split("_"):
        fused = token
        for prefix in sharing_range:
            if fused.startswith(prefix):
                fused = prefix
        tokens.append(fused)
    return "_".join(tokens)


def temperature_at(epoch: int, step: int, iters_per_epoch: int, temp_epoch: float,
                   temp_init: float = 1.0) -> float:
    """Attention temperature before training iteration ``step`` of ``epoch`` (spec §b.9).

    ``tau = max(0, T0 (T - it) / T)`` with ``T = temp_epoch * iters_per_epoch`` and ``it`` counted from 1.
    """
    total = temp_epoch * iters_per_epoch
    it = epoch * iters_per_epoch + step + 1
    return max(0.0, temp_init * (total - it) / max(1.0, total))


def _tuple(x: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(x, int):
        return (x,) * n
    x = tuple(int(v) for v in x)
    if len(x) == 1:
        return x * n
    if len(x) != n:
        raise ValueError(f"expected {n} values, got {x}")
    return x


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------
class ContrastingAttention(nn.Module):
    """The contrasting-driven attention function, paper §3.3 / spec §b.4, b.5, b.7.

    Input: the pooled descriptor ``[B, I]``. Output: mixture weights ``[B, m, n]`` (zero cell dropped).
    ``fc1 -> norm -> ReLU -> fc2`` gives ``m (n+1)`` logits; each row is divided by its L1 norm (+1e-3,
    zero cell included) and blended with the one-hot initialisation ``beta``: ``(1-tau) z + tau beta``.
    With ``nonlocal_basis < 1`` the logits of the other layers' cells come from ``num_basis`` basis
    coefficients through ``fc3`` (spec §b.7).
    """

    def __init__(self, in_planes: int, num_mixtures: int, num_cells: int, reduction: float = 1 / 16,
                 norm: str = "bn", cell_num_ratio: float = 1.0, nonlocal_basis_ratio: float = 1.0,
                 start_cell: int = 0) -> None:
        super().__init__()
        if norm not in ("bn", "ln", "none"):
            raise ValueError(f"attention norm must be 'bn', 'ln' or 'none', got {norm!r}")
        hidden = max(int(in_planes * reduction), 16)
        self.num_mixtures, self.num_cells, self.start_cell = num_mixtures, num_cells, start_cell
        self.norm_kind = norm
        self.fc1 = nn.Linear(in_planes, hidden, bias=norm != "bn")
        self.norm1 = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}.get(norm, lambda h: nn.Identity())(hidden)
        self.num_local_cells = int(cell_num_ratio * num_mixtures)
        self.use_basis = nonlocal_basis_ratio < 1.0
        if self.use_basis:
            self.num_nonlocal_cells = num_cells - self.num_local_cells
            self.num_basis = max(int(self.num_nonlocal_cells * nonlocal_basis_ratio), 16)
            width = self.num_local_cells + self.num_basis + 1
            self.fc2 = nn.Linear(hidden, width * num_mixtures, bias=False)
            self.fc3 = nn.Linear(self.num_basis, self.num_nonlocal_cells, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(num_mixtures * (num_cells + 1)))
        else:
            self.fc2 = nn.Linear(hidden, num_mixtures * (num_cells + 1))
        # beta is derived from the structure (spec §b.5), so it is rebuilt, not saved
        self.register_buffer("beta", torch.zeros(num_mixtures, num_cells + 1), persistent=False)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    @torch.no_grad()
    def init_beta(self, start_cell: int, cell_num_ratio: float) -> int:
        """Fill the one-hot attention initialisation; returns the warehouse pointer after this layer."""
        self.beta.zero_()
        t = start_cell
        if cell_num_ratio >= 1.0:  # mixture j -> cell t + j b
            stride = int(cell_num_ratio)
            for j in range(self.num_mixtures):
                self.beta[j, t] = 1.0
                t += stride
        else:  # diagonal rule: mixture j owns a cell iff j mod k == (j // k) mod k, else the zero cell
            k = int(1.0 / cell_num_ratio)
            for j in range(self.num_mixtures):
                if j % k == (j // k) % k:
                    self.beta[j, t] = 1.0
                    t += 1
                else:
                    self.beta[j, self.num_cells] = 1.0
        return t

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Raw attention logits ``[B, m, n+1]`` (before the contrasting normalisation)."""
        if self.training and self.norm_kind == "bn" and pooled.shape[0] == 1:
            raise ValueError("KernelWarehouse attention uses BatchNorm1d: training needs batch size >= 2 per "
                             "process (or build the manager with norm='ln')")
        h = F.relu(self.norm1(self.fc1(pooled)))
        z = self.fc2(h)
        b, m = pooled.shape[0], self.num_mixtures
        if not self.use_basis:
            return z.view(b, m, self.num_cells + 1)
        z = z.view(b * m, -1)
        local = z[:, : self.num_local_cells]
        nonlocal_ = self.fc3(z[:, self.num_local_cells: -1])
        t0 = self.start_cell
        z = torch.cat([nonlocal_[:, :t0], local, nonlocal_[:, t0:], z[:, -1:]], dim=1)
        return z.view(b, m, self.num_cells + 1) + self.basis_bias.view(1, m, -1)

    def forward(self, pooled: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        z = self.logits(pooled)
        z = z / (z.abs().sum(dim=-1, keepdim=True) + _EPS_L1)
        z = (1.0 - tau) * z + tau * self.beta
        return z[..., :-1]


# ---------------------------------------------------------------------------------------------------------
# KW layers
# ---------------------------------------------------------------------------------------------------------
class KWLayer(nn.Module):
    """Shared bookkeeping of a KW layer: geometry, its warehouse, its cell range and attention."""

    dim: int = 2  # number of spatial dims (0 for linear)

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int | Sequence[int] = 1,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 warehouse_id: int = 0, manager: WarehouseManager | None = None) -> None:
        super().__init__()
        n = max(self.dim, 1)
        self.in_planes, self.out_planes, self.groups = in_planes, out_planes, groups
        self.kernel_size = _tuple(kernel_size, n) if self.dim else ()
        self.stride = _tuple(stride, n)
        self.padding = _tuple(padding, n)
        self.dilation = _tuple(dilation, n)
        self.bias = nn.Parameter(torch.zeros(out_planes)) if bias else None
        self.warehouse_id = warehouse_id
        self._manager = [manager]  # a list: the manager is registered once, on the network
        self.attention: ContrastingAttention | None = None

    # -- structure --------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> list[int]:
        return [self.out_planes, self.in_planes // self.groups, *self.kernel_size]

    def init_attention(self, cell_shape: Sequence[int], start_cell: int, reduction: float,
                       cell_num_ratio: float, norm: str, nonlocal_basis_ratio: float) -> int:
        """Partition this layer's kernel into cells of ``cell_shape`` and create its attention (spec §b.2)."""
        n, c_o, c_i = cell_shape[:3]
        self.num_cells, self.cell_out, self.cell_in = n, c_o, c_i
        self.groups_out = self.out_planes // c_o
        self.groups_in = self.in_planes // self.groups // c_i
        self.groups_spatial = math.prod(self.kernel_size) if self.dim else 1
        self.num_mixtures = self.groups_out * self.groups_in * self.groups_spatial
        self.start_cell = start_cell
        self.attention = ContrastingAttention(self.in_planes, self.num_mixtures, n, reduction, norm,
                                              cell_num_ratio, nonlocal_basis_ratio, start_cell)
        self.end_cell = self.attention.init_beta(start_cell, cell_num_ratio)
        return self.end_cell

    def _check_ready(self) -> WarehouseManager:
        manager = self._manager[0]
        if self.attention is None or manager is None or not manager.finalized:
            raise RuntimeError("KW layer used before its WarehouseManager was finalised: call "
                               "manager.finalize(network) after building the network")
        return manager

    # -- maths ------------------------------------------------------------------------------------------
    def mixture_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """Attention ``[B, m, n]`` for the pooled input ``[B, I]``."""
        manager = self._check_ready()
        return self.attention(pooled, manager.temperature.to(pooled.dtype))

    def assemble(self, attn: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels from the attention, one matmul over all cells (spec §b.6 steps 2-3).

        Mixture ``j = (s G_o + p) G_i + q`` -> kernel rows ``p c_o + a``, columns ``q c_i + c``, tap ``s``.
        Returns ``[B, O, I/g, *K]``, a tensor of its own (no later call overwrites it).
        """
        return self._assemble(attn, workspace=False)

    def _assemble(self, attn: torch.Tensor, workspace: bool) -> torch.Tensor:
        """``assemble``; with ``workspace`` the kernels may live in the manager's shared inference workspace,
        valid only until the next KW layer runs (the forward consumes them at once)."""
        b = attn.shape[0]
        cells = self._manager[0].assemble_cells(self.warehouse_id, attn, workspace)  # [B m, c_o c_i]
        s, go, gi, co, ci = self.groups_spatial, self.groups_out, self.groups_in, self.cell_out, self.cell_in
        if s == 1 and go == 1 and gi == 1:
            return cells.view(b, co, ci, *self.kernel_size)
        w = cells.view(b, s, go, gi, co, ci).permute(0, 2, 4, 3, 5, 1)
        return w.reshape(b, self.out_planes, self.in_planes // self.groups, *self.kernel_size)


class KWConvNd(KWLayer):
    """A KW convolution (spec §b.6): the kernel is assembled per sample from the shared warehouse.

    The per-sample kernel is ``W_b[s, p, q] = sum_k alpha[b, (s, p, q), k] E_k``. It is applied in one of five
    mathematically equal ways (``impl='auto'`` picks per layer and input size; ``impl='grouped'`` always uses
    the official one). The first three assemble the kernels by one matmul over all cells, ``C = alpha @ E``
    (``[B, m, c_o c_i]``):

    * ``grouped``: permute ``C`` into ``[B O, I/g, *K]`` kernels and run one grouped conv, ``groups = g B``;
    * ``pointwise`` (1x1, g=1): one batched matmul ``W_b @ X_b``;
    * ``tapwise`` (2-D, g=1): no kernel permute: for each tap ``s`` and block pair ``(p, q)`` the cell
      ``C[b, s, p, q]`` multiplies the unfolded input ``X[b, s, q]`` in one broadcast batched matmul, and the
      taps are summed. It wins when the output is small next to the kernel (late, low-resolution stages).
    * ``im2col`` (2-D, g=1): the taps as channels-last rows ``[B, L, S I]`` times the per-sample kernel assembled
      transposed (``[B, S I, c_o]``, from the warehouse cells seen as ``[n, c_i c_o]``): one GEMM per sample and
      output block, no tap sum. It wins without autograd wherever ``tapwise`` is eligible, and in training for
      strided layers with several output blocks (``G_o > 1``).
    * ``mixed`` (2-D, g=1): no per-sample kernel at all. By linearity ``y_b[p] = sum_k E_k (sum_{s,q}
      alpha[b, (s, p, q), k] X_b[s, q])``: the attention mixes each sample's input taps once per warehouse
      cell, then one dense GEMM applies the whole warehouse ``[c_o, n c_i]`` to the mixed inputs of every
      sample and position. It costs ``n c_o c_i L`` multiply-adds per image and output block instead of
      ``m c_o c_i (n + L)``, but as one large GEMM it runs near the CPU's peak while the assembly (``K = n``) and
      the per-sample products are memory-bound, and it saves no per-sample kernels for the backward. It wins
      where the output is small and the warehouse is not much larger than the kernel (ResNet18's last stage).
    """

    def applications(self) -> tuple[str, ...]:
        """Every kernel application this layer can run (all mathematically equal; see the class docstring)."""
        if self.groups != 1:
            return ("grouped",)
        if self.groups_spatial == 1 and self.padding == (0,) * self.dim:
            return ("grouped", "pointwise")
        if self.dim == 2 and self.dilation == (1, 1):
            return ("grouped", "tapwise", "im2col", "mixed")
        return ("grouped",)

    def kernel_application(self, x: torch.Tensor) -> str:
        """Which of :meth:`applications` to use for input ``x`` (see the class docstring)."""
        eligible = self.applications()
        if self._manager[0].impl != "auto" or len(eligible) == 1:
            return "grouped"
        if "pointwise" in eligible:
            return "pointwise"
        if "mixed" in eligible:
            length = math.prod(
                (x.shape[2 + d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel_size[d] - 1) - 1)
                // self.stride[d] + 1 for d in range(2))
            # multiply-adds per image and output block: mixed n L c_o c_i, assembled S G_i (n + L) c_o c_i
            n, taps = self.num_cells, self.groups_spatial * self.groups_in
            if n * length <= self._manager[0].mixed_ratio * taps * (n + length):
                return "mixed"
            # tap outputs [B, S, G_i, O, L] versus the permuted kernels [B, O, I, S]
            if self.groups_in * length <= self._manager[0].tapwise_ratio * self.in_planes:
                # one GEMM per sample and output block beats the broadcast tap products without autograd
                # (measured: every such layer of ResNet18 at 160 px, both memory formats, 1 and 2 threads) and in
                # training for several output blocks with enough rows (layer3.0.conv1, not layer4.0.conv1)
                if not torch.is_grad_enabled() or (self.groups_out > 1
                                                   and length >= self._manager[0].im2col_min_length):
                    return "im2col"
                return "tapwise"
        return "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        attn = self.mixture_weights(x.mean(dim=tuple(range(2, x.dim()))))  # [B, m, n]
        how = self.kernel_application(x)
        if how == "grouped":
            weight = self._assemble(attn, workspace=True)  # [B, O, I/g, *K]
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
            y = conv(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), None,
                     self.stride, self.padding, self.dilation, self.groups * b)
            y = y.view(b, self.out_planes, *y.shape[2:])
        elif how == "pointwise":
            if any(s != 1 for s in self.stride):
                x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
            weight = self._assemble(attn, workspace=True).reshape(b, self.out_planes, self.in_planes)
            y = torch.matmul(weight, x.reshape(b, self.in_planes, -1)).view(b, self.out_planes, *x.shape[2:])
        elif how == "tapwise":
            y = self._tapwise(x, attn)
        elif how == "im2col":
            y = self._im2col(x, attn)
        else:
            y = self._mixed(x, attn)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * self.dim)).to(y.dtype)
        return y

    def _tapwise(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s, go, gi, co, ci = self.groups_spatial, self.groups_out, self.groups_in, self.cell_out, self.cell_in
        out_hw = [(x.shape[2 + d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel_size[d] - 1) - 1)
                  // self.stride[d] + 1 for d in range(2)]
        cells = self._manager[0].assemble_cells(self.warehouse_id, attn, workspace=True).view(b, s, go, gi, co, ci)
        # taps as strided views of the padded input, copied once into [B, S, G_i, c_i, L] (faster than im2col)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        taps = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, I, Ho, Wo, kh, kw]
        taps = taps.permute(0, 4, 5, 1, 2, 3).reshape(b, s, 1, gi, ci, -1)
        y = torch.matmul(cells, taps).sum(dim=(1, 3))  # [B, G_o, c_o, L]
        return y.reshape(b, self.out_planes, *out_hw)

    def _im2col(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.num_cells
        s, go, gi, co, ci = self.groups_spatial, self.groups_out, self.groups_in, self.cell_out, self.cell_in
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        taps = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, I, Ho, Wo, kh, kw]
        ho, wo = taps.shape[2:4]
        taps = taps.permute(0, 2, 3, 4, 5, 1).reshape(b, ho * wo, s * gi * ci)  # rows [B, L, (s, q, c)]
        # transposed cells [n, c_i c_o]: the assembled kernel is then [B, (s, q, c), c_o], a GEMM operand as is
        cells_t = self._manager[0].warehouse_as(self.warehouse_id, "cells_transposed", x.dtype)
        mix = attn.view(b, s, go, gi, n)
        outs = [torch.bmm(taps, torch.mm(mix[:, :, p].reshape(-1, n), cells_t).view(b, s * gi * ci, co))
                for p in range(go)]  # [B, L, c_o] per output block
        y = outs[0] if go == 1 else torch.cat(outs, dim=2)
        return y.view(b, ho, wo, self.out_planes).permute(0, 3, 1, 2)  # channels-last memory

    def _mixed(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.num_cells
        s, go, gi, ci = self.groups_spatial, self.groups_out, self.groups_in, self.cell_in
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        taps = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, I, Ho, Wo, kh, kw]
        ho, wo = taps.shape[2:4]
        taps = taps.permute(0, 2, 3, 4, 5, 1).reshape(b, ho * wo, s * gi, ci)  # [B, L, S G_i, c_i]
        # mixture j = (s G_o + p) G_i + q -> [B, 1, G_o n, S G_i]: for each output block p and cell k
        mix = attn.reshape(b, s, go, gi, n).permute(0, 2, 4, 1, 3).reshape(b, 1, go * n, s * gi)
        mixed = torch.matmul(mix, taps)  # [B, L, G_o n, c_i]
        cells = self._manager[0].warehouse_as(self.warehouse_id, "out_by_cells", x.dtype)  # [c_o, n c_i]
        y = F.linear(mixed.reshape(-1, n * ci), cells)  # [B L G_o, c_o]
        return y.view(b, ho, wo, self.out_planes).permute(0, 3, 1, 2)  # channels-last memory


class KWConv1d(KWConvNd):
    dim = 1


class KWConv2d(KWConvNd):
    dim = 2


class KWConv3d(KWConvNd):
    dim = 3


class KWLinear(KWLayer):
    """A KW linear layer over tokens ``[B, ..., I]`` (spec §b.8): attention pools over the tokens."""

    dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        weight = self._assemble(self.mixture_weights(tokens.mean(dim=1)), workspace=True)  # [B, O, I]
        y = torch.matmul(tokens, weight.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_planes)


_KW_TYPES: dict[str, type[KWLayer]] = {"conv1d": KWConv1d, "conv2d": KWConv2d, "conv3d": KWConv3d,
                                       "linear": KWLinear}


# ---------------------------------------------------------------------------------------------------------
# the manager
# ---------------------------------------------------------------------------------------------------------
PerWarehouse = float | Sequence[float] | dict[str, float]


class WarehouseManager(nn.Module):
    """Creates KW layers, builds the shared warehouses and allocates their cells (spec §b.1-b.3).

    Per-warehouse hyper-parameters (``reduction``, ``cell_num_ratio`` = the budget b, ``cell_inplane_ratio``,
    ``cell_outplane_ratio``) may be a scalar, a sequence in warehouse order (order of first reservation),
    or a dict from fused warehouse name to value. The temperature ``tau`` is a buffer, so it is checkpointed.
    ``impl='grouped'`` applies every kernel with the official op order (a grouped conv over the batch).
    """

    def __init__(self, reduction: PerWarehouse = 1 / 16, cell_num_ratio: PerWarehouse = 1.0,
                 cell_inplane_ratio: PerWarehouse = 1.0, cell_outplane_ratio: PerWarehouse = 1.0,
                 sharing_range: str | Iterable[str] | None = ("layer", "conv"),
                 nonlocal_basis_ratio: float = 1.0, norm: str = "bn", impl: str = "auto") -> None:
        super().__init__()
        if impl not in ("auto", "grouped"):
            raise ValueError(f"impl must be 'auto' or 'grouped', got {impl!r}")
        # 'grouped' = the official op order everywhere (bit-exact with it); 'auto' picks the cheaper
        # mathematically equal kernel application per layer (a batched matmul for 1x1 convs)
        self.impl = impl
        self.tapwise_ratio = 1.0  # 'tapwise' when G_i L <= ratio I (measured with kernelwarehouse.bench)
        self.mixed_ratio = 1.6  # 'mixed' when n L <= ratio S G_i (n + L) (measured with kernelwarehouse.bench)
        self.im2col_min_length = 64  # in training, 'im2col' for G_o > 1 when L >= this (kernelwarehouse.bench)
        self.sharing_range = parse_sharing_range(sharing_range)
        self.reduction, self.cell_num_ratio = reduction, cell_num_ratio
        self.cell_inplane_ratio, self.cell_outplane_ratio = cell_inplane_ratio, cell_outplane_ratio
        self.nonlocal_basis_ratio, self.norm = float(nonlocal_basis_ratio), norm
        self.names: list[str] = []  # fused warehouse names, in order of first reservation
        self._scratch: dict[tuple[Any, ...], torch.Tensor] = {}  # inference-only assembly workspace
        self._layouts: dict[tuple[Any, ...], torch.Tensor] | None = None  # per network forward, see warehouse_as
        self._layers: dict[str, list[list[int]]] = {}
        self.weights = nn.ParameterList()
        self.finalized = False
        self.register_buffer("temperature", torch.zeros(()))

    # -- reservation --------------------------------------------------------------------------------------
    def reserve(self, in_planes: int, out_planes: int, kernel_size: int | Sequence[int] = 1,
                stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                warehouse_name: str = "default", enabled: bool = True,
                layer_type: str = "conv2d") -> nn.Module:
        """A KW layer without weights of its own (or, with ``enabled=False``, a plain torch layer)."""
        if layer_type not in _KW_TYPES:
            raise ValueError(f"layer_type must be one of {sorted(_KW_TYPES)}, got {layer_type!r}")
        if self.finalized:
            raise RuntimeError("reserve() after finalize(): reserve every layer before finalising")
        if not enabled:
            if layer_type == "linear":
                return nn.Linear(in_planes, out_planes, bias=bias)
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[layer_type]
            return conv(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, bias)
        name = fuse_warehouse_name(warehouse_name, self.sharing_range)
        if name not in self._layers:
            self._layers[name] = []
            self.names.append(name)
        layer = _KW_TYPES[layer_type](in_planes, out_planes, kernel_size, stride, padding, dilation, groups,
                                      bias, warehouse_id=self.names.index(name), manager=self)
        dims = {len(s) for s in self._layers[name]} | {len(layer.weight_shape)}
        if len(dims) != 1:
            raise ValueError(f"warehouse {name!r} mixes layers of different dimensionality")
        self._layers[name].append(layer.weight_shape)
        return layer

    def _per_warehouse(self, value: PerWarehouse, key: str) -> list[float]:
        k = len(self.names)
        if isinstance(value, dict):
            missing = [n for n in self.names if n not in value]
            if missing:
                raise ValueError(f"{key}: no value for warehouse(s) {missing}")
            return [float(value[n]) for n in self.names]
        if isinstance(value, (int, float)):
            return [float(value)] * k
        value = [float(v) for v in value]
        if len(value) == 1:
            return value * k
        if len(value) != k:
            raise ValueError(f"{key}: got {len(value)} values for {k} warehouses")
        return value

    # -- build -------------------------------------------------------------------------------------------
    def store(self) -> None:
        """Compute each warehouse's cell shape and size and create its parameter (spec §b.2)."""
        budgets = self._per_warehouse(self.cell_num_ratio, "cell_num_ratio")
        rho_in = self._per_warehouse(self.cell_inplane_ratio, "cell_inplane_ratio")
        rho_out = self._per_warehouse(self.cell_outplane_ratio, "cell_outplane_ratio")
        self.reductions = self._per_warehouse(self.reduction, "reduction")
        self.budgets = budgets
        for i, name in enumerate(self.names):
            shapes = self._layers[name]
            c_o = max(int(math.gcd(*[s[0] for s in shapes]) * rho_out[i]), 1)
            c_i = max(int(math.gcd(*[s[1] for s in shapes]) * rho_in[i]), 1)
            total = sum((s[0] // c_o) * (s[1] // c_i) * math.prod(s[2:]) for s in shapes)
            n = max(int(total * budgets[i]), 1)
            spatial = [1] * (len(shapes[0]) - 2)
            self.weights.append(nn.Parameter(torch.randn(n, c_o, c_i, *spatial)))

    @torch.no_grad()
    def allocate(self, network: nn.Module) -> None:
        """Create every KW layer's attention and Kaiming-initialise the cells it owns (spec §b.3, b.5).

        Layers are visited in module-registration order; each owns the next contiguous cell range.
        """
        pointer = [0] * len(self.weights)
        for layer in network.modules():
            if not isinstance(layer, KWLayer) or layer._manager[0] is not self:
                continue
            k = layer.warehouse_id
            warehouse = self.weights[k]
            start = pointer[k]
            end = layer.init_attention(warehouse.shape, start, self.reductions[k], self.budgets[k], self.norm,
                                       self.nonlocal_basis_ratio)
            if end > start:  # kaiming fan_out of the slice seen as a conv weight [(end-start) c_o, c_i, 1..]
                std = math.sqrt(2.0 / ((end - start) * warehouse.shape[1]))
                warehouse[start:end].normal_(0.0, std)
            pointer[k] = end
        for k, (p, w) in enumerate(zip(pointer, self.weights)):
            if p != w.shape[0]:
                raise ValueError(f"warehouse {self.names[k]!r}: layers own {p} of its {w.shape[0]} cells; "
                                 "with b >= 1 the budget must be an integer, with b < 1 every layer's number "
                                 "of mixtures must be a multiple of 1/b (shrink the cells with rho < 1)")
        self.finalized = True

    def finalize(self, network: nn.Module) -> None:
        """``store()`` then ``allocate(network)``; call once after the network is built.

        Also hooks the network's forward so that the warehouses' GEMM layouts (:meth:`warehouse_as`) are
        copied once per forward instead of once per layer.
        """
        self.store()
        self.allocate(network)
        network.register_forward_pre_hook(self._open_forward)
        network.register_forward_hook(self._close_forward, always_call=True)

    def _open_forward(self, network: nn.Module, args: Any) -> None:
        self._layouts = {}

    def _close_forward(self, network: nn.Module, args: Any, output: Any) -> None:
        self._layouts = None

    # -- runtime -----------------------------------------------------------------------------------------
    def assemble_cells(self, warehouse_id: int, attn: torch.Tensor, workspace: bool = False) -> torch.Tensor:
        """``alpha @ E`` for one layer: ``[B m, n] @ [n, c_o c_i]``, one matmul over all cells (spec §b.6).

        With ``workspace`` and without autograd, the product goes into one buffer shared by all layers, so
        the result is valid only until the next call (the forward consumes it at once): the per-sample
        kernels are large, and a fresh allocation of that size costs page faults comparable to the matmul.
        """
        warehouse = self.weights[warehouse_id]
        n = warehouse.shape[0]
        flat = warehouse.reshape(n, -1).to(attn.dtype)
        attn = attn.reshape(-1, n)
        if not workspace or torch.is_grad_enabled() or self.impl != "auto":
            return torch.mm(attn, flat)
        key = (attn.device, attn.dtype, torch.is_inference_mode_enabled())
        size = attn.shape[0] * flat.shape[1]
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, device=attn.device, dtype=attn.dtype)
            self._scratch[key] = buffer
        return torch.mm(attn, flat, out=buffer[:size].view(attn.shape[0], flat.shape[1]))

    def warehouse_as(self, warehouse_id: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """Warehouse ``E [n, c_o, c_i]`` copied into a GEMM operand's layout: ``"cells_transposed"``
        ``[n, c_i c_o]`` (each cell transposed: ``im2col``) or ``"out_by_cells"`` ``[c_o, n c_i]`` (``mixed``).

        During a forward of the network passed to :meth:`finalize` the copy is made once and shared by all
        layers of the warehouse (autograd sums their gradients through it); weights cannot change within one
        forward, and the copies are dropped when it ends. Outside such a forward: a fresh copy per call.
        """
        key = (warehouse_id, layout, dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if self._layouts is not None and key in self._layouts:
            return self._layouts[key]
        w = self.weights[warehouse_id].to(dtype)
        n, c_o, c_i = w.shape[:3]
        if layout == "cells_transposed":
            out = w.reshape(n, c_o, c_i).transpose(1, 2).reshape(n, c_i * c_o)
        elif layout == "out_by_cells":
            out = w.reshape(n, c_o, c_i).transpose(0, 1).reshape(c_o, n * c_i)
        else:
            raise ValueError(f"unknown warehouse layout {layout!r}")
        if self._layouts is not None:
            self._layouts[key] = out
        return out

    def set_temperature(self, tau: float) -> None:
        """Set the attention temperature of every layer of this manager (spec §b.9)."""
        self.temperature.fill_(float(tau))

    def summary(self) -> list[dict[str, Any]]:
        """The resolved warehouse table: name, shape ``[n, c_o, c_i, ..]``, number of layers, budget."""
        return [{"name": n, "shape": list(w.shape), "num_layers": len(self._layers[n]), "budget": b}
                for n, w, b in zip(self.names, self.weights, self.budgets)]
