"""convert.py: official mmcv checkpoints through the restricted loader, key rules, index_sel, named key errors."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from ske2grid.convert import checkpoint_filter_fn, load_official
from ske2grid.models import create_model

SMALL = dict(widths=[8, 16, 16])


def official_state(model) -> OrderedDict[str, torch.Tensor]:
    """Our Ske2GridNet state in the release's key names and shapes (spec §g), built independently of convert.py."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out["backbone.A"] = torch.zeros(3, 17, 17)
    for k, v in model.state_dict().items():
        rules = [(r"^ske2grid\.data_bn\.", "backbone.data_bn."),
                 (r"^ske2grid\.stages\.(\d+)\.upt\.weight$", r"backbone.sampling_stages.\1"),
                 (r"^ske2grid\.stages\.(\d+)\.git\.theta$", r"backbone.SGT_stages.\1.sgt_trans_mat"),
                 (r"^ske2grid\.stages\.(\d+)\.git\.index_sel$", r"backbone.SGT_stages.\1.index_sel"),
                 (r"^blocks\.(\d+)\.grid_conv\.", r"backbone.st_gcn_networks.\1.gcn2cn.conv."),
                 (r"^blocks\.(\d+)\.grid_bn\.", r"backbone.st_gcn_networks.\1.gcn2cn.bn."),
                 (r"^blocks\.(\d+)\.tcn\.", r"backbone.st_gcn_networks.\1.tcn2cn."),
                 (r"^blocks\.(\d+)\.residual\.", r"backbone.st_gcn_networks.\1.residual."),
                 (r"^head\.fc\.", "cls_head.fc.")]
        for pat, rep in rules:
            k2, n = re.subn(pat, rep, k)
            if n:
                break
        out[k2] = v.reshape(*v.shape, 1, 1, 1) if k2 == "cls_head.fc.weight" else v.clone()
    return out


def _mmcv_file(path: Path, state) -> Path:
    torch.save({"meta": {"epoch": 16, "config": "model = dict(...)"}, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def test_official_checkpoint_round_trip(tmp_path: Path) -> None:
    src = create_model("ske2grid", 7, grid_shape=(6, 6), progressive_joint_seq=[17, 25], **SMALL).eval()
    x = torch.randn(2, 2, 8, 17, 3)
    with torch.no_grad():
        ref = src(x)  # also writes index_sel, as a trained official model's state would hold
    path = _mmcv_file(tmp_path / "best_top1_acc_epoch_16.pth", official_state(src))
    dst = create_model("ske2grid", 7, grid_shape=(6, 6), progressive_joint_seq=[17, 25], **SMALL).eval()
    assert load_official(path, dst) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(dst(x), ref)


def test_index_sel_mismatch_warns_and_is_recomputed() -> None:
    src = create_model("ske2grid", 7, **SMALL)
    state = official_state(src)
    perm = src.ske2grid.stages[0].git.assignment()
    state["backbone.SGT_stages.0.index_sel"] = perm.flip(0).float()
    with pytest.warns(UserWarning, match=r"stages\.0\.git\.index_sel.*differs"):
        out = checkpoint_filter_fn(state, src)
    assert torch.equal(out["ske2grid.stages.0.git.index_sel"], perm.float())
    assert "A" not in out and "backbone.A" not in out


def test_load_official_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model = create_model("ske2grid", 7, **SMALL)
    state = official_state(model)
    del state["backbone.st_gcn_networks.1.tcn2cn.2.weight"]
    state["backbone.edge_importance.0"] = torch.ones(3)
    path = _mmcv_file(tmp_path / "x.pth", state)
    with pytest.raises(UserError, match=r"missing: blocks\.1\.tcn\.2\.weight.*unexpected: backbone\.edge_imp"):
        load_official(path, model)
    missing, unexpected = load_official(path, model, strict=False)
    assert missing == ["blocks.1.tcn.2.weight"] and unexpected == ["backbone.edge_importance.0"]


def test_load_official_wrong_grid_is_a_shape_error(tmp_path: Path) -> None:
    d6 = create_model("ske2grid", 7, grid_shape=(6, 6), progressive_joint_seq=[17], **SMALL)
    path = _mmcv_file(tmp_path / "d6.pth", official_state(d6))
    with pytest.raises(UserError, match=r"shape mismatch: ske2grid\.stages\.0\.upt\.weight \(36, 17\)"):
        load_official(path, create_model("ske2grid", 7, **SMALL))


def test_corrupt_or_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt") as err:
        load_official(tmp_path / "bad.pth", create_model("ske2grid", 7, **SMALL))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_official(tmp_path / "none.pth", create_model("ske2grid", 7, **SMALL))


def test_pyskl_stgcn_keys_map_onto_the_baseline() -> None:
    model = create_model("stgcn", 5, **SMALL)
    pyskl = OrderedDict()
    for k, v in model.state_dict().items():
        k2 = re.sub(r"^blocks\.", "backbone.gcn.", re.sub(r"^data_bn\.", "backbone.data_bn.", k))
        pyskl[re.sub(r"^head\.fc\.", "cls_head.fc_cls.", k2)] = v
    assert set(checkpoint_filter_fn(pyskl, model)) == set(model.state_dict())
