"""CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola; ICLR 2020), as RepDistiller defines it.

Torch-only and copyable alone. NORM's `NORM_CRD` mode adds this term, weighted 2.5, beside the N-to-one loss
(NORM spec b.8). The pieces, with the names of RepDistiller's `crd/` files:

- `Embed`                     linear projection to `feat_dim` + L2 normalisation (`criterion.py::Embed`).
- `ContrastMemory`            one memory bank per side, `n_data x feat_dim`, momentum-updated with the batch's
                              embeddings; scores `exp(v . m / T) / Z` of every anchor against its `K + 1` bank
                              rows; `Z` is fixed at the first step to `n_data * mean(exp(...))` (`memory.py`).
- `nce_loss`                  the noise-contrastive estimator of CRD Eq. (18) with noise `P_n = 1 / n_data`
                              (`criterion.py::ContrastLoss`).
- `CRDLoss`                   both directions: the student anchor against the teacher bank plus the teacher
                              anchor against the student bank (`criterion.py::CRDLoss`).
- `ContrastiveSampleDataset`  a dataset wrapper that yields each sample's index and, per sample, `K` negative
                              indices drawn from the other classes (`dataset/cifar100.py::CIFAR100InstanceSample`,
                              mode `exact`/`relax`), packed with the label into one integer target row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["CRDLoss", "ContrastMemory", "ContrastiveSampleDataset", "Embed", "nce_loss", "unpack_targets"]

NCE_EPS = 1e-7  # RepDistiller's eps in the estimator's denominators


class Embed(nn.Module):
    """CRD's embedding head g(.): a linear map to `dim_out` followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x.flatten(1))
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # >= float32 under AMP


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate `x` over the ranks of a DDP run (identity in a single process); no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


class ContrastMemory(nn.Module):
    """The two memory banks of CRD and the scores of anchors against sampled bank rows (RepDistiller memory.py).

    `forward(v_s, v_t, index, contrast_index)` returns `(p_s, p_t)`, each `[B, K + 1]`:
    `p_s[i, j] = exp(<v_s[i], memory_t[contrast_index[i, j]]> / T) / Z_s` (student anchor, teacher bank) and
    `p_t` likewise with the roles swapped; column 0 is the positive. Then, without gradient, the rows `index`
    of each bank move to `normalise(m * row + (1 - m) * v)`. The normalisers `Z_s`, `Z_t` are set once, at the
    first training step, to `n_data * mean(exp(...))` and kept as buffers, so a resumed run uses the same values.
    """

    def __init__(self, feat_dim: int, n_data: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.n_data = n_data
        self.temperature = temperature
        self.momentum = momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # uniform(-stdv, stdv): rows of unit norm in expectation
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))  # < 0: not set yet
        self.register_buffer("z_t", torch.tensor(-1.0))

    def scores(self, anchor: Tensor, memory: Tensor, contrast_index: Tensor) -> Tensor:
        """exp(<anchor_i, memory[contrast_index[i, j]]> / T), unnormalised, `[B, K + 1]`."""
        rows = memory.index_select(0, contrast_index.flatten()).view(*contrast_index.shape, -1)
        return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.temperature)

    @torch.no_grad()
    def _set_normaliser(self, z: Tensor, scores: Tensor) -> None:
        mean = _all_gather(scores.detach().mean().reshape(1)).mean()  # one Z for every rank
        z.copy_(torch.where(z < 0, mean * self.n_data, z))  # no host sync

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, index: Tensor) -> None:
        """Momentum update of the rows `index` of both banks, re-normalised to unit length."""
        v_s, v_t, index = _all_gather(v_s.detach()), _all_gather(v_t.detach()), _all_gather(index)
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = memory.index_select(0, index).mul_(self.momentum).add_(v, alpha=1 - self.momentum)
            memory.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(self, v_s: Tensor, v_t: Tensor, index: Tensor, contrast_index: Tensor) -> tuple[Tensor, Tensor]:
        p_s = self.scores(v_s, self.memory_t, contrast_index)
        p_t = self.scores(v_t, self.memory_s, contrast_index)
        if self.training:
            self._set_normaliser(self.z_s, p_s)
            self._set_normaliser(self.z_t, p_t)
        p_s, p_t = p_s / self.z_s, p_t / self.z_t
        if self.training:
            self.update(v_s, v_t, index)
        return p_s, p_t


