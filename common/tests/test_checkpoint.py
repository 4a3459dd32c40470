"""Atomic writes, safe loading, the restricted loader for official checkpoints, resume discovery."""

from __future__ import annotations

import argparse
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.checkpoint import (
    OpaqueObject,
    atomic_save,
    capture_rng_state,
    claim_resumed,
    extract_state_dict,
    find_resume,
    load_checkpoint,
    load_foreign,
    load_foreign_state_dict,
    load_state_dict_verbose,
    restore_rng_state,
)
from common.errors import UserError


class _Boom:
    def __reduce__(self):
        raise RuntimeError("pickling failed half-way")


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError):
        atomic_save({"w": torch.zeros(3), "bad": _Boom()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind


def test_load_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt or not a torch checkpoint") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "trunc.pt"
    atomic_save({"w": torch.randn(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(truncated)
    pickled = tmp_path / "objects.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(UserError, match="convert.py"):
        load_checkpoint(pickled)


class _Evil:
    """Runs code when unpickled by an unrestricted loader."""

    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def _official_like_checkpoint(path: Path) -> OrderedDict:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save({"epoch": np.int64(7), "best_acc": np.float64(71.5), "args": argparse.Namespace(lr=0.1),
                "optimizer": opt, "state_dict": state, "evil": _Evil(),
                "arr": np.arange(3, dtype=np.float32)}, path)
    return OrderedDict((k[7:], v) for k, v in state.items())


def test_foreign_loader_extracts_tensors_without_running_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "official.pth"
    expected = _official_like_checkpoint(path)
    sd = load_foreign_state_dict(path)
    assert list(sd) == list(expected)  # 'module.' stripped, order kept
    for k in expected:
        assert torch.equal(sd[k], expected[k])
    raw = load_foreign(path)
    assert not (tmp_path / "EVIL_RAN").exists()
    assert isinstance(raw["optimizer"], OpaqueObject) and isinstance(raw["evil"], OpaqueObject)
    assert float(raw["best_acc"]) == 71.5 and int(raw["epoch"]) == 7
    # the optimizer's momentum buffers stay reachable as plain tensors
    assert any(isinstance(v, torch.Tensor) for v in _walk(raw["optimizer"].state))


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def test_foreign_loader_legacy_format_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"net": {"fc.weight": torch.ones(2, 2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_foreign_state_dict(path)["fc.weight"], torch.ones(2, 2))
    with pytest.raises(UserError, match="no entry 'ema'"):
        load_foreign_state_dict(path, key="ema")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps("just a string"))
    with pytest.raises(UserError):
        load_foreign_state_dict(junk)
    with pytest.raises(UserError, match="does not exist"):
        load_foreign_state_dict(tmp_path / "missing.pth")


class _AttrDict(dict):
    """Like EasyDict / yacs CfgNode: a dict subclass the restricted loader must not import."""


def test_foreign_loader_whole_module_dict_subclass_and_numpy(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.register_buffer("scratch", torch.ones(1), persistent=False)
    torch.save(model, tmp_path / "module.pth")  # the whole module pickled
    sd = load_foreign_state_dict(tmp_path / "module.pth")
    assert list(sd) == list(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    torch.save({"cfg": _AttrDict(lr=0.1), "model": model}, tmp_path / "wrapped.pth")
    assert list(load_foreign_state_dict(tmp_path / "wrapped.pth", key="model")) == list(model.state_dict())
    torch.save({"state_dict": {"w": np.ones((2, 2), np.float32)}}, tmp_path / "numpy.pth")
    assert torch.equal(load_foreign_state_dict(tmp_path / "numpy.pth")["w"], torch.ones(2, 2))
    torch.save({"epoch": 3}, tmp_path / "noweights.pth")
    with pytest.raises(UserError, match="holds a int, not a state_dict"):
        load_foreign_state_dict(tmp_path / "noweights.pth", key="epoch")


def test_extract_state_dict_variants() -> None:
    t = torch.zeros(1)
    assert list(extract_state_dict({"a": t})) == ["a"]
    assert list(extract_state_dict({"model": {"module.b": t}, "epoch": 3})) == ["b"]
    with pytest.raises(UserError, match="no state_dict found"):
        extract_state_dict({"epoch": 3})


def test_load_state_dict_verbose_names_keys() -> None:
    model = nn.Linear(3, 2)
    sd = {"weight": torch.zeros(2, 3), "bias_typo": torch.zeros(2)}
    with pytest.raises(UserError) as err:
        load_state_dict_verbose(model, sd)
    msg = str(err.value)
    assert "1 missing: bias" in msg and "1 unexpected: bias_typo" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"shape mismatch: weight \(3, 3\)"):
        load_state_dict_verbose(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    missing, unexpected = load_state_dict_verbose(model, sd, strict=False)
    assert missing == ["bias"] and unexpected == ["bias_typo"]
    assert torch.equal(model.weight, torch.zeros(2, 3))


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gauss value in numpy's state
    state = capture_rng_state()
    atomic_save({"rng": state}, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


def test_find_resume(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    run_a, run_b = exp / "a", exp / "b"
    assert find_resume(run_b, "auto") is None
    assert find_resume(run_b, "none") is None and find_resume(run_b, None) is None
    atomic_save({}, run_a / "last.pt")
    assert find_resume(run_b, "auto") == run_a / "last.pt"  # unfinished sibling run
    (run_a / "result.json").write_text("{}")
    assert find_resume(run_b, "auto") is None  # finished runs are not resumed
    atomic_save({}, run_b / "last.pt")
    assert find_resume(run_b, "auto") == run_b / "last.pt"
    run_c, run_d = tmp_path / "exp2" / "c", tmp_path / "exp2" / "d"
    atomic_save({}, run_c / "last.pt")
    claim_resumed(run_c, run_d)
    assert find_resume(run_d, "auto") is None  # already continued once
    sweep = exp / "multirun-1" / "1"
    atomic_save({}, exp / "multirun-1" / "0" / "last.pt")
    assert find_resume(sweep, "auto") is None  # a sweep's jobs are different runs
    with pytest.raises(UserError, match="no such checkpoint"):
        find_resume(run_b, str(tmp_path / "x.pt"))


def test_official_loader_allow_list_first_then_restricted_fallback(tmp_path: Path, monkeypatch) -> None:
    from common import checkpoint as ck

    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "released.pth"  # what the allow-list expresses: numpy scalars/arrays, a Namespace
    torch.save({"epoch": np.int64(7), "args": argparse.Namespace(lr=0.1), "arr": np.arange(3.0),
                "state_dict": {"fc.weight": torch.ones(2, 2)}}, plain)
    used: list[str] = []
    monkeypatch.setattr(ck, "load_foreign", lambda *a, **k: used.append("restricted"))
    obj = ck.load_official_checkpoint(plain)
    assert not used and int(obj["epoch"]) == 7 and obj["args"].lr == 0.1  # no fallback needed
    assert torch.equal(extract_state_dict(obj)["fc.weight"], torch.ones(2, 2))
    evil = tmp_path / "official.pth"
    _official_like_checkpoint(evil)  # pickles an optimizer and an os.system payload
    ck.load_official_checkpoint(evil)
    assert used == ["restricted"]  # the allow-list refused it; only the restricted unpickler reads it
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    raw = ck.load_official_checkpoint(evil)
    assert isinstance(raw["evil"], OpaqueObject) and not (tmp_path / "EVIL_RAN").exists()


def test_read_checkpoint_tells_ours_from_official(tmp_path: Path) -> None:
    from common.checkpoint import read_checkpoint, save_converted

    ours = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(1)}, "epoch": 3, "metrics": {"top1": 1.0}}, ours)
    assert read_checkpoint(ours)[1] == "ours"
    repdistiller = tmp_path / "ckpt_epoch_240.pth"  # official files use "model" too
    torch.save({"epoch": 240, "model": {"w": torch.ones(1)}, "accuracy": torch.tensor(73.0)}, repdistiller)
    assert read_checkpoint(repdistiller)[1] == "official"
    released = tmp_path / "released.pth"
    torch.save({"w": torch.ones(1)}, released)  # a bare foreign state dict
    assert read_checkpoint(released)[1] == "official"
    converted = save_converted({"w": torch.ones(1)}, tmp_path / "conv.pt", "toy", released)
    obj, origin = read_checkpoint(converted)
    assert origin == "official" and torch.equal(obj["state_dict"]["w"], torch.ones(1))
    torch.load(converted, weights_only=True)  # a converted file is ours in format: weights_only reads it
    pickled = tmp_path / "pickled.pth"
    _official_like_checkpoint(pickled)
    obj, origin = read_checkpoint(pickled)
    assert origin == "official" and isinstance(obj["optimizer"], OpaqueObject)
