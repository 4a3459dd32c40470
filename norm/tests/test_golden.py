"""Golden equivalence against the official NORM code's outputs (shared/fixtures/norm, see its README).

One test, dispatched on each file's recorded configuration: a whole student (`config.student`), the FT +
loss on fixed features (`config.C_s`), or the official schedules (`beta1_cifar`).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.testing import assert_grad_close, golden_files, gradient_scale
from norm.convert import OFFICIAL_ARCH, convert_state_dict, load_student, load_teacher
from norm.distiller import NORMDistiller
from norm.models import NORMStudent, create_model
from norm.norm import NormMultiplier
from norm.schedules import CIFAR_MULTIPLIER, IMAGENET_MULTIPLIER, official_lr

FWD = {"atol": 1e-5, "rtol": 1e-4}


def _close(a: Tensor, b: Tensor, what: str, **tol: float) -> None:
    tol = tol or FWD
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def _scalar(ours: float, ref: float, what: str) -> None:
    tol = 1e-5 if abs(ref) < 1 else 1e-5 * abs(ref)
    assert abs(ours - ref) <= tol, f"{what}: ours {ours} vs official {ref}"


def _grad(ours: Tensor | None, ref: Tensor, what: str, scale: float) -> None:
    """README: rtol 1e-3, atol 1e-5 max|g| per tensor; a float-noise reference is judged at the model's scale."""
    assert_grad_close(ours, ref, what, scale=scale, rel=1e-5, floor=0.0, rtol=1e-3)


# What each recorded tensor is in our forward (the README's names; the whole-student files name the FT output
# `matched_feat` and the pooled feature `penultimate`).
OURS = {"expanded": "expanded", "matched_feat": "expanded", "pooled": "pooled", "penultimate": "pooled",
        "ft_out": "ft_out", "logits": "logits", "logits_normalized": "logits_normalized",
        "teacher_logits_normalized": "teacher_logits_normalized"}


def _compare_recorded(out: dict[str, Tensor], ref: dict[str, Any], mode: str) -> None:
    """Every tensor the file records for `mode` (losses and gradients are checked apart) against ours."""
    checked = 0
    for key, value in ref.items():
        if not isinstance(value, Tensor) or key.startswith(("grad_", "loss_")):
            continue
        assert key in OURS, f"{mode} records {key!r}, a tensor this harness does not know (README names: {OURS})"
        _close(out[OURS[key]], value, f"{mode} {key}")
        checked += 1
    assert checked, f"{mode}: no recorded tensor was compared"


