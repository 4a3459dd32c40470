"""The recipe pieces noah.train adds to common's loop: official parameter groups (spec d.1-d.3), repeated
augmentation, the EMA policy (spec d.2 / d.4) and the per-epoch staircase schedules (spec d.1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.config import ScheduleConfig, compose, validate
from common.engine import build_scheduler
from noah.models import create_model
from noah.train import CONFIG_DIR, EmaPolicy, RepeatedAugSampler, ReportEma, param_groups


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_nowd_bn_groups_decay_only_weights_of_two_or_more_dims() -> None:
    model = create_model("shufflenetv2_050", num_classes=10)
    decay, no_decay = param_groups(model, 4e-5, no_decay_1d=True)
    named = dict(model.named_parameters())
    official = {n for n, p in named.items() if "weight" in n and p.ndim >= 2}  # utils/misc.py get_parameters
    assert {n for n, p in named.items() if id(p) in _ids(decay)} == official
    assert {"head.query.bias", "head.value.bias"} <= {n for n, p in named.items() if id(p) in _ids(no_decay)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 4e-5
    (everything,) = param_groups(model, 1e-4, no_decay_1d=False)  # official default: all decayed
    assert len(everything["params"]) == len(named)


@pytest.mark.parametrize(("name", "head", "exempt"), [
    ("deit_tiny_050_patch16_224", "noah", {"backbone.pos_embed"}),
    ("deit_tiny_050_patch16_224", "baseline", {"backbone.pos_embed", "backbone.cls_token"}),
    ("pvt_tiny_050", "noah", set()),  # NOAH-PVT's no_weight_decay() is empty: pos_embed* decayed (spec d.3)
    ("pvt_tiny_050", "baseline", {"backbone.cls_token"}),
])
def test_adamw_groups_follow_no_weight_decay(name: str, head: str, exempt: set[str]) -> None:
    with torch.device("meta"):
        model = create_model(name, head=head, num_classes=10)
    decay, no_decay = param_groups(model, 0.05, no_decay_1d=True)
    named = dict(model.named_parameters())
    multi_dim_exempt = {n for n, p in named.items() if id(p) in _ids(no_decay) and p.ndim > 1}
    assert multi_dim_exempt == exempt
    assert {n for n in named if "pos_embed" in n} & {n for n, p in named.items() if id(p) in _ids(decay)} == (
        {n for n in named if "pos_embed" in n} if name.startswith("pvt") else set())  # PVT decays pos_embed*


@pytest.mark.parametrize("world_size", [2, 3])
def test_repeated_augmentation_puts_copies_on_different_ranks_in_the_same_step(world_size: int) -> None:
    """DeiT's RASampler (spec d.2): the copies of an image sit at the same index of different ranks' shards,
    i.e. in the same step on different GPUs: all 3 with 3 ranks; with 2 ranks two of them (the third in the
    next local slot). An epoch holds ~N samples of N / 3 images; a new order each epoch; resume skips."""
    n, repeats = 96, 3
    ranks = [RepeatedAugSampler(n, r, world_size, repeats) for r in range(world_size)]
    shards = [list(s) for s in ranks]
    assert all(len(s) == len(ranks[0]) == n // world_size for s in shards)  # N < 256: ceil(N / W) per rank
    where: dict[int, list[tuple[int, int]]] = {}  # image -> [(rank, index in that rank's shard)]
    for rank, shard in enumerate(shards):
        for index, image in enumerate(shard):
            where.setdefault(image, []).append((rank, index))
    assert len(where) == n // repeats and all(len(w) == repeats for w in where.values())
    for image, copies in where.items():
        if world_size >= repeats:  # every copy on its own rank, all at one index (one step, any batch size)
            assert len({r for r, _ in copies}) == repeats and len({i for _, i in copies}) == 1, (image, copies)
        else:
            by_index: dict[int, set[int]] = {}
            for r, i in copies:
                by_index.setdefault(i, set()).add(r)
            assert max(len(rs) for rs in by_index.values()) == world_size, (image, copies)  # on both ranks at once
            assert max(by_index) - min(by_index) <= 1  # the third copy in the adjacent slot
    if world_size >= repeats:  # seen through batches of 4: no rank holds two copies of an image in one step
        assert all(len(set(shard[i:i + 4])) == 4 for shard in shards for i in range(0, len(shard) - 3, 4))
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != shards  # a new permutation each epoch
    ranks[0].set_position(0, 5)
    assert list(ranks[0]) == shards[0][5:] and len(ranks[0]) == len(shards[0]) - 5  # exact resume


def test_ema_policy_skips_or_reports_the_ema() -> None:
    class Task:
        primary, higher_is_better = "top1", True

        def evaluate(self, model, loader, ctx):
            return {"top1": 1.0}

    live, ema = nn.Linear(1, 1), nn.Linear(1, 1)
    kept = EmaPolicy(Task(), live, ema_evaluate=False)
    assert kept.primary == "top1" and kept.evaluate(ema, None, None) == {} and kept.evaluate(live, None, None)
    used = EmaPolicy(Task(), live, ema_evaluate=True)
    assert used.primary == "ema_top1" and used.evaluate(ema, None, None) == {"top1": 1.0}
    metrics, extra = {"top1": 70.0, "ema_top1": 72.0, "steps": 5.0}, {}
    ReportEma().on_fit_end(metrics, extra)
    assert metrics == {"top1": 72.0, "live_top1": 70.0, "steps": 5.0} and extra["reported_weights"] == "ema"


@pytest.mark.parametrize(("row", "expected"), [
    ("noah_resnet18", lambda e: 0.1 * 0.1 ** sum(e >= m for m in (30, 60, 90))),
    ("noah_mobilenetv2_100", lambda e: 0.05 * (1 + math.cos(math.pi * e / 150)) / 2),
    ("noah_shufflenetv2_100", lambda e: 0.5 * (1 - e / 240)),
])
def test_cnn_schedules_are_per_epoch_staircases(row: str, expected) -> None:
    cfg = compose(CONFIG_DIR, [f"experiment={row}"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=float(cfg.optim.lr))
    epochs = int(cfg.trainer.epochs)
    sched = build_scheduler(opt, validate(cfg.schedule, ScheduleConfig, "schedule."), epochs, 7)
    for e in range(epochs):
        sched.step(e)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected(e), rel=1e-6, abs=1e-12), e
