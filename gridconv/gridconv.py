"""GridConv: 3D human pose lifting with grid convolution (Kang et al., AAAI 2023, arXiv 2302.08760).

The method core, torch-only and copyable alone:

* Semantic Grid Transformation (SGT, Sec. 3.1): a pose of J joints becomes an H x P "grid pose" by a
  cell-to-joint assignment; the handcrafted layout (``HANDCRAFTED_LAYOUT``) and the learnable one
  ("AutoGrids", ``LearnableSGT``: frozen / straight-through / Gumbel-softmax) and their inverses.
* Grid convolution (Sec. 3.2, ``GridConv``): two 3x3 convolutions with different border paddings, summed.
* Dynamic grid convolution (D-GridConv, Sec. 3.3, ``KernelAttention``): each kernel tap re-weighted per
  sample and per output cell, a = sigmoid(s / T), with the temperature T kept in the state_dict.
* The fully convolutional lifting network (Fig. 2, ``GridLiftingNetwork``): SGT -> stem -> residual
  blocks -> head -> inverse SGT; plain GridConv, D-GridConv with handcrafted SGT, or with learnable SGT.
* The temperature schedule of the official training loop (``annealed_temperature``).

Joint order is Human3.6M's 17 joints (pelvis first); see ``H36M_JOINTS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

H36M_JOINTS = (
    "Hip", "RHip", "RKnee", "RFoot", "LHip", "LKnee", "LFoot", "Spine", "Thorax",
    "Neck/Nose", "Head", "LShoulder", "LElbow", "LWrist", "RShoulder", "RElbow", "RWrist",
)
H36M_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
NUM_JOINTS = len(H36M_JOINTS)

# Handcrafted SGT (Sec. 3.1), cells in row-major order on the 5x5 grid. Columns are kinematic chains
# running outward from the torso: right leg, right arm, spine/head, left arm, left leg; row 0 repeats
# the spine. The centre cell (8, 9) is the mean of thorax and neck/nose, and is ignored by the inverse.
HANDCRAFTED_LAYOUT: tuple[int | tuple[int, int], ...] = (
    7, 7, 7, 7, 7,
    0, 8, 8, 8, 0,
    1, 14, (8, 9), 11, 4,
    2, 15, 9, 12, 5,
    3, 16, 10, 13, 6,
)

# Initial layouts of the learnable SGT (official `--autosgt_prior`), one joint per cell, row-major.
# `standard` is the handcrafted layout mirrored left<->right with joint 9 in the centre cell.
SGT_PRIORS: dict[str, tuple[int, ...]] = {
    "standard": (7, 7, 7, 7, 7, 0, 8, 8, 8, 0, 4, 11, 9, 14, 1, 5, 12, 9, 15, 2, 6, 13, 10, 16, 3),
    "learnt_type1": (7, 4, 7, 1, 0, 0, 8, 8, 8, 0, 4, 11, 9, 14, 1, 5, 12, 9, 15, 2, 6, 13, 10, 16, 3),
    "learnt_type2": (0, 15, 7, 1, 0, 1, 14, 8, 7, 0, 4, 0, 9, 13, 1, 2, 6, 11, 10, 2, 5, 12, 14, 16, 3),
    "learnt_type3": (9, 7, 7, 10, 7, 13, 8, 10, 15, 16, 9, 12, 7, 14, 1, 4, 5, 7, 3, 11, 7, 6, 9, 2, 14),
}
RANDOM_PRIORS = ("random_prob", "uniform")  # softmax(U(0,1)) (official option) / U(0,1) (pre-fix default)
SGT_MODES = ("frozen", "ste", "gumbel")
PADDING_MODES = {"c": "circular", "z": "constant", "r": "replicate"}


# ----------------------------------------------------------------------------------------------------
# Semantic grid transformation (Sec. 3.1)
# ----------------------------------------------------------------------------------------------------
def handcrafted_sgt_matrices(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The handcrafted SGT as matrices: forward ``M`` (25, 17) with grid = M pose, inverse ``P`` (17, 25).

    ``P @ M`` is the identity; ``P`` averages duplicated joints and ignores the centre cell.
    """
    forward = torch.zeros(len(HANDCRAFTED_LAYOUT), NUM_JOINTS, dtype=dtype)
    inverse = torch.zeros(NUM_JOINTS, len(HANDCRAFTED_LAYOUT), dtype=dtype)
    for cell, joint in enumerate(HANDCRAFTED_LAYOUT):
        if isinstance(joint, tuple):
            forward[cell, list(joint)] = 1.0 / len(joint)
        else:
            forward[cell, joint] = 1.0
            inverse[joint, cell] = 1.0
    return forward, inverse / inverse.sum(1, keepdim=True)