class _Features(nn.Module):
    """Stub backbone for the FT-only fixture: the input *is* the student feature (official stubs)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(x)


def _build_student(data: dict[str, Any]) -> tuple[NORMStudent, str]:
    cfg = data["config"]
    if "student" in cfg:
        arch = OFFICIAL_ARCH[cfg["student"]]
        student = load_student(data["student_state_dict"], arch, cfg["channel_t"],
                                        cfg["num_classes"])
    else:
        arch = "features"
        student = NORMStudent(_Features(cfg["C_s"], cfg["num_classes"]), cfg["C_t"], cfg["N"])
        student.load_state_dict(convert_state_dict(data["state_dict"], arch, student=True))
    assert student.ft.n == cfg["N"]
    return student, arch


def _forward(student: NORMStudent, x: Tensor, inputs: dict[str, Tensor], ceta: float) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hook = student.net.get_classifier().register_forward_hook(lambda m, i, o: seen.update(pooled=i[0]))
    feat = student.net.forward_features(x)
    e, y = student.ft(feat)
    logits = student.net.forward_head(y)
    hook.remove()
    out = {"expanded": e, "ft_out": y, "pooled": seen["pooled"], "logits": logits}
    for name, z in (("logits_normalized", logits), ("teacher_logits_normalized", inputs.get("teacher_logits"))):
        if z is not None:  # README: ceta * layer_norm(z), no affine, eps 1e-7
            out[name] = ceta * F.layer_norm(z, z.shape[-1:], eps=1e-7)
    return out


def _check_model(data: dict[str, Any]) -> None:
    cfg, inputs = data["config"], data["inputs"]
    is_ft = "student" not in cfg
    x = inputs["x_student_feat" if "x_student_feat" in inputs else "x"].clone().requires_grad_(is_ft)

    # teacher: the official network reproduces the recorded teacher tensors
    if "teacher_state_dict" in data:
        teacher = load_teacher(data["teacher_state_dict"], OFFICIAL_ARCH[cfg["teacher"]],
                                        cfg["num_classes"])
        with torch.no_grad():
            t_feat = teacher.forward_features(inputs["x"])
            _close(t_feat, inputs["teacher_feat"], "teacher feature")
            _close(teacher.forward_head(t_feat), inputs["teacher_logits"], "teacher logits")

    # train mode: forward, the loss parts, the total and the gradients
    student, _ = _build_student(data)
    distiller = NORMDistiller(student, nn.Identity(), cfg["gamma"], cfg["alpha"], cfg["beta"], cfg["kd_T"],
                              cfg["ceta"], CIFAR_MULTIPLIER).train()
    distiller.on_epoch_start(cfg["epoch"], 241)
    _scalar(distiller.current_multiplier, cfg["beta1_at_epoch"], "NORM multiplier w(epoch)")
    ref = data["train_mode"]
    out = _forward(student, x, inputs, cfg["ceta"])
    _compare_recorded(out, ref, "train-mode")
    terms = distiller.loss_terms(out["expanded"], out["logits"], inputs["teacher_feat"],
                                 inputs["teacher_logits"], inputs["target"])
    total = (cfg["gamma"] * terms["ce"] + cfg["alpha"] * terms["kd"]
             + distiller.current_multiplier * cfg["beta"] * terms["norm"])
    terms["total"] = total
    losses = [k for k in ref if k.startswith("loss_")]
    assert "loss_total" in losses, "the fixture records no total loss"
    for key in losses:
        assert key[5:] in terms, f"train_mode records {key}, a loss this harness does not know"
        _scalar(terms[key[5:]].item(), ref[key], key)
    total.backward()
    grads = {k: p.grad for k, p in student.named_parameters()}
    rename = dict(zip(ref["grad_params"], convert_state_dict(ref["grad_params"], "x", student=True)))
    scale = gradient_scale({**ref["grad_params"], **({"x": ref["grad_x"]} if "grad_x" in ref else {})})
    if "grad_x" in ref:
        _grad(x.grad, ref["grad_x"], "d loss / d x", scale)
    for official, g in ref["grad_params"].items():
        _grad(grads[rename[official]], g, f"grad {official}", scale)
    if "grad_norms_all" in ref:
        norms = convert_state_dict(ref["grad_norms_all"], "x", student=True)
        assert {k for k, g in grads.items() if g is not None} == set(norms), "parameters receiving gradient"
        norm_scale = gradient_scale(norms)
        for k, n in norms.items():  # README rtol 1e-3, atol 1e-6; float-noise norms at the model's scale
            assert_grad_close(grads[k].norm(), torch.as_tensor(n, dtype=torch.float32), f"|grad {k}|",
                              scale=norm_scale, rel=0.0, floor=1e-6, rtol=1e-3)

    # eval mode on a fresh load (the train-mode step updated BN statistics)
    student, arch = _build_student(data)
    student.eval()
    ref = data["eval_mode"]
    with torch.no_grad():
        out = _forward(student, x.detach(), inputs, cfg["ceta"])
    _compare_recorded(out, ref, "eval-mode")

    # the merge: FT folded into the classifier
    merged = data["merged"]
    a, c = student.ft.affine()
    if "A" in merged:
        _close(a.float(), merged["A"], "fold A")
    _close(c.float(), merged["c"], "fold c")
    with torch.no_grad():
        plain = student.fold()
        _close(plain.get_classifier().weight, merged["fc_weight"], "folded classifier weight")
        _close(plain.get_classifier().bias, merged["fc_bias"], "folded classifier bias")
        folded_logits = plain(x.detach())
        _close(folded_logits, out["logits"], "folded vs unfolded eval logits", atol=1e-5, rtol=0)
        for key in ("logits", "logits_student_backbone_merged_fc"):
            if key in merged:
                _close(folded_logits, merged[key], f"merged {key}", atol=1e-5, rtol=0)
        if "logits_plain_model_merged_fc" in merged:  # the plain network (for MobileNetV2: with its ReLUs)
            plain_net = create_model(arch, cfg["num_classes"], norm_variant=False).eval()
            plain_net.load_state_dict(plain.state_dict())
            _close(plain_net(x.detach()), merged["logits_plain_model_merged_fc"], "plain network, merged fc",
                   atol=1e-5, rtol=0)


MULTIPLIERS = {"cifar": CIFAR_MULTIPLIER, "imagenet": IMAGENET_MULTIPLIER}
MILESTONES = {"cifar": (150, 180, 210), "imagenet": (30, 60, 90)}  # official adjust_learning_rate (README)


def _epochs(config: dict[str, Any], dataset: str, values: list[float]) -> int:
    """Epochs of the official loop (`range(0, E + 1)` recorded as `<dataset>_epochs_loop`), else the list's."""
    loop = config.get(f"{dataset}_epochs_loop")
    m = re.search(r"range\(\s*\d+\s*,\s*(\d+)\s*\)", str(loop)) if loop else None
    return int(m.group(1)) if m else len(values)


