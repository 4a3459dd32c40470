"""The data-free KD machinery SSD-KD inherits from Fast-DFKD and DeepInversion (SSD-KD spec b.2-b.6, b.9).

Torch-only and device-agnostic; copy this one file to reuse it. Pieces, each named after the spec:

* `Generator` (b.2): Fast's 32x32 DCGAN-style generator at any nz / ngf / image size / channels.
* `Normalizer`, `random_crop_flip`, `InversionAugment` (b.3): per-sample differentiable crop (zero padding)
  and flip in plain tensor ops (Fast uses kornia), then (x - mean) / std.
* `BNStatisticsLoss` (b.4): DeepInversion's feature-statistics loss on every BatchNorm2d input with Fast's
  momentum variant; `one_hot_ce`, `adversarial_kl` (masked, "decision adversarial"), `kd_loss` (b.6, tau^2),
  `js_divergence` and `tv_prior_l1` (DeepInversion, d.5), `class_balance_loss`.
* `FastMetaSynthesizer` (b.5): one meta-synthesis call: fresh z and targets, a cloned generator optimised for
  g_steps, FOMAML (summed first-order gradients) or REPTILE (67 x (theta_meta - theta_fast)) meta step with a
  persistent meta Adam, warm-up gate on the adversarial term, `reset_l0`, lowest-loss iterate.
* `DeepInversionSynthesizer` (d.5): pixel-space inversion (final iterate by default, as the released code
  does by aliasing; `true_best=True` keeps a cloned best).
* `ImagePool` (b.6): Fast's ever-growing pool, uint8-quantised like its PNG round-trip, shuffled passes.
* `kd_train_step` (b.6): one student step on (augmented) synthetic images against the frozen teacher.

Fixed defects of the released code (spec j, b.9): no `.cuda()`, no kornia, DeepInversion with `adv = 0` no
longer reads `loss_oh` before assigning it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Fast-Datafree `registry.py::NORMALIZE_DICT` (spec b.3)
NORMALIZE_DICT: dict[str, dict[str, tuple[float, ...]]] = {
    "mnist": {"mean": (0.1307,), "std": (0.3081,)},
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)},
    "cifar100": {"mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "nyuv2": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


# ------------------------------------------------------------------------------------ b.2 generator
class Generator(nn.Module):
    """Fast's generator (spec b.2): Linear(nz -> 2ngf (s/4)^2), BN, up x2, conv-BN-LReLU, up x2, conv-BN-LReLU,
    conv -> Sigmoid. Key names `l1.0`, `conv_blocks.{0,2,3,6,7,9}` as in the official module."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"generator img_size must be a multiple of 4, got {img_size}")
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, img_size, nc
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def clone(self) -> Generator:
        """A deep copy on the same device (the released `clone()` hard-codes `.cuda()`)."""
        return copy.deepcopy(self)


def reset_l0(generator: Generator) -> None:
    """Fast meta `reset_l0` (spec b.5 step 5): N(0, 0.02) weights, zero biases for `l1.0` *and* `conv_blocks.0`."""
    for module in (generator.l1[0], generator.conv_blocks[0]):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


