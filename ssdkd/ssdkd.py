"""SSD-KD's own parts (spec b.7): the modulating function phi, the dynamic replay buffer, priority sampling delta
and the SSD-KD epoch. Torch-only; copy it together with `datafree.py` (the inherited machinery).

SSD-KD has no released code: every formula here is the spec's reconstruction [RECON], each part behind a switch
(`SSDKDConfig`), the alternatives of spec k.1-k.3 behind named options.

* phi (b.7(ii)): phi = phi_div * phi_dif, phi_div = 1 - n_c(x) / |R| over R = buffer + candidates (c = teacher
  arg-max), phi_dif = (1 - p_T(y|x))^gamma; `use_div` / `use_dif` switch each factor to 1; used to re-weight the
  per-sample inversion terms (`phi_in_inversion`), to order admission and eviction (`phi_for_buffer`) and,
  optionally, to scale the priority (`phi_in_priority`).
* `ReplayBuffer` (b.7(iii)): capacity rho |D_train|; while not full everything is admitted, afterwards at most
  `replace_per_call` candidates (best phi first) replace the lowest-phi entries (ties: oldest first). Images,
  targets, cached teacher logits, priorities, discrepancies and insertion steps live in one tensor store indexed
  by the same slot, so they can never drift apart. `quantize_uint8` reproduces Fast's PNG round-trip.
* Priority sampling delta (b.7(iv)), prioritised experience replay (Schaul et al. 2016, proportional): q = (d+eps)^a,
  P = q / sum q, drawn with replacement, IS weights (N P)^-beta normalised by the buffer-wide maximum, beta annealed
  beta0 -> 1 over the KD steps, priorities refreshed from each step's per-sample KL; new entries get max q.
  `use_priority = False` gives uniform draws with w = 1 (the "without delta" ablation).
* `SSDKD` (b.7(vi)): synthesis (while fewer than `max_generated` were made) -> buffer admission; after warm-up,
  `kd_steps_per_epoch` prioritised KD steps, then the scheduler step. `state_dict()` restores buffer,
  priorities, generator, meta-Adam and BN history exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .datafree import DataFreeKD, FastMetaSynthesizer, StageTimer, kd_train_step, quantize_uint8

DIV_FORMS = ("complement", "balanced_ratio")


# ------------------------------------------------------------------------------------ (ii) phi
def modulating_function(t_logits: Tensor, targets: Tensor | None, reference_classes: Tensor, num_classes: int,
                        gamma: float = 2.0, use_div: bool = True, use_dif: bool = True,
                        div_form: str = "complement") -> Tensor:
    """phi(x) = phi_div(x) * phi_dif(x) in [0, 1] for a batch (spec b.7(ii), detached).

    `reference_classes`: teacher arg-max class of every member of R (buffer + candidates). `targets` None -> the
    teacher's arg-max stands in. `div_form="balanced_ratio"` is spec k.1's alternative min(1, |R| / (C n_c))."""
    if div_form not in DIV_FORMS:
        raise ValueError(f"div_form must be one of {DIV_FORMS}, got {div_form!r}")
    t_logits = t_logits.detach().float()
    pred = t_logits.argmax(dim=1)
    phi = torch.ones(t_logits.shape[0], device=t_logits.device)
    if use_div:
        counts = torch.bincount(reference_classes.to(pred.device), minlength=num_classes).float()
        size = float(reference_classes.numel())
        n = counts[pred]
        phi = phi * ((1.0 - n / size) if div_form == "complement" else (size / (num_classes * n)).clamp(max=1.0))
    if use_dif:
        y = pred if targets is None else targets.to(pred.device)
        p_y = F.softmax(t_logits, dim=1).gather(1, y[:, None]).squeeze(1)
        phi = phi * (1.0 - p_y).clamp(min=0.0) ** gamma
    return phi


# ------------------------------------------------------------------------- (iii)+(iv) replay buffer
class ReplayBuffer:
    """The dynamic replay buffer with prioritised sampling (spec b.7(iii)-(iv)); one store, one slot per entry."""

    def __init__(self, capacity: int, num_classes: int, image_shape: tuple[int, ...], *, replace_per_call: int = 128,
                 quantize: bool = False, alpha: float = 0.6, epsilon: float = 1e-6, use_priority: bool = True,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if replace_per_call < 0:
            raise ValueError(f"replace_per_call must be >= 0, got {replace_per_call}")
        self.capacity, self.num_classes, self.replace_per_call = capacity, num_classes, replace_per_call
        self.quantize, self.alpha, self.epsilon, self.use_priority = quantize, alpha, epsilon, use_priority
        dev = torch.device(device)
        self.images = torch.zeros(capacity, *image_shape, dtype=torch.uint8 if quantize else torch.float32, device=dev)
        self.targets = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.teacher_logits = torch.zeros(capacity, num_classes, device=dev)
        self.priority = torch.zeros(capacity, device=dev)
        self.discrepancy = torch.zeros(capacity, device=dev)
        self.inserted = torch.zeros(capacity, dtype=torch.long, device=dev)  # admission call number
        self.size = 0
        self.calls = 0

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.images.device

    # ---- phi over R = buffer + candidates
    def phi(self, t_logits: Tensor, targets: Tensor | None, cand_logits: Tensor | None = None, **phi_kw: Any) -> Tensor:
        """phi of the given samples with R = the current buffer plus `cand_logits` (the candidate batch)."""
        ref = [self.teacher_logits[:self.size].argmax(1)]
        if cand_logits is not None:
            ref.append(cand_logits.detach().to(self.device).argmax(1))
        return modulating_function(t_logits.to(self.device), targets, torch.cat(ref), self.num_classes, **phi_kw)

    def phi_fn(self, **phi_kw: Any):
        """A `sample_weight_fn` for the synthesizer: phi of the current inner iterate against buffer + itself."""
        def fn(t_logits: Tensor, targets: Tensor) -> Tensor:
            return self.phi(t_logits, targets, cand_logits=t_logits, **phi_kw).to(t_logits.device)
        return fn

    # ---- admission
    def admit(self, images: Tensor, targets: Tensor, t_logits: Tensor, order_by_phi: bool = True,
              **phi_kw: Any) -> int:
        """Admit a candidate batch (spec b.7(iii)); returns how many existing entries were replaced.

        Free slots take candidates first (best phi first when `order_by_phi`, else in order); once full, the best
        min(k, #left) candidates replace the lowest-phi entries (recomputed with the current R; ties: oldest), or
        the oldest entries (FIFO) without `order_by_phi`. New entries get the current maximum priority."""
        self.calls += 1
        images, targets, t_logits = images.detach().to(self.device), targets.to(self.device), t_logits.detach().to(
            self.device)
        if order_by_phi:
            cand_phi = self.phi(t_logits, targets, cand_logits=t_logits, **phi_kw)
            order = torch.argsort(cand_phi, descending=True, stable=True)
        else:
            cand_phi = None
            order = torch.arange(images.shape[0], device=self.device)
        free = self.capacity - self.size
        n_fill = min(free, order.numel())
        if n_fill:
            self._write(torch.arange(self.size, self.size + n_fill, device=self.device), order[:n_fill],
                        images, targets, t_logits)
            self.size += n_fill
        left = order[n_fill:]
        k = min(self.replace_per_call, left.numel(), self.size)
        if k == 0:
            return 0
        if order_by_phi:
            buf_phi = self.phi(self.teacher_logits[:self.size], self.targets[:self.size], cand_logits=t_logits,
                               **phi_kw)
            # lowest phi first, ties by age (older = smaller insertion call): lexicographic via a stable double sort
            by_age = torch.argsort(self.inserted[:self.size], stable=True)
            victims = by_age[torch.argsort(buf_phi[by_age], stable=True)[:k]]
        else:
            victims = torch.argsort(self.inserted[:self.size], stable=True)[:k]
        self._write(victims, left[:k], images, targets, t_logits)
        return k

    def _write(self, slots: Tensor, src: Tensor, images: Tensor, targets: Tensor, t_logits: Tensor) -> None:
        max_q = self.priority[:self.size].max() if self.size else torch.ones((), device=self.device)
        max_q = torch.where(max_q > 0, max_q, torch.ones_like(max_q))
        self.images[slots] = quantize_uint8(images[src]) if self.quantize else images[src].float()
        self.targets[slots] = targets[src]
        self.teacher_logits[slots] = t_logits[src].float()
        self.priority[slots] = max_q
        self.discrepancy[slots] = 0.0
        self.inserted[slots] = self.calls

    def get(self, idx: Tensor) -> Tensor:
        """[0, 1] float images of the given slots."""
        x = self.images[idx]
        return x.float() / 255.0 if self.quantize else x

    # ---- delta: prioritised sampling
    def probabilities(self) -> Tensor:
        """P(i) over the filled slots (uniform without `use_priority`)."""
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer")
        if not self.use_priority:
            return torch.full((self.size,), 1.0 / self.size, device=self.device)
        q = self.priority[:self.size]
        return q / q.sum()

    def importance_weights(self, idx: Tensor, beta: float) -> Tensor:
        """w_i = (N P(i))^-beta / max_j (N P(j))^-beta, the maximum over the whole buffer; w = 1 without priority."""
        if not self.use_priority:
            return torch.ones(idx.numel(), device=self.device)
        p = self.probabilities()
        w = (self.size * p[idx]) ** (-beta)
        return w / (self.size * p.min()) ** (-beta)

    def sample(self, batch_size: int, beta: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(slots, IS weights): b draws with replacement from P."""
        if self.use_priority:
            idx = torch.multinomial(self.probabilities(), batch_size, replacement=True, generator=generator)
        else:
            idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        return idx, self.importance_weights(idx, beta)

    def update_priority(self, idx: Tensor, discrepancy: Tensor) -> None:
        """d_i <- the step's per-sample discrepancy (mean over repeated draws), q_i <- (d_i + eps)^alpha."""
        idx, d = idx.to(self.device), discrepancy.detach().float().to(self.device)
        self.discrepancy.scatter_reduce_(0, idx, d, reduce="mean", include_self=False)
        self.priority[idx] = (self.discrepancy[idx] + self.epsilon) ** self.alpha

    # ---- exact resume
    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "targets": self.targets, "teacher_logits": self.teacher_logits,
                "priority": self.priority, "discrepancy": self.discrepancy, "inserted": self.inserted,
                "size": self.size, "calls": self.calls, "capacity": self.capacity, "quantize": self.quantize}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity or bool(state["quantize"]) != self.quantize:
            raise ValueError(f"buffer state has capacity {state['capacity']} / quantize {state['quantize']}, "
                             f"this buffer {self.capacity} / {self.quantize}")
        for key in ("images", "targets", "teacher_logits", "priority", "discrepancy", "inserted"):
            getattr(self, key).copy_(state[key])
        self.size, self.calls = int(state["size"]), int(state["calls"])