def _check_schedules(data: dict[str, Any]) -> None:
    config, checked = data.get("config", {}), 0
    for key, values in data.items():
        if key.startswith("beta1_"):
            dataset = key.removeprefix("beta1_")
            mult, epochs = MULTIPLIERS[dataset], _epochs(config, dataset, values)
            assert isinstance(mult, NormMultiplier)
            assert [mult(e, epochs) for e in range(len(values))] == pytest.approx(values), key
            checked += 1
        elif key.startswith("lr_"):
            _, dataset, decay, base = key.split("_", 3)
            epochs = _epochs(config, dataset, values)
            iters = config.get("imagenet_iters_per_epoch_assumed", 5005)
            ours = [official_lr(e, float(base), decay, epochs - 1, MILESTONES[dataset], iters)
                    for e in range(len(values))]
            assert ours == pytest.approx(values, rel=1e-9), key
            checked += 1
    assert checked, "no schedule recorded"


@pytest.mark.golden
@pytest.mark.parametrize("path", golden_files("norm"))
def test_golden(path: Any) -> None:
    data = torch.load(path, weights_only=True)
    if any(k.startswith(("beta1_", "lr_")) for k in data):
        _check_schedules(data)
    elif "student" in data["config"] or "C_s" in data["config"]:
        _check_model(data)
    else:
        pytest.fail(f"{path}: unknown fixture kind (config keys {sorted(data['config'])})")


@pytest.mark.golden
@pytest.mark.parametrize("path", golden_files("norm"))
def test_golden_harness_accepts_variants(path: Any, tmp_path: Any) -> None:
    """The harness reads what a file records: a re-saved variant with notes in its config, the README's other
    tensor names, a block left out, or shorter schedules passes without code changes."""
    data = torch.load(path, weights_only=True)
    config = {**data["config"], "note": str(data["config"].get("note", "")) + "  # re-saved variant",
              "comment": "variant made by the harness test"}
    if any(k.startswith(("beta1_", "lr_")) for k in data):
        variant = {k: (v[:37] if isinstance(v, list) else v) for k, v in data.items()}
        for key in [k for k in config if k.endswith("_epochs_loop")]:
            config[key] = f"{config[key]}  # epochs 0..E inclusive"
    else:
        swap = {"expanded": "matched_feat", "matched_feat": "expanded", "pooled": "penultimate",
                "penultimate": "pooled"}
        variant = dict(data)
        variant["train_mode"] = {swap.get(k, k): v for k, v in data["train_mode"].items()}
        variant["eval_mode"] = {swap.get(k, k): v for k, v in data["eval_mode"].items() if k != "ft_out"}
    variant["config"] = config
    torch.save(variant, tmp_path / "variant.pt")
    test_golden(tmp_path / "variant.pt")
