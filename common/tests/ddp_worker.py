"""Run under `torchrun --nproc_per_node=2`: DDP gradients and a short Trainer run, saved for the test.

Not a test module itself (no `test_` prefix); `test_dist.py` launches it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

from common.config import OptimConfig, ScheduleConfig, TrainerConfig
from common.dist import cleanup, init_distributed
from common.engine import Trainer
from common.tasks import ClassificationTask, Classifier


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 3, 2, 2, generator=g), torch.randint(0, 3, (64,), generator=g))


def main(out: Path) -> None:
    env = init_distributed("cpu")
    assert env.world_size == 2 and dist.is_initialized()
    data = make_data()
    x, y = data.tensors
    # 1. One DDP backward on this rank's half of a global batch of 16.
    net = DDP(make_net())
    shard = slice(env.rank * 8, (env.rank + 1) * 8)
    nn.functional.cross_entropy(net(x[:16][shard]), y[:16][shard]).backward()
    grads = {k: p.grad.clone() for k, p in net.module.named_parameters()}
    # 2. The shared loop, one epoch at global batch 16 (8 per process).
    method = Classifier(make_net())
    cfg = TrainerConfig(epochs=1, global_batch=16, workers=0, log_every=100, seed=0, device="cpu")
    Trainer(method, data, data, cfg, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0),
            ScheduleConfig(name="constant"), out / "run", env, task=ClassificationTask(), model=method.model).fit()
    if env.is_main:
        torch.save({"grads": grads, "weights": method.model.state_dict()}, out / "ddp.pt")
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
