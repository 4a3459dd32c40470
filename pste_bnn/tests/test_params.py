"""Exact counts of spec b.12, c, g, h.11-12 against pste_bnn/paper.yaml (every integer asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pste_bnn.accounting import (
    binary_conv_geometry,
    binary_weight_count,
    bops_1bit,
    bops_subbit,
    codebook_overhead_bits,
    count_params,
    model_size_bits,
    real_macs,
)
from pste_bnn.models import birealnet18, birealnet34, create_model, teacher_resnet34

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())
ROWS = [r for r in PAPER["rows"] if r.get("model")]
ACC = PAPER["accounting"]
_CACHE: dict = {}


def build(row: dict):
    key = (row["model"], row["quantizer"], row.get("tau", 5))
    if key not in _CACHE:
        _CACHE[key] = create_model(row["model"], quantizer=row["quantizer"], tau=min(row.get("tau", 5), 9))
    return _CACHE[key]


@pytest.mark.parametrize("row", [r for r in ROWS if "params" in r], ids=lambda r: r["id"])
def test_param_count(row: dict) -> None:
    assert count_params(build(row)) == row["params"]
    if "training_only_params" in row:
        model = build(row)
        assert count_params(model, training_only=True) - count_params(model) == row["training_only_params"]


@pytest.mark.parametrize("row", [r for r in ROWS if "size_bits" in r or "bops" in r or "bops_1bit" in r],
                         ids=lambda r: r["id"])
def test_param_size_and_bops(row: dict) -> None:
    layers = binary_conv_geometry(build(row), 224)
    tau = row.get("tau", 9)
    if "size_bits" in row:
        assert model_size_bits(layers, tau) == row["size_bits"]
    if "bops" in row:
        assert bops_subbit(layers, tau) == row["bops"]
    if "bops_1bit" in row:
        assert bops_1bit(layers) == row["bops_1bit"]
    if "size_readme" in row:  # README rounding: 3 decimals (10.99 for 1 bit), truncated for BOPs (spec b.12)
        assert f"{model_size_bits(layers, tau) / 1e6:.{len(row['size_readme'].split('.')[1]) - 4}f}Mbit" \
            == row["size_readme"]
    if "bops_readme" in row:  # the fitted sub-bit figures match the README truncated (spec b.12, k.5)
        assert f"{int(bops_subbit(layers, tau) / 1e6) / 1e3:.3f}G" == row["bops_readme"]


@pytest.mark.parametrize("row", [r for r in ROWS if "binary_weights" in r], ids=lambda r: r["id"])
def test_param_binary_weights(row: dict) -> None:
    assert binary_weight_count(build(row)) == row["binary_weights"]


def test_param_accounting_integers() -> None:
    r18, r34 = birealnet18(quantizer="real"), birealnet34(quantizer="real")
    g18, g34 = binary_conv_geometry(r18), binary_conv_geometry(r34)
    assert (len(g18), len(g34)) == (ACC["r18_binary_convs"], ACC["r34_binary_convs"])
    assert binary_weight_count(r18) // 9 == ACC["r18_kernels"]
    assert binary_weight_count(r34) // 9 == ACC["r34_kernels"]
    assert count_params(r18) - binary_weight_count(r18) == ACC["r18_real_params"]
    assert count_params(r34) - binary_weight_count(r34) == ACC["r34_real_params"]
    assert r18.conv1.weight.numel() == ACC["stem_params"]
    assert sum(p.numel() for p in r18.fc.parameters()) == ACC["fc_params"]
    down = sum(m.weight.numel() for n, m in r18.named_modules() if n.endswith("downsample.1"))
    assert down == ACC["downsample_params"]
    assert real_macs(r18) == ACC["r18_real_macs"] and real_macs(r34) == ACC["r34_real_macs"]
    assert codebook_overhead_bits(g18, 5) == ACC["r18_codebook_overhead_bits_tau5"]
    assert count_params(birealnet34(quantizer="snn", tau=9)) == ACC["r34_official_tau9_params"]
    assert sum(p.numel() for p in teacher_resnet34().parameters()) == ACC["teacher_resnet34_params"]
    snn = birealnet18(quantizer="snn", tau=5)
    official_keys = [k for k in snn.state_dict() if not k.endswith(("binarize.memory", "binarize.step"))]
    assert len(official_keys) == ACC["r18_step2_state_dict_keys"]


def test_param_bops_subbit_is_min_of_dense_and_gathered() -> None:
    """The per-layer min only bites at tau = 6 in stage 1 (n = C_out = 64, spec b.12)."""
    layers = binary_conv_geometry(birealnet18(quantizer="real"))
    assert bops_subbit(layers, 9) == bops_1bit(layers)
    first = layers[:1]
    dense = bops_1bit(first)
    assert bops_subbit(first, 6) == dense < first[0].in_chs * 64 * 9 * 56 * 56 + dense // 18