def layout_assignment(cell_to_joint: Sequence[int], num_joints: int = NUM_JOINTS) -> torch.Tensor:
    """One-hot assignment matrix (cells, joints) of a layout given as one joint index per cell."""
    return F.one_hot(torch.as_tensor(cell_to_joint), num_classes=num_joints).float()


def pose_to_grid(pose: torch.Tensor, to_grid: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """SGT: pose (B, J, C) -> grid (B, C, H, P) with cell (h, p) = sum_j to_grid[h*P + p, j] * pose[j]."""
    grid = torch.einsum("qj,bjc->bcq", to_grid.to(pose.dtype), pose)
    return grid.reshape(pose.shape[0], pose.shape[2], *grid_shape)


def grid_to_pose(grid: torch.Tensor, to_pose: torch.Tensor) -> torch.Tensor:
    """Inverse SGT: grid (B, C, H, P) -> pose (B, J, C) with pose[j] = sum_q to_pose[j, q] * cell[q]."""
    return torch.einsum("jq,bcq->bjc", to_pose.to(grid.dtype), grid.flatten(2))


class SemanticGridTransform(nn.Module):
    """Handcrafted SGT (Sec. 3.1) and its inverse; fixed, 5x5 grid, 17 Human3.6M joints."""

    grid_shape = (5, 5)

    def __init__(self) -> None:
        super().__init__()
        to_grid, to_pose = handcrafted_sgt_matrices(torch.float32)
        self.register_buffer("to_grid", to_grid, persistent=False)
        self.register_buffer("to_pose", to_pose, persistent=False)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_grid, self.to_pose

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        return pose_to_grid(pose, self.to_grid, self.grid_shape)

    def inverse(self, grid: torch.Tensor) -> torch.Tensor:
        return grid_to_pose(grid, self.to_pose)


class LearnableSGT(nn.Module):
    """Learnable SGT, "AutoGrids" (Sec. 3.1): a logit per (cell, joint); each cell takes one joint.

    In training the assignment follows ``mode``: ``frozen`` (hard argmax, no gradient: what the official
    training loop does), ``ste`` (hard argmax forward, identity gradient onto the logits) or ``gumbel``
    (soft Gumbel-softmax assignment at temperature ``gumbel_tau``). In eval mode it is always the hard
    argmax. The inverse averages the cells of each joint; a joint without a cell comes out as 0.
    """

    def __init__(self, num_joints: int = NUM_JOINTS, grid_shape: Sequence[int] = (5, 5),
                 prior: str = "standard", mode: str = "frozen", gumbel_tau: float = 1.0) -> None:
        super().__init__()
        if mode not in SGT_MODES:
            raise ValueError(f"sgt mode must be one of {SGT_MODES}, got {mode!r}")
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.num_joints = num_joints
        self.mode = mode
        self.gumbel_tau = gumbel_tau
        self.logits = nn.Parameter(self.prior_logits(prior, num_joints, self.grid_shape))

    @staticmethod
    def prior_logits(prior: str, num_joints: int, grid_shape: Sequence[int]) -> torch.Tensor:
        cells = math.prod(grid_shape)
        if prior in SGT_PRIORS:
            if (num_joints, cells) != (NUM_JOINTS, 25):
                raise ValueError(f"sgt prior {prior!r} is a 5x5 layout of 17 joints; use {RANDOM_PRIORS}")
            return layout_assignment(SGT_PRIORS[prior], num_joints)
        if prior == "random_prob":
            return torch.rand(cells, num_joints).softmax(-1)
        if prior == "uniform":
            return torch.rand(cells, num_joints)
        choices = sorted(SGT_PRIORS) + list(RANDOM_PRIORS)
        raise ValueError(f"unknown sgt prior {prior!r}; choose from {choices}")

    def assignment(self) -> torch.Tensor:
        """The (cells, joints) assignment used by this forward pass."""
        logits = self.logits
        hard = F.one_hot(logits.argmax(-1), num_classes=self.num_joints).to(logits.dtype)
        if not self.training or self.mode == "frozen":
            return hard
        if self.mode == "ste":
            return hard + logits - logits.detach()
        return F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=False, dim=-1)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        to_grid = self.assignment()
        to_pose = to_grid.t() / (to_grid.sum(0)[:, None] + 1e-8)
        return to_grid, to_pose

    def cell_to_joint(self) -> list[int]:
        return self.logits.argmax(-1).tolist()


