"""Golden equivalence against the official NORM code's outputs (shared/fixtures/norm, see its README).

One test, dispatched on each file's recorded configuration: a whole student (`config.student`), the FT +
loss on fixed features (`config.C_s`), or the official schedules (`beta1_cifar`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from common.testing import golden_files
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


def _grad(ours: Tensor, ref: Tensor, what: str) -> None:
    _close(ours, ref, what, rtol=1e-3, atol=1e-5 * ref.abs().max().item())


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


def _forward(student: NORMStudent, x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hook = student.net.get_classifier().register_forward_hook(lambda m, i, o: seen.update(pooled=i[0]))
    feat = student.net.forward_features(x)
    e, y = student.ft(feat)
    logits = student.net.forward_head(y)
    hook.remove()
    return {"expanded": e, "ft_out": y, "pooled": seen["pooled"], "logits": logits}


def _check_model(data: dict[str, Any]) -> None:
    cfg, inputs = data["config"], data["inputs"]
    is_ft = "student" not in cfg
    x = inputs["x_student_feat" if is_ft else "x"].clone().requires_grad_(is_ft)
    names = {"expanded": "expanded" if is_ft else "matched_feat",
             "pooled": "pooled" if is_ft else "penultimate"}

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
    out = _forward(student, x)
    for ours, theirs in (("expanded", names["expanded"]), ("pooled", names["pooled"]), ("logits", "logits")):
        _close(out[ours], ref[theirs], f"train-mode {theirs}")
    terms = distiller.loss_terms(out["expanded"], out["logits"], inputs["teacher_feat"],
                                 inputs["teacher_logits"], inputs["target"])
    total = (cfg["gamma"] * terms["ce"] + cfg["alpha"] * terms["kd"]
             + distiller.current_multiplier * cfg["beta"] * terms["norm"])
    for name in ("ce", "kd", "norm"):
        _scalar(terms[name].item(), ref[f"loss_{name}"], f"loss_{name}")
    _scalar(total.item(), ref["loss_total"], "loss_total")
    total.backward()
    grads = {k: p.grad for k, p in student.named_parameters()}
    rename = dict(zip(ref["grad_params"], convert_state_dict(ref["grad_params"], "x", student=True)))
    if is_ft:
        _grad(x.grad, ref["grad_x"], "d loss / d x")
    for official, g in ref["grad_params"].items():
        _grad(grads[rename[official]], g, f"grad {official}")
    if "grad_norms_all" in ref:
        norms = convert_state_dict(ref["grad_norms_all"], "x", student=True)
        assert {k for k, g in grads.items() if g is not None} == set(norms), "parameters receiving gradient"
        for k, n in norms.items():
            _close(grads[k].norm(), torch.as_tensor(n, dtype=torch.float32), f"|grad {k}|",
                   rtol=1e-3, atol=1e-6)

    # eval mode on a fresh load (the train-mode step updated BN statistics)
    student, arch = _build_student(data)
    student.eval()
    ref = data["eval_mode"]
    with torch.no_grad():
        out = _forward(student, x.detach())
    for ours, theirs in (("expanded", names["expanded"]), ("ft_out", "ft_out"), ("pooled", names["pooled"]),
                         ("logits", "logits")):
        if theirs in ref:
            _close(out[ours], ref[theirs], f"eval-mode {theirs}")

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


def _check_schedules(data: dict[str, Any]) -> None:
    for name, mult, epochs in (("beta1_cifar", CIFAR_MULTIPLIER, 241),
                               ("beta1_imagenet", IMAGENET_MULTIPLIER, 101)):
        assert isinstance(mult, NormMultiplier)
        assert [mult(e, epochs) for e in range(epochs)] == pytest.approx(data[name]), name
    for key, values in data.items():
        if not key.startswith("lr_"):
            continue
        _, dataset, decay, base = key.split("_")
        epochs = 241 if dataset == "cifar" else 101
        milestones = (150, 180, 210) if dataset == "cifar" else (30, 60, 90)
        iters = data["config"].get("imagenet_iters_per_epoch_assumed", 5005)
        ours = [official_lr(e, float(base), decay, epochs - 1, milestones, iters) for e in range(len(values))]
        assert ours == pytest.approx(values, rel=1e-9), key


@pytest.mark.golden
@pytest.mark.parametrize("path", golden_files("norm"))
def test_golden(path: Any) -> None:
    data = torch.load(path, weights_only=True)
    if "beta1_cifar" in data:
        _check_schedules(data)
    elif "student" in data["config"] or "C_s" in data["config"]:
        _check_model(data)
    else:
        pytest.fail(f"{path}: unknown fixture kind (config keys {sorted(data['config'])})")
