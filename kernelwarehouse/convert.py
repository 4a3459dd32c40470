"""Official KernelWarehouse state_dict -> this project's modules (timm's ``checkpoint_filter_fn`` style).

The official models keep torchvision / Facebook-ConvNeXt names and one ``warehouse_manager.weights.{k}``
per warehouse, indexed by order of first reservation. Ours are timm models whose eligible layers were
swapped for KW layers (``kernelwarehouse.models.convert_model``). Conversion is a few explicit rules:

1. a per-family prefix rename (``features.0.0`` -> ``conv_stem`` ...; ConvNeXt uses timm's own
   ``checkpoint_filter_fn`` key rules, ``downsample_layers.1.1`` -> ``stages.1.downsample.1`` ...);
2. a KW linear layer keeps its parameters directly, not under ``.conv.`` (official ``KWLinear`` wraps a
   ``KWConv1d``);
3. warehouses are matched *by name*: the official index order is recovered from the order in which the
   official state_dict lists the KW layers, so a model whose modules are registered in another order
   (timm's ConvNeXt puts each downsample inside its stage) still receives the right tensors;
4. tensors are reshaped when only singleton dimensions differ (1-D / linear cells, ConvNeXt ``gamma``).

``beta`` and ``tau`` are not in official checkpoints: ``beta`` is rebuilt at construction and ``tau`` is
set to 0 (the official default for a freshly built model, spec §b.9 / §g).

``checkpoint_filter_fn(state_dict, model)`` is the pure conversion; ``python -m kernelwarehouse.convert`` writes
(atomically) the file ``kernelwarehouse.eval`` reads, marked as official weights for the result record.
"""

from __future__ import annotations

import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from common.checkpoint import load_foreign_state_dict, save_converted
from common.errors import UserError, cli_guard
from kernelwarehouse.warehouse import KWLayer, KWLinear, WarehouseManager

_WAREHOUSE_KEY = re.compile(r"^(?P<prefix>.*?)warehouse_manager\.weights\.(?P<k>\d+)$")


# ---------------------------------------------------------------------------------------------------------
# per-family prefix rules: official module path -> ours (timm)
# ---------------------------------------------------------------------------------------------------------
def _mobilenetv2_block_table(model: nn.Module) -> dict[int, str]:
    """Official ``features.i`` (i >= 1 are blocks) -> timm ``blocks.s.j``."""
    table, i = {}, 1
    for s, stage in enumerate(model.blocks):
        for j in range(len(stage)):
            table[i] = f"blocks.{s}.{j}"
            i += 1
    table[i] = "conv_head"
    return table


def mobilenetv2_rules(model: nn.Module) -> Callable[[str], str]:
    """Torchvision-layout MobileNetV2 (official) -> timm ``mobilenetv2_*`` names."""
    blocks = _mobilenetv2_block_table(model)
    last = max(blocks)

    def rename(key: str) -> str:
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if m is None:
            # baseline: classifier.1 (Sequential(Dropout, Linear)); KW: classifier / classifier.1.conv
            return re.sub(r"^classifier\.1\.", "classifier.", key)
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:  # stem ConvBNReLU
            return re.sub(r"^0\.", "conv_stem.", re.sub(r"^1\.", "bn1.", rest))
        if i == last:  # final 1x1 ConvBNReLU
            return re.sub(r"^0\.", "conv_head.", re.sub(r"^1\.", "bn2.", rest))
        block = blocks[i]
        layers = ["conv_dw", "bn1", "conv_pw", "bn2"] if i == 1 else None  # t=1 depthwise-separable block
        mm = re.match(r"^conv\.(\d+)\.(.*)$", rest)
        if mm is None:
            raise KeyError(key)
        j, tail = int(mm.group(1)), mm.group(2)
        if layers is not None:  # t=1 block: [dw ConvBNReLU, pw conv, bn]
            if j == 0:
                name = {"0": "conv_dw", "1": "bn1"}[tail.split(".", 1)[0]]
                return f"{block}.{name}.{tail.split('.', 1)[1]}"
            return f"{block}.{layers[j + 1]}.{tail}"
        if j in (0, 1):  # expand / dw ConvBNReLU
            conv, bn = (("conv_pw", "bn1"), ("conv_dw", "bn2"))[j]
            head, sub = tail.split(".", 1)
            return f"{block}.{conv if head == '0' else bn}.{sub}"
        return f"{block}.{'conv_pwl' if j == 2 else 'bn3'}.{tail}"

    return rename


