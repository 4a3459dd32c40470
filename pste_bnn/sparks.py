"""Sparks (CVPR 2023) sparse kernel selection and the SNN (ICCV 2021) baseline, torch-only.

Spec: shared/specs/pste_bnn.md. One file, copyable alone (scipy only for the Hungarian solve):

* the 512-word codebook of binary 3x3 kernels, MSB-first (b.1), and the nearest-codeword quantizer
  with clip STE and detached per-channel scale (b.2, b.7);
* the PSTE selection (b.4-b.6): per-layer logits X [512, 512], Gumbel noise x gamma, log-space
  Sinkhorn at temperature t for L iterations (evaluated in its exact scaling form), and the exact
  512x512 Hungarian assignment forward, so no codeword repeats; batched over layers, solves in threads;
* `SelectionSchedule` (b.8): t and gamma from one checkpointed object (buffers), rank-identical noise;
* frozen inference selection and export to (ids, tau-bit index map, alpha) (b.9);
* `SNNBinarize` (b.10): the official SNN quantizer's maths, with its state as buffers;
* `HardBinaryConv`: the binary 3x3 conv carrying any of them (real / bnn / fixed / snn / sparks).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_CODEWORDS = 512  # 2^9 sign patterns of a 3x3 kernel (b.1)
KERNEL_NUMEL = 9
QUANTIZERS = ("real", "bnn", "fixed", "snn", "sparks")

_MSB_WEIGHTS = [2 ** (KERNEL_NUMEL - 1 - j) for j in range(KERNEL_NUMEL)]


# --------------------------------------------------------------------------------------- b.1 / b.2
def codebook(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """U in {-1,+1}^{512x9}: row i is i's 9-bit expansion, most significant bit first, 1 -> +1 (b.1)."""
    ids = torch.arange(N_CODEWORDS, device=device)
    shifts = torch.arange(KERNEL_NUMEL - 1, -1, -1, device=device)
    return (((ids[:, None] >> shifts) & 1) * 2 - 1).to(dtype)


def codeword_ids(kernels: Tensor) -> Tensor:
    """MSB-first codebook row of each kernel's sign pattern, id = sum_j [w_j > 0] 2^(8-j) (b.1, b.8)."""
    weights = torch.tensor(_MSB_WEIGHTS, device=kernels.device)
    return ((kernels.reshape(-1, KERNEL_NUMEL) > 0).long() * weights).sum(-1)


def official_bnum(ids: Tensor) -> Tensor:
    """The official `patterns2bnum` code of row `ids` (LSB-first): the 9-bit reverse (b.1 gotcha)."""
    out = torch.zeros_like(ids)
    for j in range(KERNEL_NUMEL):
        out |= ((ids >> j) & 1) << (KERNEL_NUMEL - 1 - j)
    return out


def nearest_codeword(kernels: Tensor, sub_codebook: Tensor) -> Tensor:
    """argmin_j ||w - C_j|| as argmax_j <w, C_j> (every codeword has norm^2 9), ties to the smallest j (b.2)."""
    return (kernels.reshape(-1, KERNEL_NUMEL) @ sub_codebook.to(kernels.dtype).t()).argmax(dim=1)


def channel_scale(weight: Tensor) -> Tensor:
    """alpha_o = mean |W[o]| per output channel, detached (b.2)."""
    return weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True)


def clip_ste(weight: Tensor) -> Tensor:
    """clip(w, -1, 1) - stopgrad(clip(w, -1, 1)): value exactly 0, gradient 1[|w| < 1] (b.7.3)."""
    clipped = weight.clamp(-1.0, 1.0)
    return clipped - clipped.detach()


def quantize_to_codebook(weight: Tensor, sub_codebook: Tensor) -> tuple[Tensor, Tensor]:
    """B = A C + clip STE (b.7.2-3): exact codewords forward; dL/dC = A^T dL/dB; returns (B, assignment)."""
    kernels = weight.reshape(-1, KERNEL_NUMEL)
    idx = nearest_codeword(kernels.detach(), sub_codebook.detach())
    binary = sub_codebook.to(weight.dtype).index_select(0, idx).reshape(weight.shape)
    return binary + clip_ste(weight), idx


