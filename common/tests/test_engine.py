"""The shared loop: exact resume, SIGTERM save, gradient accumulation, EMA and schedules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from common.checkpoint import load_checkpoint
from common.config import OptimConfig, ScheduleConfig, TrainerConfig
from common.engine import Trainer
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier

REPO = Path(__file__).resolve().parents[2]


class NoisyBlobs(Dataset):
    """Learnable 2-class data whose every read draws fresh augmentation noise from torch's RNG."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(3, 8, 8), int(self.y[i])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _trainer(run_dir: Path, workers: int = 0, **over) -> Trainer:
    cfg = TrainerConfig(**{**dict(epochs=3, global_batch=16, max_device_batch=8, workers=workers, log_every=2,
                                  ema_decay=0.9, clip_grad=1.0, seed=3), **over})
    optim = OptimConfig(name="sgd", lr=0.05, weight_decay=1e-4)
    sched = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_lr=1e-3)
    net = _net()
    return Trainer(Classifier(net, label_smoothing=0.1), NoisyBlobs(), NoisyBlobs(24), cfg, optim, sched, run_dir,
                   task=ClassificationTask(), model=net)


def _assert_same(a: Trainer, b: Trainer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ema"].items():
        assert torch.equal(v, sb["ema"][k]), k
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][pid]["momentum_buffer"])
    assert sa["global_step"] == sb["global_step"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_bit_identical(tmp_path: Path, workers: int) -> None:
    full = _trainer(tmp_path / "full", workers)
    full_metrics = full.fit()
    assert full.global_step == 3 * (96 // 16)

    # Stop after 4 optimizer steps (mid-epoch 0: 6 steps per epoch), then continue in the same run dir.
    first = _trainer(tmp_path / "cut", workers, max_steps=4)
    first.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step_in_epoch"] == 4
    resumed = _trainer(tmp_path / "cut", workers, resume="auto")
    resumed_metrics = resumed.fit()
    _assert_same(full, resumed)
    assert resumed_metrics["top1"] == full_metrics["top1"]


def test_resume_with_other_accumulation_trains_the_same_steps(tmp_path: Path) -> None:
    """Stopped with 2 x 8 accumulation, resumed with 1 x 16: the epoch is not re-counted."""
    _trainer(tmp_path / "r", max_steps=3).fit()
    resumed = _trainer(tmp_path / "r", max_device_batch=16)
    resumed.fit()
    assert resumed.global_step == 3 * (96 // 16)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]  # the max_steps eval, then one per epoch


def test_resume_refuses_another_recipe(tmp_path: Path) -> None:
    _trainer(tmp_path / "g", max_steps=2).fit()
    with pytest.raises(UserError, match="trainer.global_batch=16, this run has 32"):
        _trainer(tmp_path / "g", global_batch=32).fit()


def test_max_steps_on_an_epoch_boundary_then_resume(tmp_path: Path) -> None:
    _trainer(tmp_path / "b", max_steps=6).fit()  # exactly one epoch
    resumed = _trainer(tmp_path / "b")
    resumed.fit()
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and resumed.global_step == 18


def test_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """global batch 16 as 2 x 8 accumulated gives the same step as 1 x 16 (no BN, no dropout)."""

    def run(max_dev: int) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
        cfg = TrainerConfig(epochs=1, global_batch=16, max_device_batch=max_dev, workers=0, seed=1, log_every=100)
        t = Trainer(Classifier(net), NoisyBlobs(32), None, cfg, OptimConfig(lr=0.1), ScheduleConfig(name="constant"),
                    tmp_path / f"acc{max_dev}", task=ClassificationTask())
        t.fit()
        return net

    a, b = run(8), run(16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine_schedule(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "s", epochs=2)
    lrs = []
    t.logger.log = lambda rec, step=None: lrs.append(rec.get("lr")) if "lr" in rec else None  # type: ignore[method-assign]
    t.cfg.log_every = 1
    t.fit()
    # logged after each step: steps 1-5 are in the 6-step warmup, then timm's cosine (no warmup prefix)
    warm, decay = lrs[:5], lrs[5:]
    assert all(x < y for x, y in zip(warm, warm[1:]))
    assert all(x >= y for x, y in zip(decay, decay[1:])) and decay[-1] < decay[0]


def test_too_small_dataset_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fewer than one global batch"):
        Trainer(Classifier(_net()), NoisyBlobs(8), None, TrainerConfig(global_batch=16), OptimConfig(),
                ScheduleConfig(), tmp_path, task=ClassificationTask())


def test_sigterm_saves_then_resume_finishes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "common.example.train", "profile=smoke", "trainer.max_steps=null",
           "trainer.epochs=3", "trainer.log_every=1", f"output_dir={tmp_path}",
           "hydra.run.dir=" + str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert metrics.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "resume with trainer.resume=auto" in out
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["global_step"] > 0
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    assert (tmp_path / "run" / "result.json").exists() and (tmp_path / "run" / "curves.png").exists()


@pytest.mark.parametrize("per_step", [False, True])
def test_multistep_milestones_drop_at_the_start_of_the_epoch(per_step: bool) -> None:
    """As torch's MultiStepLR (RepDistiller's [150, 180, 210]): epoch 150 is the first at 0.1x."""
    from common.engine import build_scheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    upe = 4
    sched = build_scheduler(opt, ScheduleConfig(name="multistep", milestones=[150, 180, 210], per_step=per_step),
                            240, upe)
    lrs = []
    for epoch in range(240):
        if not per_step:
            sched.step(epoch)
        for i in range(upe):
            lrs.append(opt.param_groups[0]["lr"])
            if per_step:
                sched.step_update(num_updates=epoch * upe + i + 1)
    per_epoch = lrs[::upe]
    assert per_epoch[149] == pytest.approx(0.05) and per_epoch[150] == pytest.approx(0.005)
    assert per_epoch[179] == pytest.approx(0.005) and per_epoch[180] == pytest.approx(0.0005)
    assert per_epoch[210] == pytest.approx(0.00005)
    assert len(set(lrs[150 * upe: 151 * upe])) == 1  # no change inside the epoch


def test_poly_power_one_is_the_per_epoch_linear_staircase() -> None:
    """schedule.name=poly, power=1, per_step=False: lr_e = lr0 (1 - e/E), e = 0..E-1 (a linear decay)."""
    from common.engine import build_scheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_scheduler(opt, ScheduleConfig(name="poly", power=1.0, per_step=False), 8, 3)
    lrs = []
    for epoch in range(8):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5 * (1 - e / 8) for e in range(8)])


def test_precise_bn_is_an_exact_average_of_batch_statistics() -> None:
    from common.dist import DistEnv
    from common.engine import precise_bn

    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1)
    bn.running_mean.fill_(5.0)  # stale statistics, as after a moving temperature
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(4)]
    used = precise_bn(bn, iter(batches + [torch.full((8, 3), 1e6)]), 4, DistEnv())
    assert used == 4 and bn.momentum == 0.1 and bn.training
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0))


