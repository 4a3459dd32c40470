"""Golden equivalence with the official code's outputs (fixtures in ../shared/fixtures/kernelwarehouse).

Each file is dispatched on its recorded configuration, not its name: a group fixture records the
manager kwargs and the reserved layers; a full-model fixture records its official builder call.
Tolerances are the fixture README's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.testing import (
    assert_grad_close,
    assert_norm_close,
    evaluate_expression,
    golden_files,
    gradient_scale,
    parse_call,
    recorded_temperature,
    run_program,
)
from kernelwarehouse.convert import convert_state_dict, key_map, load_official
from kernelwarehouse.models import official_model
from kernelwarehouse.warehouse import WarehouseManager


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5, floor: float = 1e-7) -> None:
    ours = ours.reshape(ref.shape).to(ref.dtype)
    torch.testing.assert_close(ours, ref, rtol=0, atol=rel * ref.abs().max().item() + floor)


# ---------------------------------------------------------------------------------------------------------
# group fixtures: a manager plus a few reserved layers, forward written in config['forward']
# ---------------------------------------------------------------------------------------------------------
class Group(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        kw = config["warehouse_manager"]
        norm = {"BatchNorm1d": "bn", "LayerNorm": "ln"}[kw["norm_layer"]]
        self.warehouse_manager = WarehouseManager(
            kw["reduction"], kw["cell_num_ratio"], kw["cell_inplane_ratio"], kw["cell_outplane_ratio"],
            kw["sharing_range"], kw["nonlocal_basis_ratio"], norm=norm)
        self.layers = nn.ModuleDict()
        for spec in config["layers_in_registration_order"]:
            spec = dict(spec)
            key = spec.pop("key")
            self.layers[key] = self.warehouse_manager.reserve(**spec)
        self.warehouse_manager.finalize(self)
        self.program = config["forward"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Interprets the recorded forward, e.g. ``h1=relu(conv_a(x)); h2=conv_b(h1)+ds(x); ...``
        (``common.testing.run_program``: any elementwise / reshape / pooling operation, notes skipped)."""
        env = run_program(self.program, {"x": x, **self.layers})
        inter = {k: v for k, v in env.items() if k not in ("x", "out") and isinstance(v, torch.Tensor)}
        return env["out"], inter


def group_golden(data: dict[str, Any]) -> None:
    config = data["config"]
    model = Group(config)
    model.load_state_dict(convert_state_dict(data["state_dict"], model), strict=False)
    names = [w["name"] for w in config["warehouses"]]
    assert model.warehouse_manager.names == names
    # same cells (a linear warehouse drops the official trailing 1 of its 1-D cells)
    assert [list(w.shape[:3]) for w in model.warehouse_manager.weights] == [w["shape"][:3]
                                                                           for w in config["warehouses"]]
    modules = dict(model.named_modules())
    for path, beta in data["temp_bias"].items():  # beta rebuilt from the rules of spec §b.5
        ours = modules[path.removesuffix(".conv")]
        assert torch.equal(ours.attention.beta.flatten(), beta.float()), path
        meta = config["layer_meta"][path]
        assert ours.start_cell == meta["start_cell_idx"] and ours.num_mixtures == meta["num_local_mixture"]

    model.eval()
    eval_keys = [k for k in data if k.startswith("eval_")]  # whatever temperatures the file records
    assert eval_keys, "the fixture records no eval-mode outputs"
    for key in eval_keys:
        model.warehouse_manager.set_temperature(recorded_temperature(key, data[key]))
        with torch.no_grad():
            out, inter = model(data["x"])
        close(out, data[key]["out"])
        for name, ref in data[key].get("intermediates", {}).items():
            close(inter[name], ref)
        for path, rec in data[key].get("per_layer", {}).items():
            layer = modules[path.removesuffix(".conv")]
            with torch.no_grad():
                x_in = rec["input"]
                pooled = x_in.mean(dim=tuple(range(2, x_in.dim())))
                close(layer.mixture_weights(pooled).reshape(-1, layer.num_cells), rec["attention"])

    train = data["train"]
    model.train()
    model.warehouse_manager.set_temperature(train["temperature"])
    out, inter = model(data["x"])
    close(out, train["out"])
    for name, ref in train.get("intermediates", {}).items():
        close(inter[name], ref)
    loss = recorded_loss(config, train, data, out)
    assert loss.item() == pytest.approx(train["loss"], rel=1e-5, abs=1e-7)
    loss.backward()
    ours = dict(model.named_parameters())
    converted_names = key_map(list(data["state_dict"]), model)
    scale = gradient_scale(train["grads"])
    for name, ref in train["grads"].items():
        assert_grad_close(ours[converted_names[name]].grad, ref, name, scale=scale, rel=1e-4, floor=1e-9)
    for name in train.get("params_without_grad", []):
        assert ours[converted_names[name]].grad is None, f"{name} should receive no gradient"
    for name, ref in train["bn_buffers_after"].items():
        buffers = dict(model.named_buffers())
        close(buffers[converted_names[name]].float(), ref.float())


