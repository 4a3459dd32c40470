"""Launch helpers: batch planning, resumable sharding, SLURM parsing, and a real 2-process DDP run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from common.config import OptimConfig, ScheduleConfig, TrainerConfig
from common.dist import ResumableSampler, _first_slurm_host, batch_plan, scale_lr
from common.engine import Trainer
from common.errors import UserError
from common.tasks import ClassificationTask, Classifier

HERE = Path(__file__).resolve().parent


def test_batch_plan() -> None:
    assert batch_plan(256, 8).per_device == 32 and batch_plan(256, 8).accum_steps == 1
    plan = batch_plan(1024, 2, max_per_device=128)
    assert (plan.per_device, plan.accum_steps) == (128, 4)
    plan = batch_plan(96, 1, max_per_device=40)  # smallest accumulation that divides evenly
    assert (plan.per_device, plan.accum_steps) == (32, 3)
    with pytest.raises(UserError, match="not divisible by 3 processes"):
        batch_plan(256, 3)
    with pytest.raises(UserError, match="micro-batches of 1"):
        batch_plan(254, 2, max_per_device=100)


def test_scale_lr() -> None:
    assert scale_lr(0.1, 512, 256) == pytest.approx(0.2)
    assert scale_lr(5e-4, 1024, 512, "sqrt") == pytest.approx(5e-4 * 2**0.5)
    assert scale_lr(0.1, 512, None) == 0.1
    with pytest.raises(UserError, match="scaling rule"):
        scale_lr(0.1, 512, 256, "cubic")


def test_sampler_shards_cover_and_resume() -> None:
    shards = [list(ResumableSampler(10, r, 3, shuffle=True, seed=5)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert set(sum(shards, [])) == set(range(10))
    s = ResumableSampler(10, 1, 3, shuffle=True, seed=5)
    s.set_position(0, 2)
    assert list(s) == shards[1][2:] and len(s) == 2
    s.set_epoch(1)
    assert list(s) != shards[1]  # a new order every epoch
    eval_shards = [list(ResumableSampler(10, r, 3, shuffle=False, pad=False)) for r in range(3)]
    assert sorted(sum(eval_shards, [])) == list(range(10))  # evaluation sees each sample once


def test_slurm_nodelist() -> None:
    assert _first_slurm_host("gpu[03-05,07],cpu1") == "gpu03"
    assert _first_slurm_host("node1,node2") == "node1"


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from ddp_worker import make_data, make_net

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # Gradients averaged over the 2 processes equal the gradient of the whole batch in one process.
    x, y = make_data().tensors
    net = make_net()
    nn.functional.cross_entropy(net(x[:16]), y[:16]).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-5, atol=1e-7)

    # One epoch of the shared loop on 2 processes equals the same epoch on 1 process.
    method = Classifier(make_net())
    cfg = TrainerConfig(epochs=1, global_batch=16, workers=0, log_every=100, seed=0, device="cpu")
    Trainer(method, make_data(), None, cfg, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0),
            ScheduleConfig(name="constant"), tmp_path / "single", task=ClassificationTask(), model=method.model).fit()
    for k, v in method.model.state_dict().items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-5, atol=1e-6)


def _write_cifar_in_rank(rank: int, world: int, root: str, init: str, out: str) -> None:
    import torch.distributed as dist

    from common.data import write_synthetic_cifar
    from common.data.base import read_marker

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        folder = write_synthetic_cifar(root, 10, 4, 2, seed=0)
        Path(out, f"rank{rank}").write_text(str(read_marker(folder) is not None))
    finally:
        dist.destroy_process_group()


def test_synthetic_writer_main_process_first_under_two_ranks(tmp_path: Path) -> None:
    """torchrun ranks call the same writer: rank 0 writes, the other waits and then finds the marker."""
    root, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    init = f"file://{tmp_path / 'pg'}"
    torch.multiprocessing.spawn(_write_cifar_in_rank, args=(2, str(root), init, str(out)), nprocs=2, join=True)
    assert [Path(out, f"rank{r}").read_text() for r in (0, 1)] == ["True", "True"]
    names = {p.name for p in (root / "cifar-10-batches-py").iterdir()}
    assert {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"} <= names
    assert not any(n.endswith(".tmp") for n in names)


def _stop_on_one_rank(rank: int, world: int, init: str, out: str) -> None:
    """Rank 1 alone receives SIGTERM after step 2; the loop must stop every rank at that same step."""
    import datetime
    import signal

    import torch.distributed as dist

    from common.dist import DistEnv
    from common.engine import Hook

    sys.path.insert(0, str(HERE))
    from ddp_worker import make_data, make_net

    class TermRankOne(Hook):
        def on_step_end(self, progress) -> None:  # type: ignore[no-untyped-def]
            if rank == 1 and progress.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    method = Classifier(make_net())
    cfg = TrainerConfig(epochs=3, global_batch=16, workers=0, log_every=100, seed=0, device="cpu")
    trainer = Trainer(method, make_data(), None, cfg, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0),
                      ScheduleConfig(name="constant"), Path(out) / "run", env, task=ClassificationTask(),
                      model=method.model, hooks=[TermRankOne()])
    code = None
    try:
        trainer.fit()
    except SystemExit as err:
        code = err.code
    Path(out, f"rank{rank}").write_text(f"{code} {trainer.global_step}")
    dist.destroy_process_group()


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """The stop decision is agreed across ranks (issue 8 item 1): SIGTERM seen by rank 1 only -> both ranks
    save at step 2 and exit 143; a per-rank flag would let rank 0 train on alone (and hang in DDP's all-reduce)."""
    out = tmp_path / "out"
    out.mkdir()
    init = f"file://{tmp_path / 'pg'}"
    torch.multiprocessing.spawn(_stop_on_one_rank, args=(2, init, str(out)), nprocs=2, join=True)
    assert [Path(out, f"rank{r}").read_text() for r in (0, 1)] == ["143 2", "143 2"]
    saved = torch.load(out / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
