"""Typed schemas of pste_bnn's own config groups (model/, method/) and the builders they drive.

`validate` (common.config) names an unknown key or a wrongly typed value in one line; `check` adds choices
and ranges. `build_student` / `build_method` turn a composed config into the row's network and training
object; step 2 starts from a step-1 checkpoint through `convert.checkpoint_filter_fn`. The trainer /
optim / schedule groups belong to the common harness (phase 2).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from common.config import check_choice, validate
from common.errors import UserError

from .method import SubBitDistiller, load_teacher
from .models import MODELS, SubBitNet, create_model
from .sparks import QUANTIZERS, SelectionSchedule


@dataclass
class ModelConfig:
    name: str = "birealnet18"
    num_classes: int = 1000
    in_chans: int = 3  # mini_net only (1 for digits / MNIST)


@dataclass
class SelectionConfig:
    """Sparks selection (b.5-b.8, k.9); every default is a project convention (spec k.2)."""

    iters: int = 20  # L, Sinkhorn iterations
    hard_every: int = 1  # exact; > 1 reuses pi for that many steps once gamma = 0 (k.9)
    init: str = "freq"  # freq | zeros (b.8)
    kappa: float = 5.0
    lr_x_mult: float = 10.0  # lr_X = 10 x base lr, Adam, no weight decay
    t0: float = 1.0
    t1: float = 0.05
    shape: str = "exponential"  # exponential | linear | constant
    gamma0: float = 1.0
    noise_frac: float = 0.25  # gamma -> 0 over the first 25% of step-2 steps
    noise_seed: int = 0  # the same on every DDP rank: rank-identical Gumbel noise (d.2)
    rectangular: bool = False  # NOT the paper's method: n x 512 matching instead of 512 x 512 (b.5)


@dataclass
class MethodConfig:
    name: str = "step1"  # the row's variant, for logs
    step: int = 1  # 1: real weights + binary activations; 2: binary / sub-bit weights
    quantizer: str = "real"  # real | bnn | fixed | snn | sparks
    tau: int = 5  # bits per kernel index, n = 2^tau
    teacher: str | None = None  # local torchvision ResNet-34 file; null: cross-entropy (our readings)
    init_checkpoint: str | None = None  # step 2: the step-1 checkpoint (ours, or official checkpoint_ba.pth.tar)
    fixed_subset: str = "random"  # fixed quantizer: random | freq (spec i variants)
    refine_every: int = 25  # SNN: codeword-gradient period; 0 = the inert multi-GPU behaviour (k.6)
    zero_grad_set_to_none: bool = False  # SNN: False = torch 1.4 zero_grad (the released behaviour, b.10)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


def check(model: ModelConfig, method: MethodConfig) -> None:
    """Choices and ranges beyond types; one line naming the key."""
    check_choice("model.name", model.name, sorted(MODELS))
    check_choice("method.quantizer", method.quantizer, QUANTIZERS)
    check_choice("method.step", method.step, (1, 2))
    check_choice("method.fixed_subset", method.fixed_subset, ("random", "freq"))
    check_choice("method.selection.init", method.selection.init, ("freq", "zeros"))
    check_choice("method.selection.shape", method.selection.shape, SelectionSchedule.SHAPES)
    if not 0 <= method.tau <= 9:
        raise UserError(f"config method.tau={method.tau}: bits per kernel must be in 0..9")
    if (method.step == 1) != (method.quantizer == "real"):
        raise UserError(f"config method.quantizer={method.quantizer!r} with method.step={method.step}: step 1 is "
                        "quantizer=real (binary activations only), step 2 binarizes the weights")
    sel = method.selection
    if sel.iters < 1 or sel.hard_every < 1:
        raise UserError(f"config method.selection: iters={sel.iters} and hard_every={sel.hard_every} must be >= 1")
    if sel.t0 <= 0 or sel.t1 <= 0 or not 0 <= sel.noise_frac <= 1:
        raise UserError("config method.selection: t0, t1 > 0 and 0 <= noise_frac <= 1 required")
    if method.refine_every < 0:
        raise UserError(f"config method.refine_every={method.refine_every}: must be >= 0 (0 = never refine)")


def parse(cfg: Any) -> tuple[ModelConfig, MethodConfig]:
    model, method = validate(cfg.model, ModelConfig, "model."), validate(cfg.method, MethodConfig, "method.")
    check(model, method)
    return model, method


def build_network(model: ModelConfig, method: MethodConfig) -> SubBitNet:
    """The row's network at its initialisation (no checkpoint loaded)."""
    kwargs: dict[str, Any] = {}
    if method.quantizer == "snn":
        kwargs = {"refine_every": method.refine_every, "zero_grad_set_to_none": method.zero_grad_set_to_none}
    elif method.quantizer == "sparks":
        sel = method.selection
        kwargs = {"iters": sel.iters, "hard_every": sel.hard_every, "init": sel.init, "kappa": sel.kappa,
                  "rectangular": sel.rectangular}
    extra: dict[str, Any] = {"in_chans": model.in_chans} if model.name == "mini_net" else {}
    if method.quantizer == "sparks":
        s = method.selection
        extra["schedule_kwargs"] = {"t0": s.t0, "t1": s.t1, "shape": s.shape, "gamma0": s.gamma0,
                                    "noise_frac": s.noise_frac, "noise_seed": s.noise_seed}
    return create_model(model.name, num_classes=model.num_classes, quantizer=method.quantizer, tau=method.tau,
                        quantizer_kwargs=kwargs, **extra)


def build_student(model: ModelConfig, method: MethodConfig) -> SubBitNet:
    """The row's network; step 2 loads the step-1 checkpoint (convert.py) and seeds the selection."""
    student = build_network(model, method)
    if method.step == 2:
        if not method.init_checkpoint:
            raise UserError("step 2 needs the step-1 checkpoint: set method.init_checkpoint=/path/to/step1.pt "
                            "(ours) or checkpoint_ba.pth.tar (official), spec d.1")
        load_step1(student, method)
    return student


def load_step1(student: SubBitNet, method: MethodConfig) -> None:
    """Step-1 weights -> step-2 latent weights; the selection / subset seeded from them (b.8, d.1)."""
    from common.checkpoint import load_checkpoint, load_foreign_state_dict, load_state_dict_verbose

    from .convert import checkpoint_filter_fn
    from .sparks import frequent_codewords

    path = method.init_checkpoint
    if not os.path.isfile(path):
        raise UserError(f"step-1 checkpoint {path} not found; run the step-1 experiment first (spec d.1)")
    try:
        raw = load_checkpoint(path)
        raw = raw.get("model", raw.get("state_dict", raw))
    except UserError:
        raw = load_foreign_state_dict(path)
    state = checkpoint_filter_fn(raw, student)
    load_state_dict_verbose(student, state, strict=True, source=f"step-1 checkpoint {path}")
    if method.quantizer == "fixed" and method.fixed_subset == "freq":
        for _, conv in student.binary_convs():
            conv.binarize.selected_ids.copy_(frequent_codewords(conv.weight, 2 ** method.tau))


def build_method(cfg: Any) -> SubBitDistiller:
    model, method = parse(cfg)
    teacher = load_teacher(method.teacher, model.num_classes) if method.teacher else None
    return SubBitDistiller(build_student(model, method), teacher)


def as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