def convnext_rules(model: nn.Module) -> Callable[[str], str]:
    """Facebook-layout ConvNeXt (official) -> timm ``convnext_*`` names: timm's own key filter
    (``timm.models.convnext.checkpoint_filter_fn``), applied one key at a time (KW and plain)."""
    from timm.models.convnext import checkpoint_filter_fn as timm_filter

    def rename(key: str) -> str:
        # a 0-element stand-in tensor: timm's rules only rename it (its reshapes need our shapes, rule 4 does)
        return next(iter(timm_filter({key: torch.empty(0)}, model)))

    return rename


def identity_rules(model: nn.Module) -> Callable[[str], str]:
    return lambda key: key


def rules_for(model: nn.Module) -> Callable[[str], str]:
    """The official -> ours prefix rules of ``model``'s family (identity for anything else)."""
    from kernelwarehouse.models import family

    try:
        fam = family(model)
    except ValueError:
        return identity_rules(model)
    return {"resnet": identity_rules, "mobilenetv2": mobilenetv2_rules, "convnext": convnext_rules,
            "vit": identity_rules}[fam](model)


# ---------------------------------------------------------------------------------------------------------
# the converter
# ---------------------------------------------------------------------------------------------------------
def _find_manager(model: nn.Module) -> tuple[str, WarehouseManager] | None:
    for name, mod in model.named_modules():
        if isinstance(mod, WarehouseManager):
            return name, mod
    return None


def key_map(official_keys: list[str] | Mapping[str, torch.Tensor], model: nn.Module,
            rename: Callable[[str], str] | None = None) -> OrderedDict[str, str]:
    """Official key -> our key, in the official order (see the module docstring for the rules)."""
    rename = rename or rules_for(model)
    kw_layers = {n: m for n, m in model.named_modules() if isinstance(m, KWLayer)}
    linear_paths = {n for n, m in kw_layers.items() if isinstance(m, KWLinear)}
    found = _find_manager(model)

    mapping: OrderedDict[str, str] = OrderedDict()
    warehouse_keys: dict[int, str] = {}
    official_order: list[str] = []  # our warehouse names in the official index order
    for key in official_keys:
        wm = _WAREHOUSE_KEY.match(key)
        if wm:
            warehouse_keys[int(wm.group("k"))] = key
            continue
        new = rename(key)
        m = re.match(r"^(.*)\.conv\.((?:attention\.|bias$).*)$", new)
        if m and m.group(1) in linear_paths:
            new = f"{m.group(1)}.{m.group(2)}"
        layer_path = new.split(".attention.", 1)[0] if ".attention." in new else None
        if layer_path in kw_layers and found is not None:
            name = found[1].names[kw_layers[layer_path].warehouse_id]
            if name not in official_order:
                official_order.append(name)
        mapping[key] = new
    if warehouse_keys:
        if found is None:
            raise ValueError("the official state_dict has warehouses but the model has no WarehouseManager")
        prefix, manager = found
        prefix = f"{prefix}." if prefix else ""
        if len(official_order) != len(warehouse_keys):
            raise ValueError(f"official checkpoint has {len(warehouse_keys)} warehouses, its KW layers map "
                             f"to {len(official_order)} of ours")
        for k, name in enumerate(official_order):
            mapping[warehouse_keys[k]] = f"{prefix}weights.{manager.names.index(name)}"
    return mapping