# ------------------------------------------------------------------------------- b.3 augmentation
class Normalizer(nn.Module):
    """(x - mean) / std per channel; `reverse=True` undoes it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"normaliser mean has {len(mean)} channels, std {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        return x * self.std + self.mean if reverse else (x - self.mean) / self.std

    def clamp_normalized(self, x: Tensor) -> Tensor:
        """Clamp normalised pixels to the image of [0, 1] (DeepInversion's `clip_images`)."""
        return torch.maximum(torch.minimum(x, (1 - self.mean) / self.std), -self.mean / self.std)


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of the input size after zero `padding`, then per-sample horizontal flip (p=0.5).

    Differentiable (index gather), no Python loop over samples; replaces kornia's RandomCrop/RandomHorizontalFlip.
    """
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (b, h, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (b, 1, w)
        x = xp[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class InversionAugment(nn.Module):
    """What the teacher/student see of a [0,1] image (spec b.3): crop(pad 4) + flip when `enabled`, then normalise.

    The KD step uses the same transform (Fast's CIFAR training transform, spec b.6). `padding` / `flip` follow the
    teacher's own training transform (grey digits: pad 2, no flip); a 1-channel image is repeated to `channels`
    after normalising (grey generator, RGB-stem teacher trained on grey repeated to 3 channels)."""

    def __init__(self, normalizer: Normalizer, enabled: bool = True, padding: int = 4, flip: bool = True,
                 channels: int | None = None):
        super().__init__()
        self.normalizer = normalizer
        self.enabled = enabled
        self.padding = padding
        self.flip = flip
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled:
            x = random_crop_flip(x, self.padding, self.flip)
        x = self.normalizer(x)
        if self.channels is not None and x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return x


# ---------------------------------------------------------------------------------- b.4 losses
class BNStatisticsHook:
    """DeepInversion hook on one BatchNorm2d (spec b.4): unsquared L2 distances between its running statistics
    and the batch mean / biased variance of its *input*, blended with a detached history when `momentum` > 0."""

    def __init__(self, module: nn.BatchNorm2d, momentum: float):
        self.module = module
        self.momentum = momentum
        self.history: tuple[Tensor, Tensor] | None = None  # (mean, var), detached
        self.r_feature: Tensor | None = None
        self.batch_stats: tuple[Tensor, Tensor] | None = None
        self.active = False
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.active:
            return
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        if self.history is None:
            r = torch.norm(module.running_var.detach() - var, 2) + torch.norm(module.running_mean.detach() - mean, 2)
        else:
            m = self.momentum
            hmean, hvar = self.history
            r = (torch.norm(module.running_var.detach() - (1 - m) * var - m * hvar, 2)
                 + torch.norm(module.running_mean.detach() - (1 - m) * mean - m * hmean, 2))
        self.r_feature = r
        self.batch_stats = (mean, var)

    def update_history(self) -> None:
        """First call: history <- last batch statistics; afterwards history <- m*history + (1-m)*last."""
        if self.batch_stats is None:
            raise RuntimeError("BN history update before any hooked forward")
        mean, var = (t.detach() for t in self.batch_stats)
        if self.history is None:
            self.history = (mean.clone(), var.clone())
        else:
            m = self.momentum
            self.history = (m * self.history[0] + (1 - m) * mean, m * self.history[1] + (1 - m) * var)

    def remove(self) -> None:
        self._handle.remove()


class BNStatisticsLoss:
    """L_bn over every BatchNorm2d of `model`, in module order (spec b.4). Hooks only compute inside `capture()`,
    so KD-stage or evaluation forwards neither pay for nor disturb the statistics the history update reads."""

    def __init__(self, model: nn.Module, momentum: float = 0.0):
        self.momentum = momentum
        self.hooks = [BNStatisticsHook(m, momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the BN-statistics loss needs a model with at least one BatchNorm2d layer")

    @contextmanager
    def capture(self) -> Iterator[BNStatisticsLoss]:
        for h in self.hooks:
            h.active = True
        try:
            yield self
        finally:
            for h in self.hooks:
                h.active = False

    def per_layer(self) -> Tensor:
        """The per-layer terms of the last captured forward, shape (num_bn_layers,)."""
        return torch.stack([h.r_feature for h in self.hooks])

    def loss(self) -> Tensor:
        """L_bn = sum over layers (every layer weighted 1)."""
        return sum(h.r_feature for h in self.hooks)  # type: ignore[return-value]

    def update_history(self) -> None:
        for h in self.hooks:
            h.update_history()

    def state_dict(self) -> dict[str, Any]:
        has = [h.history is not None for h in self.hooks]
        if any(has) and not all(has):
            raise RuntimeError("BN history exists for some layers only")
        if not any(has):
            return {"mean": [], "var": []}
        return {"mean": [h.history[0] for h in self.hooks], "var": [h.history[1] for h in self.hooks]}  # type: ignore[index]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        means, vars_ = list(state["mean"]), list(state["var"])
        if not means:
            for h in self.hooks:
                h.history = None
            return
        if len(means) != len(self.hooks) or len(vars_) != len(self.hooks):
            raise ValueError(f"BN history has {len(means)} layers, the model {len(self.hooks)}")
        for h, m, v in zip(self.hooks, means, vars_):
            if m.shape != h.module.running_mean.shape:
                raise ValueError(f"BN history shape {tuple(m.shape)} != layer {tuple(h.module.running_mean.shape)}")
            dev = h.module.running_mean.device
            h.history = (m.detach().to(dev).clone(), v.detach().to(dev).clone())

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def image_level_logits(logits: Tensor) -> Tensor:
    """Image-level class scores of a segmentation output (B, C, H, W): the log of the spatial mean of the per-pixel
    softmax, so softmax of it is the mean per-pixel confidence and its arg-max the dominant class (spec d.3 reading
    [RECON], used for L_oh, phi and the buffer's cached logits). (B, C) logits pass unchanged."""
    if logits.dim() == 2:
        return logits
    return F.softmax(logits.float(), dim=1).flatten(2).mean(dim=2).clamp_min(1e-12).log()


def _per_sample(values: Tensor) -> Tensor:
    """(B,) unchanged; a per-pixel map (B, H, W) -> its mean over pixels (segmentation, spec d.3 reading)."""
    return values if values.dim() == 1 else values.flatten(1).mean(dim=1)


def one_hot_ce(t_logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """L_oh = CE(T(x_aug), y) (spec b.4); a segmentation output is scored by its image-level logits."""
    if t_logits.dim() > 2:
        return F.nll_loss(image_level_logits(t_logits), targets, reduction=reduction)
    return F.cross_entropy(t_logits, targets, reduction=reduction)


def kl_map(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_T^tau || p_S^tau) over the class dim 1 (no tau^2): (B,) for classifiers, (B, H, W) per pixel."""
    return F.kl_div(F.log_softmax(s_logits / temperature, dim=1), F.softmax(t_logits / temperature, dim=1),
                    reduction="none").sum(dim=1)


def kl_per_sample(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_T^tau || p_S^tau) per sample (no tau^2); per-pixel KL averaged over pixels for segmentation."""
    return _per_sample(kl_map(s_logits, t_logits, temperature))


def adversarial_kl(s_logits: Tensor, t_logits: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Masked adversarial term (spec b.4): -m_i KL(p_T || p_S) at T=1, m_i = 1[argmax S = argmax T] (no gradient
    through the mask; gradient through both logits). Returns (loss, mask); `reduction="none"` gives per-sample.
    Segmentation (spec d.3 reading): the mask and KL are per pixel, averaged over pixels per sample."""
    mask = (s_logits.argmax(1) == t_logits.argmax(1)).to(s_logits.dtype)
    per = _per_sample(-kl_map(s_logits, t_logits) * mask)
    return (per.mean() if reduction == "mean" else per), mask


def kd_loss(s_logits: Tensor, t_logits: Tensor, temperature: float = 20.0, reduction: str = "batchmean") -> Tensor:
    """tau^2 KL(p_T^tau || p_S^tau), batch-mean ("batchmean") or per sample ("none") (spec b.6); segmentation:
    per-pixel KL at the same tau averaged over pixels (spec d.3 reading)."""
    if reduction == "batchmean" and s_logits.dim() > 2:
        return kl_per_sample(s_logits, t_logits, temperature).mean() * temperature ** 2
    if reduction == "batchmean":
        q = F.log_softmax(s_logits / temperature, dim=1)
        p = F.softmax(t_logits / temperature, dim=1)
        return F.kl_div(q, p, reduction="batchmean") * temperature ** 2
    if reduction == "none":
        return kl_per_sample(s_logits, t_logits, temperature) * temperature ** 2
    raise ValueError(f"kd_loss reduction must be 'batchmean' or 'none', got {reduction!r}")


def js_divergence(s_logits: Tensor, t_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """DeepInversion's competition term (spec d.5): JS between softened outputs with probabilities clamped to
    [0.01, 0.99] (the released `jsdiv`; may be slightly negative for many classes)."""
    p = F.softmax(s_logits / temperature, dim=1)
    q = F.softmax(t_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


def tv_prior_l1(x: Tensor) -> Tensor:
    """Total-variation prior: mean absolute differences in four directions (DeepInversion's `loss_var_l1`)."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.abs().mean() + d2.abs().mean() + d3.abs().mean() + d4.abs().mean()


def class_balance_loss(logits: Tensor) -> Tensor:
    """DAFL/DFQ class-balance term: sum_c pbar_c log pbar_c of the batch-mean softmax."""
    p = F.softmax(logits, dim=1).mean(dim=0)
    return (p * p.log()).sum()


# --------------------------------------------------------------------------- b.5 meta-synthesis
@dataclass
class SynthesisOutput:
    """One synthesis call: the kept [0,1] images, their targets, the teacher logits of the kept iterate (on
    the view the teacher saw), the kept total loss and the final latent."""

    images: Tensor
    targets: Tensor
    teacher_logits: Tensor
    loss: Tensor
    latent: Tensor | None = None


SampleWeightFn = Callable[[Tensor, Tensor], Tensor]
"""(teacher_logits (detached), targets) -> per-sample weights (B,) for the CE and adversarial terms."""


class FastMetaSynthesizer:
    """Fast-DFKD meta-synthesis (spec b.5); one `synthesize()` per epoch ("Fast-k": g_steps = k).

    The meta generator is only cloned, never run, so its BN running statistics never change; the meta Adam
    (lr = lr_g * g_steps, betas (0.5, 0.999)) and the BN-statistics history persist across calls and are part
    of `state_dict()`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: Generator, *, num_classes: int,
                 batch_size: int = 256, g_steps: int = 2, lr_g: float = 5e-3, lr_z: float = 0.015,
                 adv: float = 1.1, bn: float = 10.0, oh: float = 0.4, bn_mmt: float = 0.9, is_maml: bool = True,
                 warmup: int = 20, reset_l0: bool = True, augment: InversionAugment | None = None,
                 meta_lr: float | None = None, reptile_scale: float = 67.0):
        if g_steps < 1:
            raise ValueError(f"g_steps must be >= 1, got {g_steps}")
        self.teacher, self.student, self.generator = teacher, student, generator
        self.num_classes, self.batch_size, self.g_steps = num_classes, batch_size, g_steps
        self.lr_g, self.lr_z = lr_g, lr_z
        self.adv, self.bn, self.oh = adv, bn, oh
        self.is_maml, self.warmup, self.reset_l0 = bool(is_maml), warmup, bool(reset_l0)
        self.augment = augment if augment is not None else InversionAugment(Normalizer(**NORMALIZE_DICT["cifar10"]))
        self.reptile_scale = reptile_scale
        self.meta_lr = lr_g * g_steps if meta_lr is None else meta_lr
        self.meta_optimizer = torch.optim.Adam(generator.parameters(), self.meta_lr, betas=(0.5, 0.999))
        self.bn_loss = BNStatisticsLoss(teacher, bn_mmt)
        self.bn_mmt = bn_mmt
        self.calls = 0  # synthesis calls made so far (Fast's `ep`)

    def adversarial_active(self, call: int) -> bool:
        """The warm-up gate: the adversarial term acts from call number `warmup` on (calls counted from 1)."""
        return self.adv > 0 and call >= self.warmup

    def synthesize(self, z: Tensor | None = None, targets: Tensor | None = None,
                   sample_weight_fn: SampleWeightFn | None = None) -> SynthesisOutput:
        """One call (spec b.5 steps 1-6). `z`/`targets` default to fresh N(0, I) / Uniform{0..C-1} draws (in that
        order); `sample_weight_fn` re-weights the per-sample CE and adversarial terms (SSD-KD's phi)."""
        self.calls += 1
        call = self.calls
        student_mode = self.student.training
        self.student.eval()
        self.teacher.eval()
        device = next(self.generator.parameters()).device
        if self.reset_l0 and call == 120 + self.warmup:
            reset_l0(self.generator)
        z = (torch.randn(self.batch_size, self.generator.nz, device=device) if z is None
             else z.detach().clone().to(device)).requires_grad_(True)
        if targets is None:
            targets = torch.randint(0, self.num_classes, (z.shape[0],))
        targets = targets.to(device)
        fast = self.generator.clone().train()
        optimizer = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.lr_z}],
                                     lr=self.lr_g, betas=(0.5, 0.999))
        adversarial = self.adversarial_active(call)
        best_loss = torch.full((), math.inf, device=device)
        best_images = best_logits = None
        meta_params, fast_params = list(self.generator.parameters()), list(fast.parameters())
        for it in range(self.g_steps):
            images = fast(z)
            x_aug = self.augment(images)  # teacher and student see the same view
            with self.bn_loss.capture():
                t_out = self.teacher(x_aug)
            loss_bn = self.bn_loss.loss()
            t_img = image_level_logits(t_out.detach())  # = t_out for classifiers (segmentation: spec d.3 reading)
            if sample_weight_fn is None:  # Fast's batch-mean terms
                loss_oh = one_hot_ce(t_out, targets)
                loss_adv = adversarial_kl(self.student(x_aug), t_out)[0] if adversarial else t_out.new_zeros(())
                loss = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv
            else:  # SSD-KD b.7(ii): L_bn + (1/B) sum_i phi_i [oh CE_i + adv ADV_i]
                phi = sample_weight_fn(t_img, targets).detach()
                per = self.oh * one_hot_ce(t_out, targets, reduction="none")
                if adversarial:
                    per = per + self.adv * adversarial_kl(self.student(x_aug), t_out, reduction="none")[0]
                loss = self.bn * loss_bn + (phi * per).mean()
            with torch.no_grad():
                better = loss.detach() < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                best_images = images.detach() if best_images is None else torch.where(better, images.detach(),
                                                                                    best_images)
                best_logits = t_img if best_logits is None else torch.where(better, t_img, best_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.is_maml:  # FOMAML: meta gradient = sum of the fast gradients, taken before each inner step
                if it == 0:
                    self.meta_optimizer.zero_grad(set_to_none=True)
                for p, q in zip(meta_params, fast_params):
                    if q.grad is None:
                        continue
                    if p.grad is None:
                        p.grad = q.grad.detach().clone()
                    else:
                        p.grad.add_(q.grad)
                if it == self.g_steps - 1:
                    self.meta_optimizer.step()
            optimizer.step()
        if self.bn_mmt != 0:
            self.bn_loss.update_history()
        if not self.is_maml:  # REPTILE: grad = scale * (theta_meta - theta_fast)
            self.meta_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, q in zip(meta_params, fast_params):
                    p.grad = self.reptile_scale * (p.detach() - q.detach())
            self.meta_optimizer.step()
        self.student.train(student_mode)
        return SynthesisOutput(best_images, targets, best_logits, best_loss, z.detach())

    def state_dict(self) -> dict[str, Any]:
        """Meta generator, meta Adam, BN-statistics history and the call counter."""
        return {"generator": self.generator.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_history": self.bn_loss.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn_loss.load_state_dict(state["bn_history"])
        self.calls = int(state["calls"])


# ------------------------------------------------------------------------ d.5 DeepInversion baseline
class SynthesisStopped(RuntimeError):
    """A synthesis call cut short by its `should_stop` callback (nothing is added to the pool)."""


def jitter_and_flip(x: Tensor, lim: float = 1.0 / 8.0, flip: bool = True,
                    generator: torch.Generator | None = None) -> Tensor:
    """DeepInversion's augmentation: one random roll of up to +-lim of the size and one random flip per batch."""
    lh, lw = int(x.shape[-2] * lim), int(x.shape[-1] * lim)
    off = torch.randint(-lh, lh + 1, (1,), generator=generator).item(), torch.randint(-lw, lw + 1, (1,),
                                                                                      generator=generator).item()
    x = torch.roll(x, shifts=(int(off[0]), int(off[1])), dims=(2, 3))
    if flip and torch.rand((), generator=generator).item() > 0.5:
        x = torch.flip(x, dims=(3,))
    return x


class DeepInversionSynthesizer:
    """DeepInv-k (spec d.5 item 1): optimise B images in normalised pixel space from N(0, 1) with Adam(lr, betas
    (0.5, 0.99)) for `iterations` steps; loss = bn (L_bn(T) - 0.001 L_bn(S)) + oh CE + adv (-JS_T=3) + tv TV +
    l2 ||x||; pixels clamped after each step. Returns the *final* iterate, as the released code does through
    aliasing, unless `true_best` (a cloned lowest-loss iterate). The student BN term and the JS term need a
    student forward, which runs only when `adv > 0` (the released code crashes with adv = 0)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, normalizer: Normalizer, *, num_classes: int,
                 img_size: tuple[int, int, int] = (3, 32, 32), batch_size: int = 256, iterations: int = 2000,
                 lr: float = 0.1, adv: float = 1.0, bn: float = 10.0, oh: float = 1.0, tv: float = 0.0,
                 l2: float = 0.0, student_bn: float = 0.001, js_temperature: float = 3.0, true_best: bool = False,
                 flip: bool = True, channels: int | None = None):
        self.teacher, self.student, self.normalizer = teacher, student, normalizer
        self.num_classes, self.img_size = num_classes, img_size
        self.batch_size, self.iterations = batch_size, iterations
        self.lr, self.adv, self.bn, self.oh, self.tv, self.l2 = lr, adv, bn, oh, tv, l2
        self.student_bn, self.js_temperature, self.true_best = student_bn, js_temperature, true_best
        self.flip, self.channels = flip, channels  # no flip for digits; grey pixels repeated to the teacher's stem
        self.should_stop: Callable[[], bool] | None = None  # checked every iteration (a bench's time limit)
        self.t_bn = BNStatisticsLoss(teacher, 0.0)
        self.s_bn = BNStatisticsLoss(student, 0.0) if any(isinstance(m, nn.BatchNorm2d) for m in student.modules()) \
            else None
        self.calls = 0

    def synthesize(self, targets: Tensor | None = None) -> SynthesisOutput:
        self.calls += 1
        student_mode = self.student.training
        self.student.eval()
        self.teacher.eval()
        device = next(self.teacher.parameters()).device
        inputs = torch.randn(self.batch_size, *self.img_size, device=device).requires_grad_(True)
        if targets is None:
            targets = torch.randint(0, self.num_classes, (self.batch_size,)).sort()[0]
        targets = targets.to(device)
        optimizer = torch.optim.Adam([inputs], self.lr, betas=(0.5, 0.99))
        best_loss = torch.full((), math.inf, device=device)
        best = inputs.detach().clone()
        best_logits = None
        for _ in range(self.iterations):
            if self.should_stop is not None and self.should_stop():
                raise SynthesisStopped(f"DeepInversion stopped by its time limit in call {self.calls}")
            x = jitter_and_flip(inputs, flip=self.flip)
            if self.channels is not None and x.shape[1] == 1 and self.channels != 1:
                x = x.expand(-1, self.channels, -1, -1)
            use_student = self.adv > 0
            with self.t_bn.capture():
                t_out = self.teacher(x)
            loss_bn = self.t_bn.loss()
            loss_adv = t_out.new_zeros(())
            if use_student:
                if self.s_bn is not None:
                    with self.s_bn.capture():
                        s_out = self.student(x)
                    loss_bn = loss_bn - self.student_bn * self.s_bn.loss()
                else:
                    s_out = self.student(x)
                loss_adv = -js_divergence(s_out, t_out, self.js_temperature)
            loss = self.bn * loss_bn + self.oh * one_hot_ce(t_out, targets) + self.adv * loss_adv
            if self.tv:
                loss = loss + self.tv * tv_prior_l1(inputs)
            if self.l2:
                loss = loss + self.l2 * torch.norm(inputs, 2)
            with torch.no_grad():
                better = loss.detach() < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                if self.true_best:
                    best = torch.where(better, inputs.detach(), best)
                best_logits = t_out.detach() if best_logits is None else torch.where(better, t_out.detach(),
                                                                                   best_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                inputs.copy_(self.normalizer.clamp_normalized(inputs))
        final = best if self.true_best else inputs.detach()
        self.student.train(student_mode)
        images = self.normalizer(final, reverse=True).clamp(0, 1)
        return SynthesisOutput(images, targets, best_logits, best_loss)


# ------------------------------------------------------------------------------- b.6 data pool + KD
def quantize_uint8(x: Tensor) -> Tensor:
    """Fast's PNG round-trip: (x.clamp(0,1) * 255) truncated to uint8 (as `save_image_batch` does)."""
    return (x.detach().clamp(0, 1) * 255).to(torch.uint8)


class ImagePool:
    """Fast's ever-growing synthetic pool (spec b.6): each round's images are appended (uint8 when `quantize`,
    like its PNG files) and mini-batches are drawn by shuffled passes; every `add` starts a new pass (Fast
    rebuilds its DataLoader after each synthesis), and the last batch of a pass may be short (drop_last=False)."""

    def __init__(self, quantize: bool = True):
        self.quantize = quantize
        self.images: Tensor | None = None
        self._perm: Tensor | None = None
        self._pos = 0

    def __len__(self) -> int:
        return 0 if self.images is None else self.images.shape[0]

    def add(self, images: Tensor) -> None:
        new = quantize_uint8(images) if self.quantize else images.detach().clone()
        self.images = new if self.images is None else torch.cat([self.images, new.to(self.images.device)])
        self._perm = None

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, None]:
        """(indices, [0,1] float images, weights=None)."""
        if self.images is None:
            raise RuntimeError("sampling from an empty pool")
        n = len(self)
        if self._perm is None or self._pos >= n:
            self._perm = torch.randperm(n, generator=generator).to(self.images.device)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + batch_size]
        self._pos += batch_size
        return idx, self.get(idx), None

    def get(self, idx: Tensor) -> Tensor:
        x = self.images[idx]  # type: ignore[index]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "perm": self._perm, "pos": self._pos, "quantize": self.quantize}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self._perm, self._pos = state["images"], state["perm"], int(state["pos"])
        self.quantize = bool(state["quantize"])


def kd_train_step(student: nn.Module, teacher: nn.Module, images: Tensor, augment: nn.Module,
                  optimizer: torch.optim.Optimizer, temperature: float = 20.0,
                  weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One student step (spec b.6 / b.7(iv)): augment the [0,1] batch, teacher (eval, no grad) and student
    (train) forwards, L = tau^2 (1/b) sum_i w_i KL_i, SGD step. Returns (loss, per-sample tau^2 KL), detached."""
    student.train()
    teacher.eval()
    x = augment(images)
    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    if weights is None:
        loss = kd_loss(s_out, t_out, temperature)
        with torch.no_grad():
            per = kd_loss(s_out, t_out, temperature, reduction="none")
    else:
        per_g = kd_loss(s_out, t_out, temperature, reduction="none")
        loss = (weights * per_g).mean()
        per = per_g.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), per


# ------------------------------------------------------------------------------- d.6 time accounting
class StageTimer:
    """Wall-clock time per stage (spec d.6), the device synchronised before each reading so queued GPU work is
    charged to the stage that issued it. `t_total = t_inv + t_kd`; evaluation is never timed here. `synthesis`
    is Fast's own logged number (the `synthesize()` call only), kept so its README column can be checked."""

    STAGES = ("inv", "kd", "synthesis")

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.totals = dict.fromkeys(self.STAGES, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self.totals:
            raise KeyError(f"unknown timer stage {name!r}; stages: {', '.join(self.STAGES)}")
        import time

        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def start(self, name: str) -> None:
        """Open a stage across two callbacks (the harness's step hooks); `stop` closes it."""
        if name not in self.totals:
            raise KeyError(f"unknown timer stage {name!r}; stages: {', '.join(self.STAGES)}")
        import time

        self._sync()
        self._open = (name, time.perf_counter())

    def stop(self, name: str) -> None:
        import time

        opened = getattr(self, "_open", None)
        if opened is None or opened[0] != name:
            raise RuntimeError(f"timer stage {name!r} was not started")
        self._sync()
        self.totals[name] += time.perf_counter() - opened[1]
        self._open = None

    @property
    def t_inv(self) -> float:
        return self.totals["inv"]

    @property
    def t_kd(self) -> float:
        return self.totals["kd"]

    @property
    def t_total(self) -> float:
        return self.totals["inv"] + self.totals["kd"]

    def summary(self) -> dict[str, float]:
        return {"t_inv": self.t_inv, "t_kd": self.t_kd, "t_total": self.t_total,
                "t_synthesis_only": self.totals["synthesis"]}

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.totals = {k: float(state.get(k, 0.0)) for k in self.STAGES}


# ------------------------------------------------------------------------------- b.6 the Fast epoch
class DataFreeKD:
    """Fast-DFKD / DeepInv-k / real-data KD, one epoch at a time (spec b.6, b.9 items 5-7):

    for each epoch: `synth_per_epoch` synthesis calls into the pool (none without a synthesizer); from epoch
    `warmup` on, `kd_steps` student steps on uniformly drawn pool batches, then one LR-scheduler step. Warm-up
    epochs do no KD and no scheduler step (the adversarial gate lives in the synthesizer)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, synthesizer: Any, pool: ImagePool,
                 optimizer: torch.optim.Optimizer, scheduler: Any, augment: nn.Module, *, warmup: int = 20,
                 kd_steps: int = 400, batch_size: int = 256, temperature: float = 20.0, synth_per_epoch: int = 1,
                 timer: StageTimer | None = None):
        self.teacher, self.student, self.synthesizer, self.pool = teacher, student, synthesizer, pool
        self.optimizer, self.scheduler, self.augment = optimizer, scheduler, augment
        self.warmup, self.kd_steps, self.batch_size, self.temperature = warmup, kd_steps, batch_size, temperature
        self.synth_per_epoch = synth_per_epoch
        self.timer = timer or StageTimer(next(student.parameters()).device)
        self.epoch = 0  # epochs completed
        self.n_generated = 0
        self.kd_step_count = 0

    def synthesis_round(self) -> None:
        with self.timer.stage("synthesis"):
            out = self.synthesizer.synthesize()
        self.pool.add(out.images)
        self.n_generated += out.images.shape[0]

    def kd_round(self) -> float:
        total: Tensor | None = None  # summed on the device: no host sync per step
        for _ in range(self.kd_steps):
            _, images, _ = self.pool.sample(self.batch_size)
            loss, _ = kd_train_step(self.student, self.teacher, images, self.augment, self.optimizer, self.temperature)
            total = loss if total is None else total + loss
            self.kd_step_count += 1
        return float(total) / self.kd_steps if total is not None else 0.0

    def run_epoch(self) -> dict[str, float]:
        """One epoch; returns the epoch's metrics (cumulative timers, samples generated, store size)."""
        epoch = self.epoch
        if self.synthesizer is not None:
            for _ in range(self.synth_per_epoch):
                with self.timer.stage("inv"):
                    self.synthesis_round()
        metrics: dict[str, float] = {"epoch": float(epoch)}
        if epoch >= self.warmup:
            with self.timer.stage("kd"):
                metrics["loss_kd"] = self.kd_round()
            if self.scheduler is not None:
                self.scheduler.step()
        self.epoch += 1
        metrics.update(self.timer.summary())
        metrics.update({"samples_generated": float(self.n_generated), "store_size": float(len(self.pool)),
                        "lr": float(self.optimizer.param_groups[0]["lr"])})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes the maths: student, optimiser, scheduler, synthesizer, pool, counters, timers."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "synthesizer": None if not hasattr(self.synthesizer, "state_dict") else self.synthesizer.state_dict(),
                "store": self.pool.state_dict(), "epoch": self.epoch, "n_generated": self.n_generated,
                "kd_step_count": self.kd_step_count, "timer": self.timer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["synthesizer"] is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
        self.pool.load_state_dict(state["store"])
        self.epoch, self.n_generated = int(state["epoch"]), int(state["n_generated"])
        self.kd_step_count = int(state["kd_step_count"])
        self.timer.load_state_dict(state["timer"])


def class_balanced_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """A seeded class-balanced subset of `count` indices (KD on 10% real data, Fig. 1's 5,000 images, spec d.4-d.5):
    count / C per class (the remainder to the lowest classes), drawn without replacement."""
    labels = torch.as_tensor(labels)
    classes = torch.unique(labels)
    per, extra = divmod(count, len(classes))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for i, c in enumerate(classes.tolist()):  # loop over classes (<= 100), not samples
        idx = torch.nonzero(labels == c).flatten()
        want = per + (1 if i < extra else 0)
        if want > idx.numel():
            raise ValueError(f"class {c} has {idx.numel()} samples, {want} requested")
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:want]])
    return torch.cat(picked).sort().values