def frequent_codewords(weight: Tensor, n: int) -> Tensor:
    """The n most frequent sign codewords of `weight`, sorted by (count, id) descending (b.8 `freq`)."""
    counts = torch.bincount(codeword_ids(weight.detach()), minlength=N_CODEWORDS)
    order = sorted(range(N_CODEWORDS), key=lambda i: (int(counts[i]), i), reverse=True)
    return torch.tensor(order[:n], dtype=torch.long, device=weight.device)


# --------------------------------------------------------------------------------------- b.5
def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """G = -log(-log(u + eps) + eps), u ~ U(0, 1), eps = 1e-20 (b.5)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def log_sinkhorn(log_alpha: Tensor, iters: int) -> Tensor:
    """Log-space Sinkhorn: `iters` x (row step, then column step) on Z = S / t; returns log P (b.5)."""
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha


class _SinkhornScaling(torch.autograd.Function):
    """exp(log_sinkhorn(S / t, L))[:, :rows] and its exact VJP, in float64 scaling form (b.5, b.6).

    After half-step h the log-space iterate is log(diag(a_h) K diag(b_h)) with K = exp(Z - rowmax Z), so
    the forward is 2L matrix-vector products instead of 2L full log-sum-exp passes. The VJP of a row
    (column) step is g - M_h * rowsum(g) (colsum(g)), after which that sum is exactly 0; every correction
    is K scaled on both sides, so dL/dZ = g_L - K * (sum_h u_h v_h^T), the running sums kept by one
    matrix-vector product per half-step.
    Layers whose scaling vectors leave a safe float64 range fall back to plain log-space autograd.
    """

    SAFE = 1e100

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float, iters: int, rows: int) -> Tensor:  # type: ignore[override]
        z = scores.detach().to(torch.float64) / temperature
        kern = torch.exp(z - z.amax(dim=-1, keepdim=True))
        batch, size = z.shape[0], z.shape[-1]
        a_hist = torch.empty(iters, batch, size, dtype=z.dtype, device=z.device)
        b_hist = torch.empty_like(a_hist)
        for layer in range(batch):  # 2-D mat-vecs (gemv): far faster than bmm with one column
            k, b = kern[layer], torch.ones(size, dtype=z.dtype, device=z.device)
            for i in range(iters):
                a = torch.mv(k, b).reciprocal_()
                b = torch.mv(k.t(), a).reciprocal_()
                a_hist[i, layer], b_hist[i, layer] = a, b
        a, b = a_hist[-1], b_hist[-1]
        top = a[:, :rows, None] * kern[:, :rows] * b[:, None, :]
        ok = (torch.isfinite(a) & (a < _SinkhornScaling.SAFE)).all(dim=1) & \
             (torch.isfinite(b) & (b < _SinkhornScaling.SAFE)).all(dim=1)
        fallback = (~ok).nonzero().flatten().tolist()
        for layer in fallback:  # extreme logits / temperature: the log-space form itself
            top[layer] = log_sinkhorn(z[layer], iters)[:rows].exp()
        ctx.save_for_backward(scores, kern, top, a_hist, b_hist)
        ctx.temperature, ctx.iters, ctx.rows, ctx.fallback = temperature, iters, rows, fallback
        return top.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_top: Tensor):  # type: ignore[override]
        scores, kern, top, a_hist, b_hist = ctx.saved_tensors
        rows, iters, t = ctx.rows, ctx.iters, ctx.temperature
        batch, size = kern.shape[0], kern.shape[-1]
        g_top = grad_top.to(torch.float64) * top  # through exp: dL/dZ_final on rows < n, 0 below
        grad_z = torch.empty_like(kern)
        ones = torch.ones(size, dtype=torch.float64, device=kern.device)
        for layer in range(batch):
            k, g = kern[layer], g_top[layer]
            row_sum = torch.zeros(size, dtype=torch.float64, device=k.device)
            row_sum[:rows] = g.sum(dim=1)
            col_sum = g.sum(dim=0)
            us, vs = [], []
            for i in range(iters - 1, -1, -1):
                a = a_hist[i, layer]
                # column step i: correction diag(a) K diag(b * colsum); colsum -> 0, rowsum updated
                v = b_hist[i, layer] * col_sum
                row_sum = row_sum - a * torch.mv(k, v)
                us.append(a)
                vs.append(v)
                # row step i: correction diag(a * rowsum) K diag(b_prev); rowsum -> 0, colsum updated
                b_prev = b_hist[i - 1, layer] if i > 0 else ones
                u = a * row_sum
                col_sum = -b_prev * torch.mv(k.t(), u)
                us.append(u)
                vs.append(b_prev)
                row_sum = torch.zeros_like(row_sum)
            torch.mm(torch.stack(us, dim=1), torch.stack(vs, dim=0).neg_(), out=grad_z[layer]).mul_(k)
        grad_z[:, :rows] += g_top
        grad_z.div_(t)
        for layer in ctx.fallback:
            with torch.enable_grad():
                s = scores[layer].detach().to(torch.float64).requires_grad_(True)
                p = log_sinkhorn(s / t, iters)[:rows].exp()
                (grad_z[layer],) = torch.autograd.grad(p, s, grad_top[layer].to(torch.float64))
        return grad_z.to(scores.dtype), None, None, None


def sinkhorn(scores: Tensor, temperature: float, iters: int, rows: int | None = None) -> Tensor:
    """P_soft = exp(log-space Sinkhorn(S / t, L)), rows [0, rows), differentiable w.r.t. S (b.5).

    `scores` is [N, N] or [B, N, N]; computed in float64, returned in `scores`' dtype.
    """
    if temperature <= 0 or iters < 1:
        raise ValueError(f"sinkhorn needs temperature > 0 and iters >= 1, got t={temperature}, L={iters}")
    single = scores.dim() == 2
    batch = scores[None] if single else scores
    out = _SinkhornScaling.apply(batch, float(temperature), int(iters), int(rows or batch.shape[-2]))
    return out[0] if single else out


# --------------------------------------------------------------------------------------- b.5 hard
_POOL: ThreadPoolExecutor | None = None


def _pool(threads: int) -> ThreadPoolExecutor | None:
    global _POOL
    if threads <= 1:
        return None
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hungarian")
    return _POOL


def default_solver_threads() -> int:
    """Threads for the Hungarian solves (scipy releases the GIL): $PSTE_SOLVER_THREADS or min(4, cpus)."""
    env = os.environ.get("PSTE_SOLVER_THREADS")
    return int(env) if env else min(4, os.cpu_count() or 1)


def _solve(score: object) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.from_numpy(cols[rows.argsort()]).long()


class HungarianJob:
    """Hungarian solves of a [B, N, N] score stack started in a thread pool; `result()` joins (b.5)."""

    def __init__(self, scores: Tensor, threads: int | None = None) -> None:
        mats = scores.detach().to("cpu", torch.float64).numpy()
        pool = _pool(default_solver_threads() if threads is None else threads)
        self._futures = [pool.submit(_solve, m) for m in mats] if pool else None
        self._serial = None if pool else [_solve(m) for m in mats]
        self._device = scores.device

    def result(self) -> Tensor:
        perms = self._serial if self._futures is None else [f.result() for f in self._futures]
        return torch.stack(perms).to(self._device)


def hungarian(scores: Tensor, threads: int | None = None) -> Tensor:
    """pi maximising <P, S> over permutations, row i -> column pi[i]; [N, N] -> [N], [B, N, N] -> [B, N]."""
    single = scores.dim() == 2
    perm = HungarianJob(scores[None] if single else scores, threads).result()
    return perm[0] if single else perm


def rectangular_selection(scores: Tensor, n: int) -> Tensor:
    """NOT the paper's formulation (b.5): match only rows [0, n) against the 512 columns; [B, N, N] -> [B, n]."""
    from scipy.optimize import linear_sum_assignment

    mats = scores.detach()[:, :n].to("cpu", torch.float64).numpy()
    out = [torch.from_numpy(linear_sum_assignment(m, maximize=True)[1]).long() for m in mats]
    return torch.stack(out).to(scores.device)


