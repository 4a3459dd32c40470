"""Distributed launch: one entry point for a single process, torchrun (one or many nodes) and SLURM.

`init_distributed()` reads the launcher's environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or
SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID under `srun`), picks nccl on GPU and gloo on CPU,
and returns a `DistEnv`. The global batch is a config value; `batch_plan` derives the per-device
batch and the gradient-accumulation steps, so a table row reproduces on any number of devices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from common.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_env() -> tuple[int, int, int] | None:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        # torch.distributed's env:// rendezvous reads these; SLURM gives the first node's address.
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
        env.setdefault("LOCAL_RANK", str(local))
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", ""))
            first = _first_slurm_host(nodes) or env.get("SLURM_LAUNCH_NODE_IPADDR", "")
            if not first:
                raise UserError("SLURM run without MASTER_ADDR: export MASTER_ADDR=<first node> before srun")
            env["MASTER_ADDR"] = first
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return rank, world, local
    return None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as `gpu[03-05,07],cpu1` -> `gpu03`."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise the process group if launched by torchrun/SLURM; otherwise a single process.

    `device`: "auto" (cuda if available else cpu), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={device!r}: use auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu")
    launched = _launcher_env()
    if launched is None:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistEnv(device=dev)
    rank, world, local = launched
    if use_cuda:
        # SLURM with --gpus-per-task shows each task one device: local rank modulo what is visible
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_device: int
    accum_steps: int
    world_size: int


def batch_plan(global_batch: int, world_size: int = 1, max_per_device: int | None = None) -> BatchPlan:
    """Split a global batch into per-device micro-batches and gradient-accumulation steps.

    global_batch = per_device * world_size * accum_steps, with the smallest accum_steps such that
    per_device <= max_per_device.
    """
    if global_batch <= 0 or world_size <= 0:
        raise UserError(f"global batch {global_batch} and world size {world_size} must be positive")
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} is not divisible by {world_size} processes; "
                        "change the batch or the number of processes")
    per_rank = global_batch // world_size
    cap = max_per_device or per_rank
    accum = math.ceil(per_rank / cap)
    while per_rank % accum:
        accum += 1
    if per_rank // accum < min(cap, per_rank) / 2:
        raise UserError(f"global batch {global_batch} on {world_size} process(es) with at most {cap} per device "
                        f"splits only into micro-batches of {per_rank // accum}; choose a global batch with "
                        "more divisors")
    return BatchPlan(global_batch, per_rank // accum, accum, world_size)


def scale_lr(base_lr: float, global_batch: int, base_batch: int | None, rule: str = "linear") -> float:
    """The paper's learning-rate scaling rule: lr = base_lr * (global_batch / base_batch)[^0.5]."""
    if rule == "none" or not base_batch:
        return base_lr
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise UserError(f"lr scaling rule {rule!r}: use linear, sqrt or none")


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) sharding over ranks that can start mid-epoch.

    Each epoch's order is a permutation drawn from `seed + epoch`, so it does not depend on the
    global RNG; `set_position(epoch, start)` skips the first `start` samples of this rank's shard,
    which is how a resumed run continues exactly where it stopped. With `pad=True` (training) every
    rank gets the same number of samples (indices wrap); with `pad=False` (evaluation) each sample is
    seen once overall.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, pad: bool = True) -> None:
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        if self.pad and self.world_size > 1:
            total = math.ceil(self.length / self.world_size) * self.world_size
            if total > self.length:
                order = torch.cat([order, order[: total - self.length]])
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        if self.pad:
            n = math.ceil(self.length / self.world_size)
        else:
            n = len(range(self.rank, self.length, self.world_size))
        return max(n - self.start, 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(t) / dist.get_world_size()
    return t


def reduce_metrics(sums: Mapping[str, float], count: float, device: torch.device) -> dict[str, float]:
    """Global means of per-rank sums: each metric's sum over ranks divided by the global count."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device)
    t = all_reduce_sum(t)
    total = t[-1].item()
    return {k: (t[i].item() / total if total else float("nan")) for i, k in enumerate(keys)}