def beta_schedule(step: int, total_steps: int, beta0: float = 0.4, beta_end: float = 1.0) -> float:
    """beta annealed linearly from beta0 to beta_end over the KD steps (PER)."""
    return beta0 + (beta_end - beta0) * min(1.0, step / max(total_steps, 1))


# ------------------------------------------------------------------------------------ (vi) the epoch
@dataclass
class SSDKDConfig:
    """SSD-KD's switches and values (spec b.7, d.2); every [RECON] choice is one field."""

    epochs: int = 220
    warmup: int = 20
    kd_steps_per_epoch: int = 100
    batch_size: int = 256
    temperature: float = 20.0
    max_generated: int | None = None  # None: synthesise every epoch (buffer capacity is the data scale)
    phi_in_inversion: bool = True
    phi_for_buffer: bool = True
    phi_in_priority: bool = False
    use_div: bool = True
    use_dif: bool = True
    gamma: float = 2.0
    div_form: str = "complement"
    use_priority: bool = True
    alpha: float = 0.6
    epsilon: float = 1e-6
    beta0: float = 0.4
    beta_end: float = 1.0

    def phi_kwargs(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "use_div": self.use_div, "use_dif": self.use_dif, "div_form": self.div_form}

    @property
    def phi_active(self) -> bool:
        return self.use_div or self.use_dif


