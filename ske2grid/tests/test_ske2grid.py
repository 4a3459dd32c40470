"""Unit tests of the spec's CPU-checkable invariants (§h) for the core, the models and PLS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from ske2grid.models import create_model, multiclip_predict, stgcn_spatial_partitions
from ske2grid.pls import load_parent, new_stage_keys
from ske2grid.ske2grid import GraphNodeIndexTransform, Ske2Grid, greedy_assignment, layout_adjacency, straight_through

SMALL = dict(widths=[8, 16, 16])


def reference_greedy(scores: torch.Tensor) -> list[int]:
    """The release's scan (§b.3): row r walks its top-(r+1) columns in descending order, first free wins."""
    n = scores.shape[0]
    order = scores.topk(n, dim=-1)[1].tolist()
    free, out = [True] * n, []
    for r in range(n):
        for j in order[r][: r + 1]:
            if free[j]:
                free[j] = False
                out.append(j)
                break
    return out


# ---------------------------------------------------------------------------------------------- GIT (§h.2, h.3)
@pytest.mark.parametrize("n,seed", [(1, 0), (9, 1), (25, 2), (64, 3)])
def test_greedy_assignment_is_the_release_scan_and_a_permutation(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, n, generator=g) * 3
    perm = greedy_assignment(scores)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))
    assert perm.tolist() == reference_greedy(scores)


def test_greedy_assignment_invariant_to_row_shift_and_positive_scale() -> None:
    scores = torch.randn(36, 36, generator=torch.Generator().manual_seed(4))
    shifted = scores * torch.rand(36, 1).add(0.1) + torch.randn(36, 1) * 5
    assert torch.equal(greedy_assignment(scores), greedy_assignment(shifted))