# ---------------------------------------------------------------------------------------------------------
# full-model fixtures: an official registry builder call, e.g. "kw_mobilenetv2_050(num_classes=10, ...)"
# ---------------------------------------------------------------------------------------------------------
def recorded_loss(config: dict[str, Any], train: dict[str, Any], data: dict[str, Any],
                  out: torch.Tensor) -> torch.Tensor:
    """The train-step loss the file records (``config['train_loss']``, e.g. ``sum(out_train * loss_weight)``)."""
    env = {"out_train": out, "out": out, **{k: v for k, v in {**data, **train}.items()
                                          if isinstance(v, torch.Tensor) and k not in ("out",)}}
    if "train_loss" in config:
        return evaluate_expression(config["train_loss"], env)
    return (out * train["loss_weight"]).sum() if "loss_weight" in train else F.cross_entropy(out, data["labels"])


def parse_builder(builder: str) -> tuple[str, dict[str, Any]]:
    """``'models/x.py: kw_mobilenetv2_050(num_classes=10, sharing_range=[..]) ; notes'`` -> (name, kwargs)."""
    name, args, kwargs = parse_call(builder)
    assert not args, f"positional builder arguments are not recorded by the README: {builder}"
    return name, kwargs


def full_model_golden(data: dict[str, Any]) -> None:
    config = data["config"]
    name, kwargs = parse_builder(config["builder"])
    num_classes = kwargs.pop("num_classes", config.get("num_classes", 1000))
    model = official_model(name, num_classes, **kwargs)
    # The official op order is needed here: this untrained deep net is chaotic in eval mode (on the official
    # code itself a 1e-7 input perturbation moves the logits by ~1), so a float32 reordering of any layer
    # (e.g. our batched-matmul 1x1 path) cannot meet the README's 1e-5 tolerance. The group fixtures, which
    # are well conditioned, run with the default ``impl='auto'``.
    model.warehouse_manager.impl = "grouped"
    assert sum(p.numel() for p in model.parameters()) == config["num_params"]
    manager = model.warehouse_manager
    expected = sorted(tuple(w["shape"]) for w in config["warehouses"])
    assert sorted(tuple(w.shape) for w in manager.weights) == expected
    names = key_map(list(data["state_dict"]), model)
    load_official(model, data["state_dict"])
    modules = dict(model.named_modules())
    for path, beta in data["temp_bias"].items():
        layer = modules[names[f"{path}.attention.fc2.weight"].rsplit(".attention.", 1)[0]]
        assert torch.equal(layer.attention.beta.flatten(), beta.float()), path

    model.eval()
    first = modules[names[f"{config['first_kw_layer']}.attention.fc2.weight"].rsplit(".attention.", 1)[0]]
    seen: dict[str, torch.Tensor] = {}
    hook = first.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    eval_keys = [k for k in data if k.startswith("eval_")]
    assert eval_keys, "the fixture records no eval-mode outputs"
    # The reduction order of float32 convolutions depends on the thread count, and this chaotic net amplifies
    # it to ~0.06 in the logits: the official recording's order is the 2-thread one (checked: 1 thread fails,
    # 2 threads match within the README tolerance), so the comparison runs at 2 threads on any machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with torch.no_grad():
        for key in eval_keys:
            manager.set_temperature(recorded_temperature(key, data[key]))
            close(model(data["x"]), data[key]["out"])
            if "first_kw_layer_attention" in data[key]:
                close(first.mixture_weights(seen["x"].mean((2, 3))).reshape(-1, first.num_cells),
                      data[key]["first_kw_layer_attention"])
    torch.set_num_threads(threads)
    hook.remove()

    train = data["train"]
    model.train()
    manager.set_temperature(train["temperature"])
    out = model(data["x"])
    close(out, train["out"])
    loss = recorded_loss(config, train, data, out)
    assert loss.item() == pytest.approx(train["loss"], rel=1e-5)
    loss.backward()
    params = dict(model.named_parameters())
    subset = train.get("grads_subset", train.get("grads", {}))
    scale = gradient_scale(subset)
    for name_, ref in subset.items():
        assert_grad_close(params[names[name_]].grad, ref, name_, scale=scale, rel=1e-4, floor=1e-9)
    norm_scale = gradient_scale(train.get("grad_norms", {}))
    for name_, norm in train.get("grad_norms", {}).items():
        grad = params[names[name_]].grad
        assert_norm_close(grad.norm().item(), norm, f"|grad {name_}|", scale=norm_scale, rel=1e-4, floor=1e-9)
        if name_ in train.get("grad_sums", {}):
            assert_norm_close(grad.sum().item(), train["grad_sums"][name_], f"sum grad {name_}", scale=norm_scale,
                              rel=1e-3, floor=1e-4 * norm + 1e-9)


