"""Spec c / h.1: exact parameter and BN-layer counts (C = 10, 100; DeepLab at 13), state-dict tensor counts
(spec g), every paper.yaml row's student/teacher counts, the generator's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ssdkd.datafree import Generator
from ssdkd.models import MODEL_DICT, create_model

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "paper.yaml").read_text())


def _counts(model: nn.Module) -> tuple[int, int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()), len(model.state_dict()))


@pytest.mark.parametrize("name", list(PAPER["architectures"]))
def test_param_counts_spec_c(name: str) -> None:
    spec = PAPER["architectures"][name]
    for key, value in spec.items():
        if key.startswith("params_"):
            with torch.device("meta"):
                params, bn, tensors = _counts(create_model(name, int(key.split("_")[1])))
            assert params == value, f"{name} C={key}: {params} != {value}"
            assert bn == spec["bn_layers"]
            if "state_dict_tensors" in spec:
                assert tensors == spec["state_dict_tensors"]


def test_param_generator() -> None:
    g = PAPER["generator"]
    params, bn, tensors = _counts(Generator(g["nz"], g["ngf"], g["img_size"], g["nc"]))
    assert (params, bn, tensors) == (g["params"], g["bn_layers"], g["state_dict_tensors"])
    assert PAPER["generator_params"] == g["params"]


@pytest.mark.parametrize("row", PAPER["rows"], ids=lambda r: r["id"])
def test_param_rows(row: dict) -> None:
    c = {"cifar10": 10, "cifar100": 100, "nyuv2": 13}[row["dataset"]]
    arch = PAPER["architectures"]
    for field, model in (("params", row["student"]), ("teacher_params", row["teacher"])):
        want = arch[model][f"params_{c}"]
        assert row[field] == want, f"{row['id']} {field}"


def test_every_registry_model_builds_for_10_and_100() -> None:
    with torch.device("meta"):
        for name in MODEL_DICT:
            for c in (10, 100):
                model = create_model(name, c)
                assert model.get_classifier().out_features == c
