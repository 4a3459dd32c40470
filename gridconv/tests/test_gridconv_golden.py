"""Golden equivalence with the official GridConv code (fixtures in shared/fixtures/gridconv).

Each fixture file is dispatched on what it records (its network configuration, an SGT mapping block,
metric blocks), never on its name; a new fixture of a known kind with other sizes or seeds passes
without code changes. Tolerances are those of the fixture README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from common.testing import assert_grad_close, golden_files, gradient_scale, recorded_temperature
from gridconv.convert import checkpoint_filter_fn, official_model_config, our_key
from gridconv.gridconv import (
    GridLiftingNetwork,
    LearnableSGT,
    grid_to_pose,
    handcrafted_sgt_matrices,
    layout_assignment,
    pose_to_grid,
)
from gridconv.metrics import evaluate_actionwise

pytestmark = pytest.mark.golden


def close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(ours.detach().to(ref.dtype), ref, atol=atol, rtol=rtol)


def close_grad(ours: torch.Tensor | None, ref: torch.Tensor, name: str, scale: float) -> None:
    """README: atol 1e-4 max|ref| + 1e-7 per tensor; a float-noise reference is judged at the model's scale."""
    assert ours is not None, f"{name}: no gradient"
    assert_grad_close(ours, ref, name, scale=scale, rel=1e-4, floor=1e-7)


def check_sgt(fx: Mapping[str, Any]) -> None:
    grid_shape = tuple(fx.get("config", {}).get("grid_shape", (5, 5)))
    forward, inverse = handcrafted_sgt_matrices(torch.float64)
    exact = dict(atol=1e-12, rtol=0.0)
    torch.testing.assert_close(forward, fx["handcrafted_forward_matrix"], **exact)
    torch.testing.assert_close(inverse, fx["handcrafted_inverse_matrix"], **exact)
    for pose_key, grid_key, trip_key in (("pose2d_norm", "grid2d", "pose2d_roundtrip"),
                                         ("pose3d_rel_m", "grid3d", "pose3d_roundtrip")):
        grid = pose_to_grid(fx[pose_key], forward, grid_shape)
        torch.testing.assert_close(grid, fx[grid_key], **exact)
        torch.testing.assert_close(grid_to_pose(fx[grid_key], inverse), fx[trip_key], **exact)
    torch.testing.assert_close(grid_to_pose(fx["random_grid"], inverse), fx["random_grid_inverse"], **exact)
    projected = pose_to_grid(fx["random_grid_inverse"], forward, grid_shape)
    torch.testing.assert_close(projected, fx["random_grid_projected"], **exact)
    for prior, ref in fx["autosgt_priors"].items():
        sgt = LearnableSGT(prior=prior).eval()
        shape = sgt.logits.shape
        torch.testing.assert_close(sgt.logits.detach(), ref["raw_parameter"].reshape(shape), **exact)
        torch.testing.assert_close(sgt.assignment(), ref["hard_assignment"].reshape(shape), **exact)
        assert sgt.cell_to_joint() == list(ref["cell_to_joint"])
        torch.testing.assert_close(layout_assignment(ref["cell_to_joint"]), sgt.assignment(), **exact)


def build(section: Mapping[str, Any]) -> GridLiftingNetwork:
    model = GridLiftingNetwork(**official_model_config(section["config"]))
    state = checkpoint_filter_fn(section["state_dict"], model)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    if "num_params" in section:
        assert sum(p.numel() for p in model.parameters()) == section["num_params"]
    return model.eval()


def check_grads(model: GridLiftingNetwork, section: Mapping[str, Any], grads: Mapping[str, torch.Tensor],
                without: list[str], scale: float) -> None:
    ref = checkpoint_filter_fn(grads)
    without_ours = {our_key(k) for k in without}
    params = dict(model.named_parameters())
    assert set(ref) | without_ours == set(params)
    for name, p in params.items():
        if name in without_ours:
            assert p.grad is None, f"{name} should receive no gradient"
        else:
            close_grad(p.grad, ref[name], name, scale)