def nce_loss(p: Tensor, n_data: int) -> Tensor:
    """CRD Eq. (18): -E[log h(pos)] - K E[log(1 - h(neg))] with h(x) = P(x) / (P(x) + K P_n), P_n = 1/n_data.

    `p` is `[B, K + 1]` (column 0 the positive); summed over the K negatives, averaged over the batch.
    """
    k_pn = (p.shape[1] - 1) / n_data
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + k_pn + NCE_EPS))
    log_d0 = torch.log(k_pn / (p[:, 1:] + k_pn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


class CRDLoss(nn.Module):
    """L_CRD = NCE(student anchor vs teacher bank) + NCE(teacher anchor vs student bank) (RepDistiller CRDLoss).

    `f_s`, `f_t` are the pooled features the classifiers read; the embedding heads are trained with the
    student, the teacher feature is used without gradient.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, feat_dim: int = 128,
                 temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.n_data = n_data
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.memory = ContrastMemory(feat_dim, n_data, temperature, momentum)

    def forward(self, f_s: Tensor, f_t: Tensor, index: Tensor, contrast_index: Tensor) -> Tensor:
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t.detach())
        with torch.autocast(v_s.device.type, enabled=False):  # exp(. / 0.07) in float32
            p_s, p_t = self.memory(v_s, v_t, index, contrast_index)
            return nce_loss(p_s, self.n_data) + nce_loss(p_t, self.n_data)


def unpack_targets(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(label, index, contrast_index)` from a `ContrastiveSampleDataset` target row `[label, index, pos, neg...]`."""
    return packed[:, 0], packed[:, 1], packed[:, 2:]


class ContrastiveSampleDataset(Dataset):
    """Wraps `(image, label)` items into `(image, [label, index, pos, neg_1 .. neg_K])` (int64) for CRD.

    `pos` is the sample itself (`mode="exact"`) or a random sample of its class (`"relax"`); the K negatives
    are drawn uniformly from the samples of the other classes, without replacement when there are at least K
    of them and with replacement otherwise, as RepDistiller's `CIFAR100InstanceSample` does. The samples are
    kept sorted by class, so a draw from "all but class y" is a draw from `n - count[y]` positions with the
    class's block skipped: O(n) memory instead of a per-class list of negatives. Randomness comes from torch's
    global generator (seeded per sample in DataLoader workers by the trainer, checkpointed in the main process).
    """

    def __init__(self, dataset: Dataset, labels: Any, k: int = 16384, mode: str = "exact"):
        if mode not in ("exact", "relax"):
            raise ValueError(f"CRD sampling mode must be 'exact' or 'relax', got {mode!r}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels.ndim != 1 or len(labels) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"need one label per sample: {tuple(labels.shape)} labels for {len(dataset)} samples")  # type: ignore[arg-type]
        self.dataset, self.k, self.mode = dataset, k, mode
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        counts = torch.bincount(labels)
        self.counts = counts.tolist()
        self.starts = (torch.cumsum(counts, 0) - counts).tolist()
        if max(self.counts) == len(labels):
            raise ValueError("CRD needs at least two classes to draw negatives from")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def sample(self, index: int, label: int) -> Tensor:
        """`[pos, neg_1 .. neg_K]` for one sample."""
        start, count = self.starts[label], self.counts[label]
        n_neg = len(self.order) - count
        r = torch.randint(n_neg, (self.k,)) if self.k > n_neg else torch.randperm(n_neg)[: self.k]
        negatives = self.order[r + count * (r >= start)]  # skip the class's own block
        pos = index if self.mode == "exact" else int(self.order[start + int(torch.randint(count, ()))])
        return torch.cat([torch.tensor([pos]), negatives])

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        image, label = self.dataset[index]
        return image, torch.cat([torch.tensor([int(label), index]), self.sample(index, int(label))])