def test_precise_bn_before_evaluation_leaves_training_rng_untouched(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "p", precise_bn_batches=2, ema_decay=None)
    bn = next(m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.fill_(100.0)
    rng = torch.get_rng_state()
    t.evaluate()
    assert torch.equal(torch.get_rng_state(), rng)
    assert bn.running_mean.abs().max() < 10  # recomputed from training batches
    assert int(bn.num_batches_tracked) == 2


def test_loop_writes_the_result_record(tmp_path: Path) -> None:
    import json

    from common.engine import RunInfo

    t = _trainer(tmp_path / "r", max_steps=2)
    t.run_info = RunInfo("common", "blobs", None, "blobs", synthetic=True, profile="smoke")
    t.fit()
    record = json.loads((tmp_path / "r" / "result.json").read_text())
    assert (record["kind"], record["checkpoint"], record["data"], record["selection"]) == (
        "trained", "ours", "synthetic", "last")
    assert record["complete"] is False and record["seed"] == 3 and record["metrics"]["steps"] == 2


def test_loop_record_sees_synthetic_data_in_a_real_layout_report(tmp_path: Path) -> None:
    """A full-profile run named like a real set but reading our synthetic writer's folder is `synthetic`, so the
    report never counts it as a reproduction (issue 8 item 2)."""
    import json

    from common.data import write_synthetic_cifar
    from common.engine import RunInfo

    root = tmp_path / "cifar"
    write_synthetic_cifar(root, num_classes=10, train_per_class=1, test_per_class=1)
    for name, data_root, want in (("fake", root, "synthetic"), ("real", tmp_path / "elsewhere", "real")):
        t = _trainer(tmp_path / name, max_steps=1)
        t.run_info = RunInfo("common", "blobs", None, "cifar10", synthetic=False, profile="full",
                             data_root=str(data_root))
        t.fit()
        record = json.loads((tmp_path / name / "result.json").read_text())
        assert (record["dataset"], record["data"], record["profile"]) == ("cifar10", want, "full")


class Lines(Dataset):
    """y = 2 x + 1 with a little noise: a regression the loop should fit."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = 2 * self.x + 1 + 0.01 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class LinearRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor):
        pred = self.net(x)
        return pred, {"loss_l2": ((pred - y) ** 2).mean()}


def test_regression_task_selects_on_the_heldout_split(tmp_path: Path) -> None:
    import json

    from common.engine import RunInfo
    from common.tasks import RegressionTask

    def score(pred, target, index, dataset):
        assert torch.equal(target, dataset.y[index])  # gathered in dataset order
        return {"err": float((pred - target).abs().mean())}

    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=4, global_batch=16, workers=0, log_every=1, seed=0, selection="best_heldout")
    t = Trainer(LinearRegressor(), Lines(64, 0), Lines(20, 1), cfg, OptimConfig(name="sgd", lr=0.1, weight_decay=0),
                ScheduleConfig(name="constant"), tmp_path / "g", task=RegressionTask(score, primary="err"),
                heldout_set=Lines(12, 2), run_info=RunInfo("common", "lines", None, "lines", True, "smoke"))
    metrics = t.fit()
    record = json.loads((tmp_path / "g" / "result.json").read_text())
    assert record["selection"] == "best_heldout" and record["complete"] is True
    errs = [h["heldout/err"] for h in t.history]
    assert errs[-1] < errs[0] and record["extra"]["best_epoch"] == 1 + errs.index(min(errs))
    assert metrics["err"] == pytest.approx(record["metrics"]["err"]) and "best_err" not in metrics
    with pytest.raises(UserError, match="best_heldout needs a held-out split"):
        Trainer(LinearRegressor(), Lines(64, 0), Lines(20, 1), cfg, OptimConfig(), ScheduleConfig(), tmp_path / "h",
                task=RegressionTask(score, primary="err"))


def test_step_end_hook_sees_every_optimizer_step_after_it_ran(tmp_path: Path) -> None:
    from common.engine import Hook, Progress

    t = _trainer(tmp_path / "r", epochs=2)
    seen: list[tuple[int, int]] = []

    class Record(Hook):
        def on_step_start(self, progress: Progress) -> None:
            seen.append((0, progress.step))

        def on_step_end(self, progress: Progress) -> None:
            seen.append((1, progress.step))

    t.hooks.append(Record())
    t.fit()
    steps = t.global_step
    assert seen == [(k, s + k) for s in range(steps) for k in (0, 1)]  # end: the step count after the step


def test_multilabel_task_scores_map_loss_and_prevalence() -> None:
    """MultiLabelTask.evaluate: perfect scores give 100 mAP; prevalence is the positive fraction in %."""
    from torch.utils.data import DataLoader, TensorDataset

    from common.dist import DistEnv
    from common.tasks import EvalContext, MultiLabelTask

    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(40, 5, generator=g) < 0.3).float()
    targets[0] = 1.0  # every class has a positive
    loader = DataLoader(TensorDataset(targets.clone(), targets), batch_size=7)
    perfect = nn.Linear(5, 5)
    with torch.no_grad():
        perfect.weight.copy_(torch.eye(5) * 10)
        perfect.bias.fill_(-5)
    task = MultiLabelTask()
    out = task.evaluate(perfect, loader, EvalContext(DistEnv()))
    assert out["mAP"] == pytest.approx(100.0)
    assert out["prevalence"] == pytest.approx(100.0 * targets.mean().item())
    reversed_scores = nn.Linear(5, 5)
    with torch.no_grad():
        reversed_scores.weight.copy_(-torch.eye(5))
        reversed_scores.bias.zero_()
    assert task.evaluate(reversed_scores, loader, EvalContext(DistEnv()))["mAP"] < 60.0
    assert task.losses(type("M", (), {"forward_train": lambda s, x, y: (x, {"loss_bce": y.sum()})})(),
                       (targets, targets))["loss_bce"] == targets.sum()


class _WithFiveDimParameter(nn.Module):
    """A 2-D conv net that also holds a 5-D parameter (as a Conv3d weight or a KernelWarehouse warehouse)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.bank = nn.Parameter(torch.zeros(2, 8, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.bank.sum()


def test_channels_last_trainer_accepts_five_dim_parameters(tmp_path: Path) -> None:
    """`trainer.channels_last=on` (the GPU default) converts the 4-D weights and leaves 5-D tensors alone:
    `Module.to(memory_format=channels_last)` raised on them, so such a model could not train at all."""
    model = _WithFiveDimParameter()
    with pytest.raises(RuntimeError, match="rank 4"):
        _WithFiveDimParameter().to(memory_format=torch.channels_last)  # what the loop used to call
    cfg = TrainerConfig(epochs=1, global_batch=16, workers=0, log_every=2, seed=3, channels_last="on",
                        resume="none")
    trainer = Trainer(Classifier(model), NoisyBlobs(), NoisyBlobs(24), cfg, OptimConfig(name="sgd", lr=0.05),
                      ScheduleConfig(name="cosine"), tmp_path / "run", task=ClassificationTask(), model=model)
    conv = model.net[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.bank.dim() == 5 and model.bank.is_contiguous()
    metrics = trainer.fit()
    assert metrics["top1"] > 100 / 3  # it trained (3 classes), in channels_last
