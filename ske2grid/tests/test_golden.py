"""Golden tests: every fixture in `$OSVAI_FIXTURES` or `../shared/fixtures/ske2grid` (README there), built from
the config the file records, loaded through `ske2grid.convert`, compared within the README's tolerances.

Two kinds, told apart by what the config records: a front end (no `blocks`: data BN -> UPT/GIT cascade -> grid
patch) and a full network (`blocks` + `num_classes`). A recorded value this code cannot honour fails by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from common.testing import golden_files
from ske2grid.convert import checkpoint_filter_fn, rename_official_key, rename_official_tensors
from ske2grid.models import Ske2GridNet, multiclip_predict
from ske2grid.ske2grid import LAYOUTS, GraphNodeIndexTransform, Ske2Grid, layout_adjacency

# README "Tolerances (float32, CPU)"
TOL_GRID = dict(atol=1e-5, rtol=1e-4)
TOL_FRONT_GRAD = dict(atol=1e-4, rtol=1e-4)
TOL_NET = dict(atol=1e-5, rtol=1e-4)
TOL_NET_GRAD = dict(atol=1e-6, rtol=1e-3)
TOL_BN = dict(atol=1e-6, rtol=1e-5)

_SPATIAL_PARTITIONS = {"spatial": 3, "stgcn_spatial": 3}  # graph modes -> spatial kernel (spec §b.5)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_honourable(cfg: dict[str, Any]) -> None:
    """Fail by name on recorded values that change the maths in a way this implementation does not build."""
    graph = cfg.get("graph_cfg", {})
    assert graph.get("layout", "coco") in LAYOUTS, f"config graph_cfg.layout={graph.get('layout')!r} not supported"
    assert graph.get("mode", "spatial") in _SPATIAL_PARTITIONS, f"config graph_cfg.mode={graph.get('mode')!r}"
    for key, ok in (("data_bn", True), ("spatial_type", "avg"), ("dropout", 0), ("use_gumbel_noise", False)):
        if key in cfg:
            assert cfg[key] == ok, f"config {key}={cfg[key]!r} is not what this implementation builds ({ok!r})"


def _front_end(cfg: dict[str, Any]) -> Ske2Grid:
    graph = cfg.get("graph_cfg", {})
    return Ske2Grid(graph.get("layout", "coco"), int(cfg["in_channels"]), tuple(cfg["grid_shape"]),
                    list(cfg["progressive_joint_seq"]))


def _network(cfg: dict[str, Any]) -> Ske2GridNet:
    graph = cfg.get("graph_cfg", {})
    ks = _SPATIAL_PARTITIONS[graph.get("mode", "spatial")]
    blocks = [{"kernel_size": (9, ks), **b} for b in cfg["blocks"]]
    net = Ske2GridNet(int(cfg["num_classes"]), graph.get("layout", "coco"), int(cfg["in_channels"]),
                      tuple(cfg["grid_shape"]), list(cfg["progressive_joint_seq"]), blocks,
                      num_person=int(cfg.get("head_num_person", 2)))
    assert net.num_features == int(cfg.get("head_in_channels", net.num_features)), "head_in_channels != last width"
    return net


def _load_official(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    converted = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected


def _param(model: torch.nn.Module, official: str) -> torch.nn.Parameter | None:
    return dict(model.named_parameters()).get(rename_official_key(official, model))


def _compare_grads(model: torch.nn.Module, data: dict[str, Any], tol: dict[str, float]) -> None:
    expected = rename_official_tensors(data["grads"], model)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected), f"grad sets differ: {sorted(set(got) ^ set(expected))}"
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    for official in data["params_without_grad"]:
        p = _param(model, official)
        assert p is None or p.grad is None, f"{official} received a gradient"


def _compare_bn_buffers(model: torch.nn.Module, data: dict[str, Any]) -> None:
    own = model.state_dict()
    for name, value in rename_official_tensors(data["bn_buffers_after_train_forward"], model).items():
        torch.testing.assert_close(own[name].to(value.dtype), value, **TOL_BN, msg=lambda m, n=name: f"{n}: {m}")


def _golden_front_end(data: dict[str, Any]) -> None:
    cfg = data["config"]
    model = _front_end(cfg)
    _load_official(model, data["state_dict"])
    x = data["input"]
    assert list(x.shape) == list(cfg["input_shape"])

    torch.testing.assert_close(model.adjacency, data["adjacency"], atol=0, rtol=0)
    for s, (u, g, idx) in enumerate(zip(data["upt_stage_matrices"], data["git_hard_matrices"], data["git_index"])):
        torch.testing.assert_close(model.stages[s].upt.weight.detach(), u, atol=0, rtol=0)
        torch.testing.assert_close(model.assignments()[s], idx.long(), atol=0, rtol=0)
        torch.testing.assert_close(model.stages[s].git().detach(), g, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.effective_upt(0).detach(), data["upt_effective_stage0"], **TOL_GRID)

    model.eval()
    torch.testing.assert_close(model(x), data["grid_eval"], **TOL_GRID)
    with torch.no_grad():  # the cached path (no gradient needed) gives the same patch
        torch.testing.assert_close(model(x), data["grid_eval"], **TOL_GRID)

    model.train()
    grid = model(x)
    torch.testing.assert_close(grid, data["grid_train"], **TOL_GRID)
    loss = (grid * data["grad_probe_R"]).sum()
    torch.testing.assert_close(loss, data["loss_train"], **TOL_FRONT_GRAD)
    loss.backward()
    _compare_grads(model, data, TOL_FRONT_GRAD)
    _compare_bn_buffers(model, data)

    if "git_only" in data:
        _golden_git_only(data["git_only"])


def _golden_git_only(d: dict[str, Any]) -> None:
    n = int(d["config"]["num_jts"])
    git = GraphNodeIndexTransform(n)
    with torch.no_grad():
        git.theta.copy_(d["sgt_trans_mat"])
    torch.testing.assert_close(git.assignment(), d["index_sel"].long(), atol=0, rtol=0)
    torch.testing.assert_close(git.index_sel, d["index_sel"].float(), atol=0, rtol=0)
    G = git()
    torch.testing.assert_close(G.detach(), d["hard_eval"], atol=0, rtol=0)  # exact one-hot
    torch.testing.assert_close(G.detach(), d["hard_straight_through"], atol=1e-6, rtol=0)
    (G * d["probe_R"]).sum().backward()
    torch.testing.assert_close(git.theta.grad, d["grad_sgt_trans_mat"], atol=1e-6, rtol=0)


def _golden_network(data: dict[str, Any]) -> None:
    cfg = data["config"]
    model = _network(cfg)
    _load_official(model, data["state_dict"])
    if "num_parameters_including_index_sel" in cfg:
        n = sum(p.numel() for p in model.parameters()) + sum(s.git.index_sel.numel() for s in model.ske2grid.stages)
        assert n == int(cfg["num_parameters_including_index_sel"])
    x, labels = data["input"], data["labels"]

    model.eval()
    with torch.no_grad():
        feat = model.forward_features(x)
        torch.testing.assert_close(feat, data["feat_eval"], **TOL_NET)
        torch.testing.assert_close(model.forward_head(feat), data["logits_eval"], **TOL_NET)
        if "multiclip_input" in data:
            clips = data["multiclip_input"]
            torch.testing.assert_close(model(clips.flatten(0, 1)), data["multiclip_logits"], **TOL_NET)
            torch.testing.assert_close(multiclip_predict(model, clips), data["multiclip_prob"], **TOL_NET)

    model.train()
    logits = model(x)
    torch.testing.assert_close(logits, data["logits_train"], **TOL_NET)
    loss = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, data["loss_train"], atol=1e-5, rtol=0)
    loss.backward()
    # network gradients: the README's tolerance, with atol relative to the scale of the model's gradients
    scale = max(g.abs().max().item() for g in data["grads"].values())
    _compare_grads(model, data, dict(atol=max(TOL_NET_GRAD["atol"], 1e-6 * scale), rtol=TOL_NET_GRAD["rtol"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {rename_official_key(k, model) for k in data["trainable_params"]}
    _compare_bn_buffers(model, data)


@pytest.mark.parametrize("path", golden_files("ske2grid"))
def test_golden(path: Path) -> None:
    data = _load(path)
    cfg = data["config"]
    _check_honourable(cfg)
    torch.manual_seed(0)
    if "blocks" in cfg:
        _golden_network(data)
    else:
        _golden_front_end(data)


def test_golden_adjacency_matches_layout() -> None:
    """The fixtures' B is the COCO layout's; the spec's counts (36 ones, row sums) pin it independently."""
    b = layout_adjacency("coco")
    assert int(b.sum()) == 36
    assert b.sum(1).tolist() == [1, 3, 2, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2]