# --------------------------------------------------------------------------------------- b.6
def pste_codebooks(logits: Tensor, n: int, temperature: float, iters: int, noise: Tensor | None = None,
                   noise_factor: float = 1.0, perm: Tensor | None = None,
                   threads: int | None = None, rectangular: bool = False) -> tuple[Tensor, Tensor]:
    """PSTE sub-codebooks of a stack of layers (b.4-b.6): C = U[pi[:n]] + (P_soft[:n] U - stopgrad(.)).

    logits X [B, N, N]; noise G [B, N, N] or None; S = X + gamma G in float64. The forward values are
    exactly U[pi[:n]] (the brackets of b.6 kept); the gradient is dL/dC U^T through the Sinkhorn VJP.
    `perm` [B, N] reuses given hard assignments (hard_every > 1). Returns (C [B, n, 9], selected ids [B, n]).
    """
    scores = logits.to(torch.float64)
    if noise is not None and noise_factor != 0:
        scores = scores + noise_factor * noise.to(torch.float64)
    if rectangular:
        ids = rectangular_selection(scores, n) if perm is None else perm[:, :n]
    else:
        job = HungarianJob(scores, threads) if perm is None else None  # runs while Sinkhorn computes
    soft = sinkhorn(scores, temperature, iters, rows=n)  # [B, n, N] float64
    if not rectangular:
        ids = (job.result() if job is not None else perm)[:, :n]
    table = codebook(torch.float64, logits.device)
    soft_words = soft @ table
    words = table[ids] + (soft_words - soft_words.detach())
    return words.to(logits.dtype), ids