# ----------------------------------------------------------------------------------------------------
# Grid convolution and dynamic grid convolution (Sec. 3.2-3.3)
# ----------------------------------------------------------------------------------------------------
class KernelAttention(nn.Module):
    """D-GridConv kernel attention (Sec. 3.3): a[n, tap, h, p] = sigmoid(s / T), shared across channels.

    GAP -> linear (C_in -> max(C_in // 16, 16), no bias) -> BN -> ReLU -> linear (-> k*k*H*P).
    The temperature ``T`` is a buffer: it is saved with the weights and restored with them.
    """

    def __init__(self, in_channels: int, grid_shape: Sequence[int] = (5, 5), kernel_size: int = 3,
                 reduction: int = 16, min_channels: int = 16, temperature: float = 30.0) -> None:
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.taps = kernel_size * kernel_size
        hidden = max(in_channels // reduction, min_channels)
        self.squeeze = nn.Linear(in_channels, hidden, bias=False)
        self.norm = nn.BatchNorm1d(hidden)
        self.excite = nn.Linear(hidden, self.taps * math.prod(self.grid_shape))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        for layer in (self.squeeze, self.excite):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.excite.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.excite(F.relu(self.norm(self.squeeze(x.mean((2, 3))))))
        return torch.sigmoid(scores.view(x.shape[0], self.taps, *self.grid_shape) / self.temperature)


class GridConv(nn.Module):
    """Two-branch grid convolution (Sec. 3.2): Y = conv(pad_1(X), W_1) + conv(pad_2(X), W_2).

    ``padding_mode`` gives each branch's border rule: ``c`` circular, ``z`` zeros, ``r`` replicate (one
    cell on every side, so the grid size is kept). With ``dynamic=True`` this is D-GridConv (Sec. 3.3):
    every tap of both kernels is scaled by the kernel attention of the layer's own input,
    Y[n, o, q] = sum_b sum_c sum_k W_b[o, c, k] a[n, k, q] X_b[n, c, q + d_k] + bias_b[o].
    """

    def __init__(self, in_channels: int, out_channels: int, padding_mode: Sequence[str] = ("c", "r"),
                 bias: bool = True, dynamic: bool = True, grid_shape: Sequence[int] = (5, 5),
                 kernel_size: int = 3, temperature: float = 30.0) -> None:
        super().__init__()
        if len(padding_mode) != 2 or any(m not in PADDING_MODES for m in padding_mode):
            raise ValueError(f"padding_mode must be two of {sorted(PADDING_MODES)}, got {padding_mode!r}")
        self.padding_mode = tuple(padding_mode)
        self.kernel_size = kernel_size
        # weight[b] is branch b's (C_out, C_in, k, k) kernel, initialised like nn.Conv2d.
        self.weight = nn.Parameter(torch.empty(2, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(2, out_channels)) if bias else None
        self.attention = (KernelAttention(in_channels, grid_shape, kernel_size, temperature=temperature)
                          if dynamic else None)
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        # Both padded copies side by side on the channel axis: one convolution covers both branches.
        padded = torch.cat([F.pad(x, (p, p, p, p), mode=PADDING_MODES[m]) for m in self.padding_mode], 1)
        out_ch = self.weight.shape[1]
        weight = self.weight.transpose(0, 1).reshape(out_ch, -1, self.kernel_size, self.kernel_size)
        if self.attention is None:
            y = F.conv2d(padded, weight)
        else:
            # Per tap k: a 1x1 convolution of the shifted input, scaled by a[:, k] per output cell. Same
            # result as unfold + modulated matmul (the official form), without materialising the columns.
            h, w = x.shape[-2:]
            att = self.attention(x)
            y = 0
            for k in range(self.kernel_size ** 2):
                i, j = divmod(k, self.kernel_size)
                tap = F.conv2d(padded[:, :, i:i + h, j:j + w], weight[:, :, i:i + 1, j:j + 1])
                y = y + tap * att[:, k:k + 1]
        if self.bias is not None:
            y = y + self.bias.sum(0).view(1, -1, 1, 1)
        return y


# ----------------------------------------------------------------------------------------------------
# Lifting network (Fig. 2)
# ----------------------------------------------------------------------------------------------------
class GridResidualBlock(nn.Module):
    """x + Drop(ReLU(BN(conv2(Drop(ReLU(BN(conv1(x)))))))) with (D-)GridConv layers."""

    def __init__(self, channels: int, dropout: float, **conv_kwargs) -> None:
        super().__init__()
        self.conv1 = GridConv(channels, channels, **conv_kwargs)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = GridConv(channels, channels, **conv_kwargs)
        self.norm2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.norm1(self.conv1(x))))
        y = self.dropout(F.relu(self.norm2(self.conv2(y))))
        return x + y