@pytest.mark.golden
@pytest.mark.parametrize("path", golden_files("kernelwarehouse"))
def test_golden(path: Path) -> None:
    data = torch.load(path, map_location="cpu", weights_only=True)
    config = data["config"]
    if "layers_in_registration_order" in config:
        group_golden(data)
    elif "builder" in config and os.environ.get("OSVAI_KW_GOLDEN_CHILD") != "1":
        # This chaotic net amplifies float32 reduction-order noise to ~1e-3..1e-1 in the logits; the order
        # depends on the thread pool, which earlier tests in the same process may have re-sized. So the
        # comparison runs in a fresh interpreter with the recording's 2-thread pool (strictness unchanged).
        env = {**os.environ, "OSVAI_KW_GOLDEN_CHILD": "1", "OMP_NUM_THREADS": "2", "OSVAI_FIXTURES": str(path.parent),
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_golden[{path.name}]"], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    elif "builder" in config:
        full_model_golden(data)
    else:
        pytest.fail(f"{path.name}: unknown fixture kind (config keys {sorted(config)})")


# ---------------------------------------------------------------------------------------------------------
# the harness generalises: a variant fixture in the same schema (another forward program with comments and
# trailing notes, other temperatures under other key names, another input) passes without code changes
# ---------------------------------------------------------------------------------------------------------
VARIANT_PROGRAM = """h1 = gelu(conv_a(x))   # a GELU instead of the ReLU
h2 = conv_b(h1) + ds(x) (shortcut, stride 2); h3 = dw(h2)
out = head(flatten(adaptive_avg_pool2d(h3, 1), 1)) ; note: head is the KW linear layer"""


def _variant_forward(model: Group, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The variant program written out by hand (independent of the program interpreter)."""
    layers = model.layers
    h1 = F.gelu(layers["conv_a"](x))
    h2 = layers["conv_b"](h1) + layers["ds"](x)
    h3 = layers["dw"](h2)
    return layers["head"](torch.flatten(F.adaptive_avg_pool2d(h3, 1), 1)), {"h1": h1, "h2": h2, "h3": h3}


def make_group_variant(data: dict[str, Any], seed: int = 5) -> dict[str, Any]:
    """A new group fixture of `data`'s kind, its references computed by our implementation."""
    config = {**data["config"], "forward": VARIANT_PROGRAM}
    model = Group(config)
    model.load_state_dict(convert_state_dict(data["state_dict"], model), strict=False)
    official = {v: k for k, v in key_map(list(data["state_dict"]), model).items()}
    x = torch.randn(*data["x"].shape[:1], *data["x"].shape[1:], generator=torch.Generator().manual_seed(seed))
    variant: dict[str, Any] = {"config": config, "state_dict": data["state_dict"], "temp_bias": data["temp_bias"],
                               "x": x}
    model.eval()
    for key, tau in (("eval_tau025", 0.25), ("eval_tau1", 1.0)):
        model.warehouse_manager.set_temperature(tau)
        with torch.no_grad():
            out, inter = _variant_forward(model, x)
        variant[key] = {"out": out, "intermediates": inter}
    model.train()
    model.warehouse_manager.set_temperature(0.6)
    out, inter = _variant_forward(model, x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    loss = (out * weight).sum()
    loss.backward()
    variant["train"] = {
        "temperature": 0.6, "out": out.detach(), "intermediates": {k: v.detach() for k, v in inter.items()},
        "loss_weight": weight, "loss": loss.item(), "params_without_grad": [],
        "grads": {official[n]: p.grad.clone() for n, p in model.named_parameters()},
        "bn_buffers_after": {official[n]: b.clone() for n, b in model.named_buffers()
                             if "attention" in n and n in official and "running" in n},
    }
    return variant


@pytest.mark.golden
@pytest.mark.parametrize("path", golden_files("kernelwarehouse"))
def test_golden_harness_accepts_group_variants(path: Path) -> None:
    data = torch.load(path, map_location="cpu", weights_only=True)
    keys = {s["key"] for s in data["config"].get("layers_in_registration_order", [])}
    if not {"conv_a", "conv_b", "ds", "dw", "head"} <= keys:  # dispatch on the recorded layers, not the name
        pytest.skip("the variant program is written for a conv_a/conv_b/ds/dw/head group")
    group_golden(make_group_variant(data))
    # and the recorded builder call of a full model tolerates notes and a file prefix
    assert parse_builder("models/kw_x.py: kw_resnet18(num_classes=10, cell_num_ratio=0.5) ; note (default)") == (
        "kw_resnet18", {"num_classes": 10, "cell_num_ratio": 0.5})
    assert recorded_temperature("eval_tau05") == 0.5 and recorded_temperature("eval_tau0_25") == 0.25