def test_greedy_assignment_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match="square"):
        greedy_assignment(torch.rand(3, 4))
    bad = torch.rand(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        greedy_assignment(bad)


def test_straight_through_value_and_dense_gradient() -> None:
    git = GraphNodeIndexTransform(25)
    G = git()
    onehot = F.one_hot(git.assignment(), 25).float()
    assert (G.detach() - onehot).abs().max() <= 1e-6
    R = torch.randn(25, 25)
    (G * R).sum().backward()
    assert torch.equal(git.theta.grad, R)  # identity gradient, dense over all n^2 entries
    frozen = torch.rand(3, 3)  # no gradient wanted: the hard matrix itself
    assert straight_through(torch.eye(3), frozen) is not None and straight_through(torch.eye(3), frozen).equal(
        torch.eye(3))


def test_gather_equivalence_gradient_formula() -> None:
    """§b.3: dL/dΘ[r, j] = Σ_batch <dL/dZ_{s+1}[r], Z'[j]>."""
    git = GraphNodeIndexTransform(9)
    z = torch.randn(4, 9, 7)
    out = git() @ z
    dout = torch.randn_like(out)
    out.backward(dout)
    torch.testing.assert_close(git.theta.grad, torch.einsum("brk,bjk->rj", dout, z))
    torch.testing.assert_close(out, z[:, git.assignment()])


def test_assignment_recomputed_in_training_cached_at_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    import ske2grid.ske2grid as core

    calls = []
    real = core.greedy_assignment
    monkeypatch.setattr(core, "greedy_assignment", lambda s: calls.append(1) or real(s))
    git = GraphNodeIndexTransform(16)
    git.train()
    git(), git()
    assert len(calls) == 2  # every training forward
    git.eval()
    git(), git()
    assert len(calls) == 2  # Θ unchanged since the last training forward: the cached assignment
    with torch.no_grad():
        git.theta.mul_(-1)  # Θ changes -> recomputed once, index_sel rewritten, then cached again
    git(), git()
    assert len(calls) == 3
    assert torch.equal(git.index_sel.long(), git.assignment())


def test_front_end_matrix_cached_until_weights_change() -> None:
    front = Ske2Grid(grid_shape=(6, 6), progressive_joint_seq=[17, 25]).eval()
    x = torch.randn(2, 2, 5, 17, 3)
    with torch.no_grad():
        a = front(x)
        m1 = front.transform_matrix()
        assert front.transform_matrix() is m1
        front.stages[1].upt.weight.add_(0.5)
        assert front.transform_matrix() is not m1
        b = front(x)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------- UPT, B (§h.4, h.5)
@pytest.mark.parametrize("seq,grid", [([17], (5, 5)), ([17, 25, 36, 49], (8, 8)), ([25, 25], (6, 6))])
def test_upt_init_identity_then_convex_rows(seq, grid) -> None:
    layout = "coco" if seq[0] == 17 else "nturgb+d"
    front = Ske2Grid(layout, 3, grid, seq)
    for stage in front.stages:
        w = stage.upt.weight.detach()
        assert torch.equal(w[: stage.upt.num_in], torch.eye(stage.upt.num_in))
        new = w[stage.upt.num_in:]
        assert (new >= 0).all()
        torch.testing.assert_close(new.sum(1), torch.ones(len(new)))
    torch.testing.assert_close(front.effective_upt(0)[:front.num_joints], front.adjacency)


def test_coco_adjacency_counts_and_direction() -> None:
    b = layout_adjacency("coco")
    assert int(b.sum()) == 36 and not torch.equal(b, b.T)
    assert b.sum(1).tolist() == [1, 3, 2, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2]
    assert b[15, 13] == 1 and b[13, 15] == 0


def test_ntu_adjacency_uses_edge_list_not_inward() -> None:
    b = layout_adjacency("nturgb+d")
    assert int(b.sum()) == 25 + 24
    assert b[21, 22] == 1 and b[21, 7] == 0  # (22, 23) 1-based: the edge list, not inward's (22, 8)
    assert "adjacency" not in Ske2Grid("nturgb+d", 3, (5, 5), [25]).state_dict()


def test_adjacency_is_a_buffer_that_moves_with_the_module() -> None:
    front = Ske2Grid()
    assert "adjacency" in dict(front.named_buffers())
    front.double()
    assert front.adjacency.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- reshape (§h.6-h.8)
def test_reshape_order_puts_joint_k_at_cell_k() -> None:
    front = Ske2Grid().eval()
    with torch.no_grad():
        binv = torch.linalg.inv(front.adjacency)
        front.stages[0].upt.weight.copy_(torch.cat([binv, torch.zeros(8, 17)]))
        front.stages[0].git.theta.copy_(torch.eye(25))
    x = torch.randn(2, 2, 6, 17, 3)
    grid = front(x)  # eval: data BN is the identity (running mean 0, var 1, eps 1e-5)
    xbn = x / (1 + 1e-5) ** 0.5
    nm = xbn.reshape(4, 6, 17, 3).permute(0, 3, 1, 2)  # (N·M, C, T, V)
    for k in range(17):
        torch.testing.assert_close(grid[..., k // 5, k % 5], nm[..., k], atol=1e-5, rtol=1e-5)
    for k in range(17, 25):
        assert torch.all(grid[..., k // 5, k % 5] == 0)


def test_git_is_equivariant_to_node_relabelling() -> None:
    front = Ske2Grid().eval()
    x = torch.randn(1, 2, 4, 17, 3)
    with torch.no_grad():
        ref = front(x)
        q = torch.randperm(25)
        front.stages[0].upt.weight.copy_(front.stages[0].upt.weight[q])  # Z' rows permuted by q
        front.stages[0].git.theta.copy_(front.stages[0].git.theta[:, q])  # Θ columns consistently
        torch.testing.assert_close(front(x), ref)


@pytest.mark.parametrize("grid,seq,t", [((5, 5), [17], 100), ((8, 8), [17, 25, 36, 49], 9)])
def test_output_shapes(grid, seq, t) -> None:
    model = create_model("ske2grid", 11, grid_shape=grid, progressive_joint_seq=seq, widths=[4, 8, 8, 16])
    x = torch.randn(3, 2, t, 17, 3)
    feat = model.forward_features(x)  # two stride-2 blocks, like the released plan: T' = ceil(ceil(T/2)/2)
    assert feat.shape == (6, 16, math.ceil(math.ceil(t / 2) / 2), *grid)
    assert model(x).shape == (3, 11)


def test_grid_patch_and_features_stay_channels_last() -> None:
    """The per-frame and temporal views are free: the patch and every block's output are (B, T, H, W, C) in memory."""
    grid = Ske2Grid()(torch.randn(2, 2, 4, 17, 3))
    assert grid.is_contiguous(memory_format=torch.channels_last_3d)
    feat = create_model("ske2grid", 5, **SMALL).train().forward_features(torch.randn(2, 2, 8, 17, 3))
    assert feat.is_contiguous(memory_format=torch.channels_last_3d)


# ---------------------------------------------------------------------------------------------- PLS (§h.9)
def test_pls_freezing_and_gradients() -> None:
    model = create_model("ske2grid", 5, grid_shape=(7, 7), progressive_joint_seq=[17, 25, 36], **SMALL).train()
    F.cross_entropy(model(torch.randn(2, 2, 8, 17, 3)), torch.tensor([1, 3])).backward()
    stages = model.ske2grid.stages
    for s in stages[:-1]:
        assert s.upt.weight.grad is None and s.git.theta.grad is None
    assert stages[-1].upt.weight.grad is not None and stages[-1].git.theta.grad is not None
    assert model.ske2grid.data_bn.weight.grad is not None and model.head.fc.weight.grad is not None
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert "index_sel" not in {n.split(".")[-1] for n, _ in model.named_parameters()}


def test_pls_parent_to_child_loads_all_but_the_new_pair_and_stays_frozen() -> None:
    parent = create_model("ske2grid", 5, **SMALL)
    child = create_model("ske2grid", 5, grid_shape=(6, 6), progressive_joint_seq=[17, 25], **SMALL)
    load_parent(child, parent.state_dict())
    for k, v in parent.state_dict().items():
        if not k.endswith("index_sel"):  # derived: recomputed from the copied scores
            assert torch.equal(child.state_dict()[k], v), k
    assert torch.equal(child.ske2grid.stages[0].git.index_sel, parent.ske2grid.stages[0].git.assignment().float())
    assert new_stage_keys(child) == ["ske2grid.stages.1.upt.weight", "ske2grid.stages.1.git.theta",
                                     "ske2grid.stages.1.git.index_sel"]
    before = {k: v.clone() for k, v in child.ske2grid.stages[0].state_dict().items()}
    opt = torch.optim.SGD(child.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(child(torch.randn(2, 2, 8, 17, 3)), torch.tensor([0, 4])).backward()
        opt.step()
    for k, v in child.ske2grid.stages[0].state_dict().items():
        assert torch.equal(v, before[k]), f"frozen stage-0 {k} changed"


def test_pls_wrong_parent_errors_name_the_problem() -> None:
    child = create_model("ske2grid", 5, grid_shape=(7, 7), progressive_joint_seq=[17, 25, 36], **SMALL)
    d5 = create_model("ske2grid", 5, **SMALL)
    with pytest.raises(UserError, match=r"1 stage\(s\) ending at 5x5.*6x6"):
        load_parent(child, d5.state_dict())
    d6 = create_model("ske2grid", 5, grid_shape=(6, 6), progressive_joint_seq=[17, 25], **SMALL)
    state = d6.state_dict()
    del state["blocks.1.grid_conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing: blocks\.1\.grid_conv\.weight; unexpected: extra\.weight"):
        load_parent(child, state)
    wide = create_model("ske2grid", 7, grid_shape=(6, 6), progressive_joint_seq=[17, 25], **SMALL)
    with pytest.raises(UserError, match=r"shape mismatch: head\.fc\.weight"):
        load_parent(child, wide.state_dict())


# ---------------------------------------------------------------------------------------------- head, test (§h.10-11)
def test_head_averages_persons_including_zero_padding() -> None:
    model = create_model("ske2grid", 6, **SMALL).eval()
    x = torch.randn(2, 2, 8, 17, 3)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model(x.flip(1)), ref)
        x0 = x.clone()
        x0[:, 1] = 0
        assert not torch.allclose(model(x0), ref)


def test_multiclip_probabilities_sum_to_one() -> None:
    model = create_model("ske2grid", 6, **SMALL).eval()
    with torch.no_grad():
        p = multiclip_predict(model, torch.randn(2, 3, 2, 8, 17, 3))
    assert p.shape == (2, 6)
    torch.testing.assert_close(p.sum(1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- ST-GCN, errors
def test_stgcn_partitions_and_forward() -> None:
    A = stgcn_spatial_partitions("coco")
    assert A.shape == (3, 17, 17)
    torch.testing.assert_close(A.sum(dim=(0, 1)), torch.ones(17))  # each column normalised over its neighbourhood
    model = create_model("stgcn", 4, layout="nturgb+d", **SMALL)
    assert model(torch.randn(2, 2, 8, 25, 3)).shape == (2, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid_shape=(5, 6)), "perfect square"),
    (dict(progressive_joint_seq=[25]), "must start with the layout's 17 joints"),
    (dict(grid_shape=(4, 4)), "must not decrease"),
    (dict(layout="openpose"), "unknown skeleton layout"),
    (dict(temperature=30), "unknown option"),
])
def test_bad_model_config_is_one_line(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        create_model("ske2grid", 5, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_input_shape_names_the_layout() -> None:
    with pytest.raises(ValueError, match=r"\(N, M, T, 17, 3\).*coco"):
        Ske2Grid()(torch.randn(1, 2, 4, 25, 3))
