"""Iteration budgets, step-wise evaluation, the poly schedule and clipping of named parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import OptimConfig, ScheduleConfig, TrainerConfig
from common.engine import RunInfo, Trainer, build_scheduler
from common.errors import UserError
from common.results import read_record
from common.tasks import ClassificationTask, Classifier

from .test_engine import NoisyBlobs, _net


def _trainer(run_dir: Path, sched: ScheduleConfig | None = None, clip_params=None, **over) -> Trainer:
    cfg = TrainerConfig(**{**dict(epochs=1, iterations=10, global_batch=16, workers=0, log_every=2, seed=1,
                                  eval_every_steps=4), **over})
    net = _net()
    return Trainer(Classifier(net), NoisyBlobs(), NoisyBlobs(24), cfg, OptimConfig(name="sgd", lr=0.02),
                   sched or ScheduleConfig(name="poly", power=0.9), run_dir, task=ClassificationTask(), model=net,
                   clip_params=clip_params, run_info=RunInfo("test", "budget", None, "blobs", True, "smoke"))


def test_poly_schedule_over_an_iteration_budget() -> None:
    """Spec-style poly: step i of I uses lr (1 - i/I)^0.9, whatever the epoch length."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = build_scheduler(opt, ScheduleConfig(name="poly", power=0.9), epochs=7, steps_per_epoch=6, total_steps=40)
    lrs = []
    for i in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(num_updates=i + 1)
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[-1] == pytest.approx(0.02 * (1 / 40) ** 0.9)
    assert lrs[17] == pytest.approx(0.02 * (1 - 17 / 40) ** 0.9)


def test_iteration_budget_is_complete_and_evaluates_every_n_steps(tmp_path: Path) -> None:
    # 96 samples / 16 = 6 steps per epoch: the budget of 10 ends inside the second epoch
    t = _trainer(tmp_path / "run")  # its own folder: resume=auto looks at sibling runs
    metrics = t.fit()
    assert t.global_step == 10 and t.epochs == 2
    assert [h["epoch"] for h in t.history] == [0, 1, 1]  # steps 4, 8 and the final 10
    rec = read_record(tmp_path / "run" / "result.json")
    assert rec.complete and metrics["steps"] == 10
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 10


def test_budget_resume_is_exact(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full")
    full.fit()
    _trainer(tmp_path / "cut", max_steps=5).fit()
    assert not read_record(tmp_path / "cut" / "result.json").complete
    resumed = _trainer(tmp_path / "cut", resume="auto")
    resumed.fit()
    for k, v in full.state_dict()["model"].items():
        assert torch.equal(v, resumed.state_dict()["model"][k]), k
    assert read_record(tmp_path / "cut" / "result.json").complete


def test_clipping_touches_only_the_named_parameters(tmp_path: Path) -> None:
    t = _trainer(tmp_path, clip_grad=1e-6, iterations=1, eval_every_steps=0)
    head = list(t.model[-1].parameters())
    body = [p for p in t.model.parameters() if all(p is not q for q in head)]
    t.clip_params = head
    for p in t.model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in t.model.parameters()]
    t._optimizer_step()
    moved = {id(p): (p.detach() - b).abs().max().item() for p, b in zip(t.model.parameters(), before)}
    assert all(moved[id(p)] < 1e-4 for p in head)  # clipped to a norm of 1e-6 (+ weight decay)
    assert all(moved[id(p)] > 1e-2 for p in body)  # not clipped: the full lr step (0.02)


def test_bad_budget_values_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="trainer.iterations"):
        TrainerConfig(iterations=0)
    with pytest.raises(UserError, match="trainer.eval_every_steps"):
        TrainerConfig(eval_every_steps=-1)
    with pytest.raises(UserError, match="schedule.power"):
        ScheduleConfig(name="poly", power=0)