# --------------------------------------------------------------------------------------- b.8
class SelectionSchedule(nn.Module):
    """Temperature t and noise factor gamma of step 2 from one global, checkpointed object (b.8).

    t(s) = t0 (t1/t0)^(s/S) (`exponential`), linear, or constant; gamma falls linearly from gamma0 to 0
    over the first `noise_frac` of the S steps, then stays 0. The Gumbel generator is seeded from
    (noise_seed, step): identical on every DDP rank, reproduced exactly on resume (d.2).
    """

    SHAPES = ("exponential", "linear", "constant")

    def __init__(self, t0: float = 1.0, t1: float = 0.05, shape: str = "exponential", gamma0: float = 1.0,
                 noise_frac: float = 0.25, noise_seed: int = 0) -> None:
        super().__init__()
        if shape not in self.SHAPES:
            raise ValueError(f"temperature schedule shape must be one of {self.SHAPES}, got {shape!r}")
        if t0 <= 0 or t1 <= 0:
            raise ValueError(f"temperatures must be > 0, got t0={t0}, t1={t1}")
        if not 0.0 <= noise_frac <= 1.0 or gamma0 < 0:
            raise ValueError(f"need gamma0 >= 0 and 0 <= noise_frac <= 1, got {gamma0}, {noise_frac}")
        self.t0, self.t1, self.shape = float(t0), float(t1), shape
        self.gamma0, self.noise_frac, self.noise_seed = float(gamma0), float(noise_frac), int(noise_seed)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.ones((), dtype=torch.long))

    def set_step(self, step: int, total_steps: int) -> None:
        """Called before every step-2 optimiser step (the harness's `on_step_start`)."""
        self.step.fill_(int(step))
        self.total_steps.fill_(max(int(total_steps), 1))

    @property
    def progress(self) -> float:
        return min(float(self.step) / float(self.total_steps), 1.0)

    @property
    def temperature(self) -> float:
        s = self.progress
        if self.shape == "exponential":
            return self.t0 * (self.t1 / self.t0) ** s
        if self.shape == "linear":
            return self.t0 + (self.t1 - self.t0) * s
        return self.t0

    @property
    def noise_factor(self) -> float:
        if self.noise_frac == 0:
            return 0.0
        return self.gamma0 * max(0.0, 1.0 - self.progress / self.noise_frac)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The Gumbel generator of the current step: seeded from (noise_seed, step), rank-identical."""
        return torch.Generator(device=device).manual_seed(self.noise_seed * 1_000_003 + int(self.step))

    def extra_repr(self) -> str:
        return (f"t0={self.t0}, t1={self.t1}, shape={self.shape}, gamma0={self.gamma0}, "
                f"noise_frac={self.noise_frac}, noise_seed={self.noise_seed}")


# --------------------------------------------------------------------------------------- b.4, b.8, b.9
class PermutationSelector(nn.Module):
    """Per-layer selection logits X [512, 512] and the frozen ids of Hungarian(X)[:n] (b.4, b.9).

    Training: a sub-codebook primed by `select_codebooks` (all layers at once) or computed alone with the
    attached schedule. Evaluation: C = U[Hungarian(X)[:n]], no noise, no Sinkhorn, refreshed whenever X
    changed and kept in the `selected_ids` buffer.
    """

    def __init__(self, n: int, iters: int = 20, hard_every: int = 1, init: str = "zeros",
                 kappa: float = 5.0, rectangular: bool = False) -> None:
        super().__init__()
        if not 1 <= n <= N_CODEWORDS:
            raise ValueError(f"sub-codebook size n must be in 1..{N_CODEWORDS}, got {n}")
        if iters < 1 or hard_every < 1:
            raise ValueError(f"need sinkhorn iters >= 1 and hard_every >= 1, got {iters}, {hard_every}")
        if init not in ("zeros", "freq"):
            raise ValueError(f"selection init must be 'zeros' or 'freq', got {init!r}")
        self.n, self.iters, self.hard_every, self.init = n, iters, hard_every, init
        self.kappa, self.rectangular = float(kappa), rectangular
        self.logits = nn.Parameter(torch.zeros(N_CODEWORDS, N_CODEWORDS))
        self.register_buffer("selected_ids", torch.arange(n))
        self.register_buffer("cached_perm", torch.arange(N_CODEWORDS), persistent=False)
        self.register_buffer("cached_step", torch.full((), -1, dtype=torch.long), persistent=False)
        self.schedule: SelectionSchedule | None = None  # set by attach_schedule (not a submodule)
        self._primed: Tensor | None = None
        self._frozen_key: tuple[int, int] | None = None

    def attach_schedule(self, schedule: SelectionSchedule) -> None:
        object.__setattr__(self, "schedule", schedule)

    @torch.no_grad()
    def init_from_ids(self, ids: Tensor, kappa: float | None = None) -> None:
        """X = 0 except X[r, ids[r]] = kappa, so Hungarian(X) puts `ids` in rows 0..n-1 (b.8, g)."""
        if ids.numel() != self.n or ids.unique().numel() != self.n:
            raise ValueError(f"need {self.n} distinct codeword ids, got {ids.tolist()}")
        self.logits.zero_()
        self.logits[torch.arange(self.n), ids.to(self.logits.device)] = self.kappa if kappa is None else kappa
        self.selected_ids.copy_(ids)

    @torch.no_grad()
    def init_from_weight(self, weight: Tensor) -> None:
        """`freq`: the n most frequent step-1 codewords at kappa; `zeros`: X = 0 (b.8)."""
        if self.init == "freq":
            self.init_from_ids(frequent_codewords(weight, self.n))
        else:
            self.logits.zero_()
            self._frozen_key = None

    def prime(self, words: Tensor) -> None:
        """Hand this layer its sub-codebook for the next training forward (from `select_codebooks`)."""
        self._primed = words

    @torch.no_grad()
    def frozen_ids(self) -> Tensor:
        """Hungarian(X)[:n] without noise (b.9), recomputed only when X changed."""
        key = (self.logits.data_ptr(), self.logits._version)
        if key != self._frozen_key:
            if self.rectangular:
                ids = rectangular_selection(self.logits[None], self.n)[0]
            else:
                ids = hungarian(self.logits, threads=1)[: self.n]
            self.selected_ids.copy_(ids)
            self._frozen_key = key
        return self.selected_ids

    def forward(self) -> Tensor:
        """The layer's sub-codebook C [n, 9] (PSTE in training, frozen at evaluation)."""
        if not self.training:
            return codebook(self.logits.dtype, self.logits.device)[self.frozen_ids()]
        if self._primed is not None:
            words, self._primed = self._primed, None
            return words
        schedule = self.schedule if self.schedule is not None else SelectionSchedule()
        return select_codebooks([self], schedule)[0]