class SSDKD(DataFreeKD):
    """One SSD-KD epoch (spec b.7(vi)) on the shared `DataFreeKD` harness: the store is the `ReplayBuffer`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, synthesizer: FastMetaSynthesizer, buffer: ReplayBuffer,
                 optimizer: torch.optim.Optimizer, scheduler: Any, augment: nn.Module, cfg: SSDKDConfig,
                 timer: StageTimer | None = None):
        super().__init__(teacher, student, synthesizer, buffer, optimizer, scheduler, augment,  # type: ignore[arg-type]
                         warmup=cfg.warmup, kd_steps=cfg.kd_steps_per_epoch, batch_size=cfg.batch_size,
                         temperature=cfg.temperature, timer=timer)
        if buffer.use_priority != cfg.use_priority:
            raise ValueError("buffer.use_priority and cfg.use_priority disagree")
        self.cfg, self.buffer = cfg, buffer

    @property
    def total_kd_steps(self) -> int:
        return max(self.cfg.epochs - self.cfg.warmup, 0) * self.cfg.kd_steps_per_epoch

    def synthesis_round(self) -> None:
        cfg = self.cfg
        if cfg.max_generated is not None and self.n_generated >= cfg.max_generated:
            return
        weight_fn = self.buffer.phi_fn(**cfg.phi_kwargs()) if cfg.phi_in_inversion and cfg.phi_active else None
        with self.timer.stage("synthesis"):
            out = self.synthesizer.synthesize(sample_weight_fn=weight_fn)
        self.buffer.admit(out.images, out.targets, out.teacher_logits,
                          order_by_phi=cfg.phi_for_buffer and cfg.phi_active, **cfg.phi_kwargs())
        self.n_generated += out.images.shape[0]

    def kd_round(self) -> float:
        cfg, buf = self.cfg, self.buffer
        total: Tensor | None = None
        for _ in range(cfg.kd_steps_per_epoch):
            beta = beta_schedule(self.kd_step_count, self.total_kd_steps, cfg.beta0, cfg.beta_end)
            idx, w = buf.sample(cfg.batch_size, beta)
            loss, per = kd_train_step(self.student, self.teacher, buf.get(idx), self.augment, self.optimizer,
                                      cfg.temperature, weights=w if cfg.use_priority else None)
            d = per / cfg.temperature ** 2  # KL(p_T^tau || p_S^tau) per sample
            if cfg.phi_in_priority and cfg.phi_active:
                d = d * buf.phi(buf.teacher_logits[idx], buf.targets[idx], **cfg.phi_kwargs())
            buf.update_priority(idx, d)
            total = loss if total is None else total + loss
            self.kd_step_count += 1
        return float(total) / cfg.kd_steps_per_epoch if total is not None else 0.0

    def run_epoch(self) -> dict[str, float]:
        metrics = super().run_epoch()
        metrics["buffer_size"] = float(len(self.buffer))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["config"] = asdict(self.cfg)
        return state
