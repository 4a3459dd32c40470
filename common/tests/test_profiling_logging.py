"""Parameter/FLOP counts against hand-computed values; the run logger's files and wandb modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.logging import RunLogger, read_jsonl
from common.profiling import count_flops, count_params, human


def test_count_params_and_flops() -> None:
    lin = nn.Linear(10, 4)  # 44 parameters; 2*10*4 FLOPs per sample (+ bias adds are not counted)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(lin) == 44 and count_params(shared) == 44  # shared weights once
    lin.bias.requires_grad_(False)
    assert count_params(lin, trainable_only=True) == 40
    flops = count_flops(nn.Linear(10, 4), torch.randn(3, 10))
    assert flops == {"flops": 2 * 3 * 10 * 4, "macs": 3 * 10 * 4}
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # MACs = H*W*Cout*Cin*k*k
    assert count_flops(conv, torch.randn(1, 3, 5, 5))["macs"] == 5 * 5 * 8 * 3 * 9
    assert human(1_814_000_000) == "1.81G" and human(11_690_000, "") == "11.69M"


def test_run_logger_files(tmp_path: Path) -> None:
    log = RunLogger(tmp_path / "run", {"a": 1})
    for step in range(1, 4):
        log.log({"loss": 1.0 / step, "lr": torch.tensor(0.1), "epoch": 0}, step=step)
    log.close()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["lr"] == pytest.approx(0.1)
    json.dumps(records)  # plain JSON values only
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    silent = RunLogger(tmp_path / "other", is_main=False)
    silent.log({"x": 1}, step=1)
    assert not (tmp_path / "other").exists()  # only the main process writes


def test_wandb_modes(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="logger.wandb.mode='sometimes'"):
        RunLogger(tmp_path, wandb_mode="sometimes")
    log = RunLogger(tmp_path / "off")  # disabled by default: no wandb directory is made
    log.log({"x": 1.0}, step=1)
    log.close()
    assert not (tmp_path / "off" / "wandb").exists()


def test_wandb_offline_writes_locally(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = RunLogger(tmp_path / "off", wandb_mode="offline")
    log.log({"x": 1.0}, step=1)
    log.close()
    assert list((tmp_path / "off" / "wandb").glob("offline-run-*"))