@torch.no_grad()
def _reusable_perm(selector: PermutationSelector, schedule: SelectionSchedule, gamma: float) -> Tensor | None:
    """The cached hard assignment when hard_every > 1 allows it: only once gamma is 0 (k.9)."""
    if selector.hard_every <= 1 or gamma != 0 or int(selector.cached_step) < 0:
        return None
    if int(schedule.step) - int(selector.cached_step) >= selector.hard_every:
        return None
    return selector.cached_perm


def select_codebooks(selectors: Sequence[PermutationSelector], schedule: SelectionSchedule) -> list[Tensor]:
    """Training sub-codebooks of all `selectors` at once: one batched Sinkhorn, Hungarian solves in threads.

    Layers with equal (n, L) share one batch; Gumbel noise comes from the schedule's step generator, one
    [512, 512] draw per layer in order (b.5, d.2).
    """
    if not selectors:
        return []
    t, gamma = schedule.temperature, schedule.noise_factor
    device = selectors[0].logits.device
    noise = None
    if gamma != 0:
        gen = schedule.generator("cpu")
        noise = gumbel_noise((len(selectors), N_CODEWORDS, N_CODEWORDS), gen,
                             selectors[0].logits.dtype).to(device)
    out: list[Tensor | None] = [None] * len(selectors)
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for i, s in enumerate(selectors):
        groups.setdefault((s.n, s.iters, s.rectangular), []).append(i)
    for (n, iters, rect), members in groups.items():
        cached = [_reusable_perm(selectors[i], schedule, gamma) for i in members]
        logits = torch.stack([selectors[i].logits for i in members])
        layer_noise = None if noise is None else noise[members]
        perm = torch.stack(cached) if all(c is not None for c in cached) else None
        words, ids = pste_codebooks(logits, n, t, iters, layer_noise, gamma, perm=perm, rectangular=rect)
        for j, i in enumerate(members):
            out[i] = words[j]
            sel = selectors[i]
            if sel.hard_every > 1 and perm is None and not rect:
                sel.cached_perm[:n].copy_(ids[j])
                sel.cached_step.fill_(int(schedule.step))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- b.10