class GridLiftingNetwork(nn.Module):
    """Fully convolutional 2D->3D lifting on grid poses (Fig. 2): SGT, stem, residual blocks, head, SGT^-1.

    ``dynamic=False`` gives the plain GridConv network, ``True`` D-GridConv. ``sgt="handcrafted"`` uses
    the fixed layout, ``"learnable"`` the AutoGrids layer. ``loss_space`` says where the training loss is
    taken: on the 3 x H x P grid (official for handcrafted SGT) or on the joints (official for learnable).
    """

    def __init__(self, hidden_size: int = 256, num_blocks: int = 2, grid_shape: Sequence[int] = (5, 5),
                 padding_mode: Sequence[str] = ("c", "r"), dynamic: bool = True, sgt: str = "handcrafted",
                 sgt_prior: str = "standard", sgt_mode: str = "frozen", gumbel_tau: float = 1.0,
                 loss_space: str | None = None, dropout: float = 0.25, temperature: float = 30.0,
                 num_joints: int = NUM_JOINTS) -> None:
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        if sgt == "handcrafted":
            if self.grid_shape != (5, 5) or num_joints != NUM_JOINTS:
                raise ValueError("the handcrafted SGT is a 5x5 layout of 17 joints; use sgt=learnable")
            self.sgt: nn.Module = SemanticGridTransform()
        elif sgt == "learnable":
            self.sgt = LearnableSGT(num_joints, self.grid_shape, sgt_prior, sgt_mode, gumbel_tau)
        else:
            raise ValueError(f"sgt must be 'handcrafted' or 'learnable', got {sgt!r}")
        self.loss_space = loss_space or ("grid" if sgt == "handcrafted" else "joints")
        if self.loss_space not in ("grid", "joints"):
            raise ValueError(f"loss_space must be 'grid' or 'joints', got {loss_space!r}")
        conv = dict(padding_mode=padding_mode, dynamic=dynamic, grid_shape=self.grid_shape,
                    temperature=temperature)
        self.stem = GridConv(2, hidden_size, bias=True, **conv)
        self.stem_norm = nn.BatchNorm2d(hidden_size)
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList(GridResidualBlock(hidden_size, dropout, bias=True, **conv)
                                    for _ in range(num_blocks))
        self.head = GridConv(hidden_size, 3, bias=False, **conv)

    # -- temperature of every kernel attention (kept in the state_dict) --
    def set_temperature(self, temperature: float) -> None:
        for m in self.modules():
            if isinstance(m, KernelAttention):
                m.temperature.fill_(float(temperature))

    @property
    def temperature(self) -> float | None:
        for m in self.modules():
            if isinstance(m, KernelAttention):
                return float(m.temperature)
        return None

    def forward_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: grid (B, 2, H, P) -> grid (B, 3, H, P)."""
        y = self.dropout(F.relu(self.stem_norm(self.stem(grid))))
        for block in self.blocks:
            y = block(y)
        return self.head(y)

    def forward_with_grid(self, pose2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pose2d (B, J, 2) -> (pose3d (B, J, 3), output grid, forward SGT matrix of this pass)."""
        to_grid, to_pose = self.sgt.matrices()
        grid = self.forward_grid(pose_to_grid(pose2d, to_grid, self.grid_shape))
        return grid_to_pose(grid, to_pose), grid, to_grid

    def forward(self, pose2d: torch.Tensor) -> torch.Tensor:
        """Lift normalised 2D joints (B, J, 2) to root-relative 3D joints (B, J, 3)."""
        return self.forward_with_grid(pose2d)[0]

    def forward_train(self, pose2d: torch.Tensor, pose3d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Prediction and the MSE loss, on the grid or on the joints as ``loss_space`` says."""
        pred, grid, to_grid = self.forward_with_grid(pose2d)
        if self.loss_space == "grid":
            target = pose_to_grid(pose3d, to_grid.detach(), self.grid_shape)
            return pred, {"loss_mse": F.mse_loss(grid, target)}
        return pred, {"loss_mse": F.mse_loss(pred, pose3d)}


def annealed_temperature(epoch: int, iteration: int, iters_per_epoch: int, anneal_epochs: float = 10,
                         max_temperature: float = 30.0) -> float:
    """Official schedule (Sec. 4.1): T falls linearly from ``max_temperature`` to 1 over the first
    ``anneal_epochs`` epochs at iteration granularity, then stays at its last value."""
    if anneal_epochs <= 0:
        return 1.0
    # The official loop sets T before each iteration of the first `anneal_epochs` epochs only.
    progress = min(epoch + iteration / iters_per_epoch, anneal_epochs - 1 / iters_per_epoch)
    return 1.0 + (1.0 - progress / anneal_epochs) * (max_temperature - 1.0)