def check_network(section: Mapping[str, Any]) -> None:
    model = build(section)
    learnable = official_model_config(section["config"])["sgt"] == "learnable"
    grid_in = section.get("input_grid", section.get("sgt_grid_input"))
    # Outputs at each recorded temperature (set explicitly; the official state has none).
    outputs = section.get("outputs_eval", {"T=30": section.get("output_eval")})
    with torch.no_grad():
        for key, ref in outputs.items():
            model.set_temperature(recorded_temperature(key))
            if learnable:
                close(model(section["input_pose2d_norm"]), ref)
                close(model.forward_grid(grid_in), section["pre_inverse_grid"][key])
            else:
                close(model.forward_grid(grid_in), ref)
    model.set_temperature(float(section.get("grad_temperature", 30.0)))
    if learnable:
        to_grid, _ = model.sgt.matrices()
        close(pose_to_grid(section["input_pose2d_norm"], to_grid, model.grid_shape), grid_in)
    with torch.no_grad():
        if "atten_conv1_out" in section:
            close(model.stem.attention(grid_in), section["atten_conv1_out"])
            close(model.stem(grid_in), section["w1_out"])
            stem = F.relu(model.stem_norm(model.stem(grid_in)))
            close(model.blocks[0].conv1.attention(stem), section["block0_atten_conv1_out"])
        if "pred_pose_m" in section:  # inverse SGT of the network output, what the evaluation sees
            close(model.sgt.inverse(model.forward_grid(grid_in)), section["pred_pose_m"])
    # Loss and gradients (eval mode), on the grid or the joints as the official model does.
    if learnable:
        x = section["input_pose2d_norm"].clone().requires_grad_(True)
        pred, losses = model.forward_train(x, section["target_pose3d_rel_m"])
    else:
        x = grid_in.clone().requires_grad_(True)
        losses = {"loss_mse": F.mse_loss(model.forward_grid(x), section["target_grid"])}
    losses["loss_mse"].backward()
    torch.testing.assert_close(losses["loss_mse"].item(), float(section["loss_mse"]), rtol=1e-5, atol=0.0)
    scale = gradient_scale(section["grads"])
    close_grad(x.grad, section.get("grad_input_grid", section.get("grad_input")), "input", scale)
    check_grads(model, section, section["grads"], list(section.get("params_without_grad", [])), scale)
    if "ste" in section:  # learnable SGT, straight-through: same output, gradient reaches the logits
        ste = section["ste"]
        model.zero_grad(set_to_none=True)
        model.sgt.mode = "ste"
        model.sgt.train()
        x = section["input_pose2d_norm"].clone().requires_grad_(True)
        pred, losses = model.forward_train(x, section["target_pose3d_rel_m"])
        close(pred, ste["output"])
        losses["loss_mse"].backward()
        torch.testing.assert_close(losses["loss_mse"].item(), float(ste["loss_mse"]), rtol=1e-5, atol=0.0)
        close_grad(x.grad, ste["grad_input"], "input (ste)", scale)
        close_grad(model.sgt.logits.grad, ste["grad_sgt_trans_mat"].reshape(model.sgt.logits.shape), "logits", scale)
        assert not ste["params_without_grad"]


def check_metrics(block: Mapping[str, Any], pred_m: torch.Tensor, gt_m: torch.Tensor,
                  actions: list[str]) -> None:
    for name, procrustes in (("mpjpe", False), ("pmpjpe", True)):
        ref = block[name]
        ours = evaluate_actionwise(pred_m.double() * 1000, gt_m.double() * 1000, actions, procrustes)
        assert ours["mean_mm"] == pytest.approx(ref["mean_over_actions_mm"], abs=1e-6)
        assert ours["per_action_mm"].keys() == ref["per_action_mm"].keys()
        for act, value in ref["per_action_mm"].items():
            assert ours["per_action_mm"][act] == pytest.approx(value, abs=1e-6), act
        assert ours["per_axis_mm"] == pytest.approx(list(ref["per_axis_abs_mm"]), abs=1e-6)


@pytest.mark.parametrize("path", golden_files("gridconv"))
def test_golden_fixture(path) -> None:
    fx = torch.load(path, weights_only=True)
    checked = 0
    if "handcrafted_forward_matrix" in fx:
        check_sgt(fx)
        checked += 1
    sections = [fx] + [v for v in fx.values() if isinstance(v, Mapping)]
    for section in sections:
        if "state_dict" in section and "config" in section:
            check_network(section)
            checked += 1
    actions = list(fx.get("actions", []))
    if "metrics_model" in fx:  # of the output at the recorded gradient temperature
        at = float(fx.get("grad_temperature", 1.0))
        pred = fx.get("pred_pose_m", next((v for k, v in fx.get("outputs_eval", {}).items()
                                           if recorded_temperature(k) == at), None))
        gt = fx.get("gt_pose_m", fx.get("target_pose3d_rel_m"))
        check_metrics(fx["metrics_model"], pred, gt, actions)
        checked += 1
    if "metrics_check" in fx:
        check_metrics(fx["metrics_check"], fx["metric_check_pred_m"], fx["metric_check_gt_m"], actions)
        checked += 1
    assert checked, f"{path.name}: no known fixture content (expected an SGT block, a network or metrics)"


@pytest.mark.parametrize("path", golden_files("gridconv"))
def test_golden_harness_accepts_variants(path, tmp_path) -> None:
    """A re-saved variant (notes in the config, temperature keys written another way) passes unchanged."""
    fx = torch.load(path, weights_only=True)

    def respell(block: Any) -> Any:
        return {f"T={float(k.split('=')[1]):.1f}".replace(".0", ".00"): v for k, v in block.items()}

    variant = dict(fx)
    for key in ("outputs_eval", "pre_inverse_grid"):
        if key in variant:
            variant[key] = respell(variant[key])
    if "config" in variant:
        variant["config"] = {**variant["config"], "note": f"{variant['config'].get('note', '')}  # re-saved variant"}
    torch.save(variant, tmp_path / "variant.pt")
    test_golden_fixture(tmp_path / "variant.pt")