class SNNBinarize(nn.Module):
    """The official SNN quantizer (`step2/modules/binarize.py::Binarize`) with its state as buffers (b.10).

    patterns [2^tau, 9] (random distinct rows of U); memory = hysteresis sign of patterns; every
    `refine_every`-th training call the codewords get the gradient onehot^T dL/dB, duplicates are replaced
    by random codewords and patterns are clamped to [-3, 3]. Counter and memory advance in training mode
    only; refine_every = 0 reproduces the inert multi-GPU `DataParallel` behaviour (k.6).
    `zero_grad_set_to_none=False` is torch 1.4's `zero_grad`: after the first refinement `patterns` carry a
    zero gradient every step, so Adam keeps moving them on momentum.
    """

    def __init__(self, bit_num: int, refine_every: int = 25, zero_grad_set_to_none: bool = False,
                 rng: random.Random | None = None) -> None:
        super().__init__()
        if not 0 <= bit_num <= 9:
            raise ValueError(f"SNN bit_num (tau) must be in 0..9, got {bit_num}")
        if refine_every < 0:
            raise ValueError(f"refine_every must be >= 0 (0 = never refine), got {refine_every}")
        self.bit_num, self.refine_every, self.zero_grad_set_to_none = bit_num, refine_every, zero_grad_set_to_none
        self.rng = rng  # None: Python's global `random`, as the official code
        ids = self._random().sample(list(range(N_CODEWORDS)), 2 ** bit_num)
        self.patterns = nn.Parameter(codebook()[ids])
        self.register_buffer("memory", torch.sign(self.patterns.detach()).clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _random(self):  # -> random.Random or the `random` module (its global instance)
        return self.rng if self.rng is not None else random

    def current_memory(self) -> Tensor:
        """Hysteresis: sign(patterns) where |patterns| >= 1e-3, else the previous memory."""
        p = self.patterns.detach()
        return torch.where(p.abs() >= 1e-3, torch.sign(p), self.memory)

    def forward(self, weight: Tensor) -> Tensor:
        """Unscaled binary weights B: codeword + clip STE (values exact; the official left-to-right order gives
        the same maths with +-1 ulp, spec b.10.3)."""
        memory = self.current_memory()
        idx = nearest_codeword(weight.detach().reshape(-1, KERNEL_NUMEL), memory)
        out = memory.index_select(0, idx).reshape(weight.shape) + clip_ste(weight)  # exact codeword values
        if not self.training:
            return out
        self.memory.copy_(memory)
        self.step.add_(1)
        if self.refine_every and int(self.step) % self.refine_every == 0:
            selected = self.patterns.index_select(0, idx).reshape(weight.shape)
            out = out + (selected - selected.detach())
            self.compensate_patterns()
        elif not self.zero_grad_set_to_none and self.refine_every and int(self.step) > self.refine_every:
            out = out + self.patterns.sum() * 0.0  # torch-1.4 zero_grad: a zero gradient, not None
        return out

    @torch.no_grad()
    def compensate_patterns(self) -> None:
        """`check_conpensate_patterns`: drop duplicate sign codewords, append random new ones, clamp."""
        patterns = self.patterns.detach()
        ids = codeword_ids(patterns).tolist()
        if len(set(ids)) < len(ids):
            keep, seen = [], set()
            for row, i in enumerate(ids):
                if i not in seen:
                    seen.add(i)
                    keep.append(row)
            rows = [patterns[keep]]
            table = codebook(patterns.dtype, patterns.device)
            for i in self._random().sample(list(range(N_CODEWORDS)), 2 ** self.bit_num):
                if len(keep) + len(rows) - 1 == len(ids):
                    break
                if i not in seen:
                    rows.append(table[i:i + 1])
            patterns = torch.cat(rows)
        self.patterns.copy_(patterns.clamp(-3.0, 3.0))

    def codeword_ids(self) -> Tensor:
        """MSB-first ids of the current memory codewords (for export and seeding a Sparks layer)."""
        return codeword_ids(self.current_memory())


class FixedSubset(nn.Module):
    """A fixed sub-codebook U[ids] (the `random` and `freq` variants of the mini reproduction, spec i)."""

    def __init__(self, n: int, ids: Tensor | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if ids is None:
            ids = torch.randperm(N_CODEWORDS, generator=generator)[:n]
        self.register_buffer("selected_ids", ids.long().clone())

    def forward(self) -> Tensor:
        return codebook(torch.float32, self.selected_ids.device)[self.selected_ids]


# --------------------------------------------------------------------------------------- the conv
class HardBinaryConv(nn.Module):
    """Binary 3x3 conv, W_bin = alpha * B with B from the chosen quantizer (b.7, b.10, b.11 step 1).

    quantizer: `real` (step 1: real weights), `bnn` (nearest of all 512 codewords = sign, ties to -1),
    `fixed` (a fixed sub-codebook), `snn` (the SNN baseline), `sparks` (PSTE selection).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, quantizer: str = "bnn", tau: int = 5,
                 **kwargs) -> None:
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if not 0 <= tau <= 9:
            raise ValueError(f"tau (bits per kernel) must be in 0..9, got {tau}")
        self.in_chs, self.out_chs, self.stride, self.quantizer, self.tau = in_chs, out_chs, stride, quantizer, tau
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs, 3, 3))
        if quantizer == "real":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's init (official step 1)
        else:
            with torch.no_grad():
                self.weight.copy_(torch.rand(self.weight.shape) * 0.001)  # official step 2 init
        if quantizer == "snn":
            self.binarize = SNNBinarize(tau, **kwargs)
        elif quantizer == "sparks":
            self.selector = PermutationSelector(2 ** tau, **kwargs)
        elif quantizer == "fixed":
            self.binarize = FixedSubset(2 ** tau, **kwargs)
        elif kwargs:
            raise ValueError(f"quantizer {quantizer!r} takes no options, got {sorted(kwargs)}")

    def sub_codebook(self) -> Tensor | None:
        """C [n, 9] of the layer (None for real / bnn)."""
        if self.quantizer == "sparks":
            return self.selector()
        if self.quantizer == "fixed":
            return self.binarize()
        return None

    def binary_weight(self) -> Tensor:
        """alpha * B (b.7.4); for `real`, the weight itself."""
        w = self.weight
        if self.quantizer == "real":
            return w
        if self.quantizer == "bnn":
            binary = torch.where(w.detach() > 0, 1.0, -1.0).to(w.dtype) + clip_ste(w)
        elif self.quantizer == "snn":
            binary = self.binarize(w)
        else:
            binary, _ = quantize_to_codebook(w, self.sub_codebook())
        return channel_scale(w) * binary

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "meta":  # shape-only passes (accounting): no values to quantize
            return F.conv2d(x, self.weight, stride=self.stride, padding=1)
        return F.conv2d(x, self.binary_weight(), stride=self.stride, padding=1)

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """Deployable layer (b.9): codeword ids [n], tau-bit index map [C_out, C_in], alpha [C_out]."""
        if self.quantizer in ("real",):
            raise ValueError("a real-valued (step-1) conv has no binary export")
        w = self.weight
        if self.quantizer == "bnn":
            ids = torch.arange(N_CODEWORDS, device=w.device)
            words = codebook(w.dtype, w.device)
        elif self.quantizer == "snn":
            words = self.binarize.current_memory().to(w.dtype)
            ids = codeword_ids(words)
        else:
            was = self.training
            self.eval()
            words = self.sub_codebook().to(w.dtype)
            self.train(was)
            ids = codeword_ids(words)
        index = nearest_codeword(w.reshape(-1, KERNEL_NUMEL), words).reshape(w.shape[:2])
        dtype = torch.uint8 if ids.numel() <= 256 else torch.int16
        return {"ids": ids.long(), "index_map": index.to(dtype), "alpha": channel_scale(w).flatten(),
                "stride": torch.tensor(self.stride)}


def exported_weight(layer: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """W_bin = alpha * U[ids][index_map] from an export (b.9)."""
    words = codebook(dtype, layer["alpha"].device)[layer["ids"]]
    out_chs, in_chs = layer["index_map"].shape
    binary = words[layer["index_map"].long().flatten()].reshape(out_chs, in_chs, 3, 3)
    return layer["alpha"].to(dtype).reshape(-1, 1, 1, 1) * binary


class ExportedBinaryConv(nn.Module):
    """Inference conv from an export (ids, index map, alpha): the deployable form of `HardBinaryConv`."""

    def __init__(self, layer: dict[str, Tensor]) -> None:
        super().__init__()
        self.stride = int(layer["stride"])
        self.register_buffer("ids", layer["ids"].clone())
        self.register_buffer("index_map", layer["index_map"].clone())
        self.register_buffer("alpha", layer["alpha"].clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = exported_weight({"ids": self.ids, "index_map": self.index_map, "alpha": self.alpha}, x.dtype)
        return F.conv2d(x, weight, stride=self.stride, padding=1)
