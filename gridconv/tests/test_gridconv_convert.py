"""Official checkpoints: restricted loading (pickled optimizer), key conversion, missing/unexpected keys
by name, one-command evaluation; the official learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import compose
from common.errors import UserError
from common.results import read_record
from common.testing import fixture_dir
from gridconv.convert import checkpoint_filter_fn, infer_model_config, load_official, official_model_config
from gridconv.gridconv import GridLiftingNetwork
from gridconv.train import CONFIG_DIR, lr_at_epoch


def fixture(name: str) -> dict:
    path = fixture_dir("gridconv") / name
    if not path.is_file():
        pytest.skip(f"fixture {name} not present")
    return torch.load(path, weights_only=True)


class _OfficialModule(torch.nn.Module):
    """Stands in for the official network so that a real torch.optim.Adam object can be pickled."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(v.clone()) for v in state.values()
                                             if v.is_floating_point())


def write_official(path: Path, state: dict) -> Path:
    optimizer = torch.optim.Adam(_OfficialModule(state).parameters(), lr=1e-3)
    torch.save({"epoch": 7, "lr": 1e-3, "error": 50.5, "state_dict": state, "optimizer": optimizer}, path)
    return path


@pytest.mark.parametrize("name", ["dgridconv_small.pt", "autogrids_small.pt"])
def test_official_checkpoint_with_pickled_optimizer_loads_and_matches(tmp_path: Path, name: str) -> None:
    fx = fixture(name)
    path = write_official(tmp_path / "official.pth.tar", fx["state_dict"])
    with pytest.raises(Exception):  # noqa: B017 - a plain weights_only load refuses the optimizer object
        torch.load(path, weights_only=True)
    padding = tuple(fx["config"]["padding_mode"])
    model, meta = load_official(path, padding, temperature=30.0)
    assert meta["epoch"] == 7 and meta["error"] == 50.5 and not meta["missing_keys"]
    assert meta["model"] == infer_model_config(fx["state_dict"], padding)
    model.eval()
    with torch.no_grad():
        if "input_grid" in fx:
            out = model.forward_grid(fx["input_grid"])
        else:
            out = model(fx["input_pose2d_norm"])
    torch.testing.assert_close(out, fx["outputs_eval"]["T=30"], atol=1e-5, rtol=1e-4)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    fx = fixture("dgridconv_small.pt")
    state = dict(fx["state_dict"])
    state.pop("batch_norm1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    path = write_official(tmp_path / "broken.pth.tar", state)
    with pytest.raises(UserError, match=r"stem_norm\.running_mean.*extra\.weight|missing.*unexpected"):
        load_official(path, ("c", "r"))
    model, meta = load_official(path, ("c", "r"), strict=False)
    assert meta["missing_keys"] == ["stem_norm.running_mean"] and meta["unexpected_keys"] == ["extra.weight"]


def test_corrupt_and_missing_official_checkpoints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_official(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_official(tmp_path / "absent.pth.tar")


def test_one_command_eval_of_official_checkpoint(tmp_path: Path) -> None:
    from gridconv.eval import run as eval_run
    from gridconv.synthetic import write_synthetic_h36m

    fx = fixture("dgridconv_small.pt")
    path = write_official(tmp_path / "gt_d-gridconv.pth.tar", fx["state_dict"])
    root = write_synthetic_h36m(tmp_path / "data", train_frames=1, test_frames=1, inputs=("gt",))
    cfg = compose(CONFIG_DIR, ["experiment=gt_dgridconv_handcrafted", f"data.root={root}",
                               f"checkpoint={path}", f"output_dir={tmp_path / 'out'}"])
    record = eval_run(cfg)
    assert record["source"] == "official" and record["temperature"] == 30.0
    assert record["frames"] == (30 - 1) * 4 * 1 + 30 * 4  # S9 all, S11 without Directions
    assert 0 < record["metrics"]["pmpjpe"] < record["metrics"]["mpjpe"]


def test_converter_is_idempotent_and_config_dispatch() -> None:
    fx = fixture("autogrids_small.pt")
    model = GridLiftingNetwork(**official_model_config(fx["config"]))
    ours = checkpoint_filter_fn(fx["state_dict"], model, temperature=2.0)
    assert set(ours) == set(model.state_dict())
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()
    assert float(ours["head.attention.temperature"]) == 2.0
    with pytest.raises(ValueError, match="unknown official"):
        official_model_config({"class": "SomethingElse", "hidden_size": 8})


def test_lr_schedule_matches_official() -> None:
    lists = fixture("dgridconv_small.pt")["schedules"]["lr_during_epoch (0-based epochs 0..99)"]
    for decay_every in (10, 1):
        ref = lists[f"lr_decay={decay_every}"]
        ours = [lr_at_epoch(e, 1e-3, 0.96, decay_every) for e in range(len(ref))]
        assert ours == pytest.approx(ref, rel=1e-12)


def test_convert_cli_writes_what_eval_and_infer_read_roundtrip(tmp_path: Path) -> None:
    """official release -> gridconv.convert -> the eval / infer loader and the eval CLI: same outputs."""
    from gridconv.convert import main as convert_main
    from gridconv.eval import load_model
    from gridconv.eval import run as eval_run
    from gridconv.synthetic import write_synthetic_h36m

    fx = fixture("autogrids_small.pt")
    src = write_official(tmp_path / "official.pth.tar", fx["state_dict"])
    convert_main([str(src), str(tmp_path / "ours.pt"), "--padding", "c", "z", "--temperature", "1"])
    saved = torch.load(tmp_path / "ours.pt", weights_only=True)  # ours in format: weights_only reads it
    assert saved["origin"] == "official" and saved["model_config"]["sgt"] == "learnable"
    assert float(saved["state_dict"]["stem.attention.temperature"]) == 1
    converted, meta = load_model(tmp_path / "ours.pt", ("c", "r"), temperature=None)  # what eval and infer call
    assert meta["source"] == "official" and meta["epoch"] == 7 and converted.temperature == 1.0
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(fx["input_pose2d_norm"]), fx["outputs_eval"]["T=1.0"],
                                   atol=1e-5, rtol=1e-4)
    official, meta = load_model(src, ("c", "z"), temperature=None)  # eval's loader: official, T = 30
    assert meta["source"] == "official" and official.temperature == 30.0
    # the eval CLI scores the converted file exactly as the release it came from (at the same temperature)
    root = write_synthetic_h36m(tmp_path / "data", train_frames=1, test_frames=1, inputs=("gt",))
    records = {}
    for name, ckpt in (("release", src), ("converted", tmp_path / "ours.pt")):
        cfg = compose(CONFIG_DIR, ["experiment=gt_dgridconv_learnable", "model.padding_mode=[c,z]",
                                   f"data.root={root}", f"checkpoint={ckpt}", "temperature=1.0",
                                   f"output_dir={tmp_path / name}"])
        records[name] = eval_run(cfg)
        written = read_record(next((tmp_path / name).rglob("result.json")))
        assert written.kind == "evaluated" and written.checkpoint == "official" and written.data == "synthetic"
    assert records["release"]["metrics"] == records["converted"]["metrics"]


def test_eval_on_mpi3dhp(tmp_path: Path) -> None:
    import numpy as np

    from gridconv.eval import run as eval_run

    fx = fixture("dgridconv_small.pt")
    path = write_official(tmp_path / "official.pth.tar", fx["state_dict"])
    rng = np.random.default_rng(0)
    names = np.array([f"mpi_inf_3dhp_test_set/TS{1 + i % 6}/imageSequence/img_{i:06d}.jpg" for i in range(12)])
    np.savez(tmp_path / "mpi_inf_3dhp_valid.npz", imgname=names, part=rng.uniform(500, 1500, (12, 24, 3)),
             S=rng.normal(0, 0.4, (12, 24, 4)))
    cfg = compose(CONFIG_DIR, ["experiment=gt_dgridconv_handcrafted", "data=mpi3dhp", f"checkpoint={path}",
                               f"data.root={tmp_path / 'mpi_inf_3dhp_valid.npz'}", f"output_dir={tmp_path}"])
    metrics = eval_run(cfg)["metrics"]
    assert {"pck", "auc", "mpjpe", "pck/GS", "pck/noGS", "pck/Outdoor"} <= set(metrics)
    assert 0 <= metrics["auc"] <= metrics["pck"] <= 100