def convert_state_dict(official: Mapping[str, torch.Tensor], model: nn.Module,
                       rename: Callable[[str], str] | None = None) -> OrderedDict[str, torch.Tensor]:
    """Map an official state_dict onto ``model``'s keys and shapes (see the module docstring)."""
    ours = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for old, new in key_map(list(official), model, rename).items():
        value = official[old]
        if new in ours and ours[new].shape != value.shape and ours[new].numel() == value.numel():
            value = value.reshape(ours[new].shape)  # rule 4: singleton-dimension reshapes
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official KernelWarehouse state_dict -> ``model``'s (timm's convention; pure: nothing is loaded).

    A state_dict already in our names passes through unchanged.
    """
    ours = model.state_dict()
    if set(state_dict) <= set(ours) and all(k.endswith("warehouse_manager.temperature") for k in set(ours) -
                                            set(state_dict)):
        return dict(state_dict)
    return dict(convert_state_dict(state_dict, model))


def load_official(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                  rename: Callable[[str], str] | None = None, key: str | None = None,
                  strict: bool = True) -> tuple[list[str], list[str]]:
    """Load an official checkpoint (file or state_dict) into ``model``; returns (missing, unexpected).

    Missing keys that are ours only (the temperature buffer) are ignored; ``tau`` is set to 0.
    With ``strict`` any other missing/unexpected key or shape mismatch raises, naming the keys.
    """
    state = source if isinstance(source, Mapping) else load_foreign_state_dict(source, key=key)
    converted = convert_state_dict(state, model, rename) if rename else checkpoint_filter_fn(state, model)
    ours = model.state_dict()
    mismatched = [k for k, v in converted.items() if k in ours and ours[k].shape != v.shape]
    missing = [k for k in ours if k not in converted and not k.endswith("warehouse_manager.temperature")]
    unexpected = [k for k in converted if k not in ours]
    if strict and (missing or unexpected or mismatched):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        raise ValueError("official checkpoint does not fit the model: "
                         + "; ".join(f"{what}: {show(keys)}" for what, keys in
                                     (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", mismatched)) if keys))
    model.load_state_dict({k: v for k, v in converted.items() if k in ours and k not in mismatched},
                          strict=False)
    found = _find_manager(model)
    if found is not None:
        found[1].set_temperature(0.0)
    return missing, unexpected


def compose_config(overrides: list[str]) -> DictConfig:
    """The experiment's composed config (``experiment=<row> ...``), as ``kernelwarehouse.eval`` sees it."""
    from hydra import compose, initialize_config_dir

    from kernelwarehouse.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR.resolve()), version_base=None):
        return compose("train", overrides)


def convert_file(source: str | os.PathLike, target: str | os.PathLike, overrides: list[str]) -> Path:
    """Official checkpoint ``source`` -> ``target`` in our names, for the model the overrides compose."""
    from common.config import validate
    from kernelwarehouse.train import DataConfig, MethodConfig, ModelConfig, build_model

    cfg = compose_config(overrides)
    model = build_model(validate(cfg.model, ModelConfig, "model."), validate(cfg.data, DataConfig, "data."),
                        validate(cfg.method, MethodConfig, "method."))
    try:
        load_official(model, source, key=cfg.get("checkpoint_key"))
    except ValueError as err:
        raise UserError(f"{source}: {err}") from None
    return save_converted(model.state_dict(), target, "kernelwarehouse", source, experiment=str(cfg.name),
                          model=str(cfg.model.name))


@cli_guard
def main(argv: list[str] | None = None) -> None:
    """``python -m kernelwarehouse.convert OFFICIAL.pth OURS.pt experiment=<row> [checkpoint_key=model_ema]``

    Writes (atomically) what ``kernelwarehouse.eval checkpoint=OURS.pt`` reads; tau is 0 in the file.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args if "=" not in a]
    if len(paths) != 2 or any(a in ("-h", "--help") for a in args):
        raise UserError("usage: python -m kernelwarehouse.convert OFFICIAL.pth OURS.pt experiment=<row> "
                        "[checkpoint_key=model_ema] [other config overrides]")
    out = convert_file(paths[0], paths[1], [a for a in args if "=" in a])
    print(f"wrote {out} (official weights in our names; evaluate with kernelwarehouse.eval checkpoint={out})")


if __name__ == "__main__":
    main()
