"""CRD (the NORM+CRD term): the loss against a float64 re-statement of RepDistiller's equations, the memory-bank
update and its invariants, gradient routing, the contrastive sampler, and the rows' experiments."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from common.config import compose
from norm.crd import ContrastiveSampleDataset, CRDLoss, nce_loss, unpack_targets
from norm.distiller import NORMDistiller
from norm.models import NORMStudent, create_model
from norm.tests.test_train import REPO
from norm.train import CONFIG_DIR, parse

ROWS = yaml.safe_load((REPO / "norm" / "paper.yaml").read_text())["rows"]
CRD_ROWS = [r for r in ROWS if r.get("setting") == "NORM+CRD"]


def _reference_step(f_s, f_t, w_s, b_s, w_t, b_t, mem_s, mem_t, index, contrast, z_s, z_t, n_data, t, m):
    """RepDistiller's CRD step written out per sample in float64: returns (loss, new banks, Z's)."""
    eps = 1e-7
    bsz, k1 = contrast.shape
    k = k1 - 1
    v_s = [(w_s @ f_s[i] + b_s) / torch.linalg.vector_norm(w_s @ f_s[i] + b_s) for i in range(bsz)]
    v_t = [(w_t @ f_t[i] + b_t) / torch.linalg.vector_norm(w_t @ f_t[i] + b_t) for i in range(bsz)]
    raw_s = torch.tensor([[math.exp(float(v_s[i] @ mem_t[contrast[i, j]]) / t) for j in range(k1)]
                          for i in range(bsz)], dtype=torch.float64)
    raw_t = torch.tensor([[math.exp(float(v_t[i] @ mem_s[contrast[i, j]]) / t) for j in range(k1)]
                          for i in range(bsz)], dtype=torch.float64)
    z_s = float(raw_s.mean()) * n_data if z_s is None else z_s
    z_t = float(raw_t.mean()) * n_data if z_t is None else z_t
    loss = 0.0
    for raw, z in ((raw_s, z_s), (raw_t, z_t)):
        for i in range(bsz):
            # posterior h(x) = P(x) / (P(x) + K P_n): -log h(pos) - sum_neg log(1 - h(neg))
            pos = raw[i, 0] / z
            loss -= math.log(pos / (pos + k / n_data + eps))
            for j in range(1, k1):
                loss -= math.log((k / n_data) / (raw[i, j] / z + k / n_data + eps))
    loss /= bsz
    new_s, new_t = mem_s.clone(), mem_t.clone()
    for i in range(bsz):
        for new, old, v in ((new_s, mem_s, v_s[i]), (new_t, mem_t, v_t[i])):
            row = m * old[index[i]] + (1 - m) * v
            new[index[i]] = row / torch.linalg.vector_norm(row)
    return loss, new_s, new_t, z_s, z_t


def _crd(n_data=20, k=6, feat_dim=8, seed=0) -> CRDLoss:
    torch.manual_seed(seed)
    return CRDLoss(5, 7, n_data, feat_dim, temperature=0.07, momentum=0.3).double()  # m != 1 - m


def test_crd_loss_and_memory_update_match_a_float64_restatement() -> None:
    crd = _crd()
    w_s, b_s = crd.embed_s.linear.weight.detach(), crd.embed_s.linear.bias.detach()
    w_t, b_t = crd.embed_t.linear.weight.detach(), crd.embed_t.linear.bias.detach()
    z_s = z_t = None
    gen = torch.Generator().manual_seed(1)
    for _step in range(3):  # Z is set at the first step only; the banks keep moving
        f_s, f_t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
        index = torch.randperm(20, generator=gen)[:4]
        contrast = torch.cat([index[:, None], torch.randint(20, (4, 6), generator=gen)], 1)
        mem_s, mem_t = crd.memory.memory_s.clone(), crd.memory.memory_t.clone()
        ref_loss, ref_s, ref_t, z_s, z_t = _reference_step(f_s, f_t, w_s, b_s, w_t, b_t, mem_s, mem_t, index,
                                                           contrast, z_s, z_t, 20, 0.07, 0.3)
        loss = crd(f_s, f_t, index, contrast).detach()
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
        assert float(crd.memory.z_s) == pytest.approx(z_s, rel=1e-12)
        assert float(crd.memory.z_t) == pytest.approx(z_t, rel=1e-12)
        torch.testing.assert_close(crd.memory.memory_s, ref_s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd.memory.memory_t, ref_t, rtol=1e-12, atol=1e-12)


def test_memory_update_normalises_touched_rows_only_and_eval_leaves_the_banks() -> None:
    crd = _crd(n_data=30)
    before = crd.memory.memory_s.clone()
    index = torch.tensor([3, 7, 11])
    crd(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), index,
        torch.cat([index[:, None], torch.randint(30, (3, 6))], 1))
    norms = crd.memory.memory_s.norm(dim=1)
    torch.testing.assert_close(norms[index], torch.ones(3, dtype=torch.float64))
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crd.memory.memory_s[untouched], before[untouched])
    assert not torch.allclose(crd.memory.memory_s[index], before[index])
    # eval mode: scores only, no update, Z kept
    state = {k: v.clone() for k, v in crd.memory.state_dict().items()}
    crd.eval()(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), index,
               torch.cat([index[:, None], torch.randint(30, (3, 6))], 1))
    assert all(torch.equal(v, crd.memory.state_dict()[k]) for k, v in state.items())


def test_nce_loss_is_the_noise_contrastive_estimator() -> None:
    # scores far above K*P_n for the positive and far below for negatives -> loss near 0; reversed -> large
    n_data, k = 1000, 9
    good = torch.cat([torch.full((2, 1), 1e3), torch.full((2, k), 1e-9)], 1)
    bad = torch.cat([torch.full((2, 1), 1e-9), torch.full((2, k), 1e3)], 1)
    assert float(nce_loss(good, n_data)) < 1e-3  # eps = 1e-7 in the denominators
    assert float(nce_loss(bad, n_data)) > 100
    # at P = K * P_n everywhere every posterior is 1/2: loss = (K + 1) log 2
    half = torch.full((3, k + 1), k / n_data, dtype=torch.float64)
    assert float(nce_loss(half, n_data)) == pytest.approx((k + 1) * math.log(2), rel=1e-5)


def test_crd_gradient_reaches_the_embeddings_and_student_feature_only() -> None:
    crd = _crd()
    f_s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    index = torch.arange(4)
    crd(f_s, f_t, index, torch.cat([index[:, None], torch.randint(4, 20, (4, 6))], 1)).backward()
    assert f_t.grad is None  # the teacher feature enters detached
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for p in crd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in crd.buffers())


def test_norm_crd_distiller_routes_gradients_and_keeps_the_teacher_frozen() -> None:
    torch.manual_seed(0)
    teacher = create_model("resnet20", 10)
    student = NORMStudent(create_model("resnet20", 10, norm_variant=True), teacher.num_features, n=2)
    crd = CRDLoss(student.net.num_features, teacher.num_features, n_data=16, feat_dim=8)
    d = NORMDistiller(student, teacher, ce_weight=0.1, crd=crd, crd_weight=2.5).train()
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ds = ContrastiveSampleDataset([(torch.randn(3, 16, 16), i % 4) for i in range(16)], [i % 4 for i in range(16)],
                                  k=5)
    images, targets = zip(*(ds[i] for i in range(4)))
    logits, losses = d.forward_train(torch.stack(images), torch.stack(targets))
    assert set(losses) == {"loss_ce", "loss_norm", "loss_crd"} and logits.shape == (4, 10)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in bn_before.items())
    for name, p in [*student.named_parameters(), *crd.named_parameters()]:
        assert p.grad is not None, name
    assert {id(p) for p in d.extra_parameters()} >= {id(p) for p in crd.parameters()}
    with pytest.raises(ValueError, match="ContrastiveSampleDataset"):
        d.forward_train(torch.stack(images), torch.arange(4))


def test_contrastive_sampler_draws_negatives_from_other_classes_as_repdistiller() -> None:
    labels = [0] * 3 + [1] * 5 + [2] * 4 + [1] * 2  # unsorted, unbalanced
    data = [(torch.zeros(1), y) for y in labels]
    torch.manual_seed(0)
    few = ContrastiveSampleDataset(data, labels, k=4)  # k <= negatives: without replacement
    many = ContrastiveSampleDataset(data, labels, k=40)  # k > negatives: with replacement
    relax = ContrastiveSampleDataset(data, labels, k=4, mode="relax")
    seen: dict[int, set[int]] = {i: set() for i in range(len(labels))}
    for _ in range(200):
        for i, y in enumerate(labels):
            _, packed = few[i]
            label, index, contrast = unpack_targets(packed[None])
            assert (int(label), int(index), int(contrast[0, 0])) == (y, i, i)  # exact: the positive is i
            neg = contrast[0, 1:].tolist()
            assert len(neg) == 4 == len(set(neg)) and all(labels[j] != y for j in neg)
            seen[i].update(neg)
            neg_many = many[i][1][3:].tolist()
            assert len(neg_many) == 40 and all(labels[j] != y for j in neg_many)
            pos = int(relax[i][1][2])
            assert labels[pos] == y
    for i, y in enumerate(labels):  # every other-class sample is reachable, no same-class one
        assert seen[i] == {j for j, c in enumerate(labels) if c != y}
    with pytest.raises(ValueError, match="one label per sample"):
        ContrastiveSampleDataset(data, labels[:-1])


def test_every_norm_crd_row_is_the_norm_row_plus_the_official_crd_term() -> None:
    assert len(CRD_ROWS) == 13  # the NORM+CRD column of Tables 1 (7 pairs) and 2 (6 pairs)
    for row in CRD_ROWS:
        base_id = row["id"].removesuffix("_crd")
        base = next(r for r in ROWS if r["id"] == base_id)
        assert row["norm_top1"] == base["metrics"]["top1"]
        assert all(row[k] == base[k] for k in ("params", "params_ft", "teacher", "student", "teacher_channels", "N"))
        cfg, base_cfg = compose(CONFIG_DIR, [f"experiment={row['id']}"]), compose(CONFIG_DIR, [f"experiment={base_id}"])
        assert (cfg.name, cfg.row) == (row["id"], row["id"])
        r, b = parse(cfg), parse(base_cfg)
        assert r.method.crd is not None and b.method.crd is None
        c = r.method.crd
        assert (c.weight, c.feat_dim, c.nce_k, c.nce_t, c.nce_m, c.mode) == (2.5, 128, 16384, 0.07, 0.5, "exact")
        r.method.crd = None
        assert (r.method, r.model, r.trainer, r.optim, r.schedule, r.data) == (b.method, b.model, b.trainer, b.optim,
                                                                               b.schedule, b.data)


def test_crd_needs_integer_labels(tmp_path) -> None:
    from common.errors import UserError
    from norm.train import run

    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20_crd", "trainer.mixup=0.2",
                               f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="method.crd"):
        run(cfg)
    cfg = compose(CONFIG_DIR, ["experiment=cifar100_resnet56_resnet20_crd", "method.crd.mode=soft",
                               f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="method.crd.mode='soft'"):
        run(cfg)


def test_embedding_is_unit_norm_and_float32_under_bf16_autocast() -> None:
    crd = CRDLoss(5, 7, 10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = crd.embed_s(torch.randn(3, 5))
        loss = crd(torch.randn(3, 5), torch.randn(3, 7), torch.arange(3),
                   torch.cat([torch.arange(3)[:, None], torch.randint(10, (3, 4))], 1))
    assert v.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))


def test_norm_crd_smoke_entry_point_trains_and_resumes_the_memory_bank(tmp_path) -> None:
    from norm.tests.test_train import TINY, _train

    args = ["experiment=cifar100_resnet56_resnet20_crd", *TINY, "method.n=2", f"output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    first = _train([*args, "trainer.max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    z_s, bank = float(state["crd.memory.z_s"]), state["crd.memory.memory_s"]
    assert z_s > 0 and bank.shape == (40, 128)  # one row per training sample (TINY: 10 classes x 4)
    touched = (bank.norm(dim=1) - 1).abs() < 1e-5
    assert touched.sum() == 2 * 8  # two steps of batch 8: those rows moved and were re-normalised
    second = _train([*args, "trainer.max_steps=3"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert float(state["crd.memory.z_s"]) == z_s  # Z is fixed at the first step and survives the resume
    assert ((state["crd.memory.memory_s"].norm(dim=1) - 1).abs() < 1e-5).sum() == 3 * 8
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["row"] == "cifar100_resnet56_resnet20_crd" and result["metrics"]["steps"] == 3
    assert result["extra"]["params_deployed"] == sum(p.numel() for p in create_model("resnet20", 10).parameters())
