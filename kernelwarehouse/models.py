"""KernelWarehouse models: timm backbones whose convolutions / linears are swapped for KW layers.

``convert_model(timm_model, cell_num_ratio=...)`` names each eligible layer as the official code does
(spec §c: ``stage{S}_layer{L}_conv{c}`` with the "warehouse handover" of a stage's entering layers),
reserves a KW layer for it through a :class:`WarehouseManager`, swaps it in and finalises the warehouses.
``create_model(row)`` builds every model of the paper's tables by name, e.g. ``kw1d4x_resnet18``,
``kw4x_mobilenetv2_100``, ``kw1x_convnext_tiny``, ``kw4x_deit_tiny`` or a plain baseline ``resnet50``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import nn

from kernelwarehouse.warehouse import KWLayer, WarehouseManager

__all__ = ["ARCHS", "BUDGETS", "KWRecipe", "convert_model", "create_model", "family", "kw_recipe",
           "model_names", "official_model", "param_groups", "set_temperature", "warehouse_manager"]

# A layer plan: (module path, layer name for warehouse sharing, layer type), in reservation order.
Plan = list[tuple[str, str, str]]


# ---------------------------------------------------------------------------------------------------------
# layer plans: which layers are KW and under which name (spec §c)
# ---------------------------------------------------------------------------------------------------------
def resnet_plan(model: nn.Module) -> Plan:
    """KW-ResNet (spec §c.1): stem and FC plain; a stage's entering conv1 and stride-2 downsample use the
    previous stage's warehouse; in a Bottleneck that conv1 of stage 0 and the stride-1 downsample stay plain.
    """
    plan: Plan = []
    bottleneck = hasattr(model.layer1[0], "conv3")
    layer_idx = 0
    for s in range(4):
        stage = getattr(model, f"layer{s + 1}")
        for j, block in enumerate(stage):
            p = f"layer{s + 1}.{j}"
            first = j == 0
            if first and block.downsample is not None and block.downsample[0].stride[0] != 1:
                plan.append((f"{p}.downsample.0", f"stage{s - 1}_layer{layer_idx + 1}_conv0", "conv2d"))
            c1_stage = s - 1 if first else s
            if bottleneck:
                if c1_stage >= 0:
                    plan.append((f"{p}.conv1", f"stage{c1_stage}_layer{layer_idx}_conv0", "conv2d"))
                convs = ("conv2", "conv3")
            else:
                plan.append((f"{p}.conv1", f"stage{max(c1_stage, 0)}_layer{layer_idx}_conv0", "conv2d"))
                convs = ("conv2",)
            lidx = 0 if first else layer_idx
            plan += [(f"{p}.{c}", f"stage{s}_layer{lidx}_conv{i + 1}", "conv2d") for i, c in enumerate(convs)]
            layer_idx = 1 if first else layer_idx + 1
    return plan


def mobilenetv2_plan(model: nn.Module, pw_min_stage: int = 0, kw_classifier: bool = False) -> Plan:
    """KW-MobileNetV2 (spec §c.2/c.3). The 7 setting groups map to KW stages [1,2,3,4,5,6,6]; a group's first
    block joins the previous stage when the stage changes. ``pw_min_stage``/``kw_classifier`` give the 1/2x
    model: pointwise convs KW only from that stage on, and a KW linear classifier.
    """
    kw_stage = [1, 2, 3, 4, 5, 6, 6]
    plan: Plan = [("conv_stem", "stage0_conv0", "conv2d")]
    layer_idx = 0
    for g, group in enumerate(model.blocks):
        for i, block in enumerate(group):
            handover = i == 0 and g > 0 and kw_stage[g] != kw_stage[g - 1]
            st = kw_stage[g] - 1 if handover else kw_stage[g]
            p = f"blocks.{g}.{i}"
            pw = st >= pw_min_stage
            if hasattr(block, "conv_pwl"):  # inverted residual: expand, dw, project
                if pw:
                    plan.append((f"{p}.conv_pw", f"stage{st}_layer{layer_idx}_pwconv0", "conv2d"))
                plan.append((f"{p}.conv_dw", f"stage{st}_layer{layer_idx}_dwconv0", "conv2d"))
                if pw:
                    plan.append((f"{p}.conv_pwl", f"stage{st}_layer{layer_idx}_pwconv1", "conv2d"))
            else:  # depthwise-separable first block: dw, project
                plan.append((f"{p}.conv_dw", f"stage{st}_layer{layer_idx}_dwconv0", "conv2d"))
                if pw:
                    plan.append((f"{p}.conv_pw", f"stage{st}_layer{layer_idx}_pwconv1", "conv2d"))
            layer_idx = 0 if handover else layer_idx + 1
    plan.append(("conv_head", f"stage{kw_stage[-1]}_layer{layer_idx}_pwconv1", "conv2d"))
    if kw_classifier:
        plan.append(("classifier", "classifier", "linear"))
    return plan


def convnext_plan(model: nn.Module) -> Plan:
    """KW-ConvNeXt (spec §c.4): every conv is KW; pwconv1/2 are KW linears over channels-last tokens."""
    plan: Plan = [("stem.0", "stagestem_conv0", "conv2d")]
    for i, stage in enumerate(model.stages):
        if i > 0:
            plan.append((f"stages.{i}.downsample.1", f"stage{i - 1}_layerds_conv0", "conv2d"))
        for j in range(len(stage.blocks)):
            p = f"stages.{i}.blocks.{j}"
            plan += [(f"{p}.conv_dw", f"stage{i}_layer{j}_dwconv0", "conv2d"),
                     (f"{p}.mlp.fc1", f"stage{i}_layer{j}_pwconv1", "linear"),
                     (f"{p}.mlp.fc2", f"stage{i}_layer{j}_pwconv2", "linear")]
    return plan


def vit_plan(model: nn.Module, blocks_per_stage: int = 3) -> Plan:
    """KW-DeiT (spec §b.8, *our choice* where the paper is silent): qkv, proj, fc1, fc2 of every block are KW
    linears; every ``blocks_per_stage`` blocks form a stage, one warehouse per linear type per stage.
    """
    plan: Plan = []
    for b in range(len(model.blocks)):
        s, l = divmod(b, blocks_per_stage)
        p = f"blocks.{b}"
        plan += [(f"{p}.attn.qkv", f"stage{s}_layer{l}_qkv", "linear"),
                 (f"{p}.attn.proj", f"stage{s}_layer{l}_proj", "linear"),
                 (f"{p}.mlp.fc1", f"stage{s}_layer{l}_fc1", "linear"),
                 (f"{p}.mlp.fc2", f"stage{s}_layer{l}_fc2", "linear")]
    return plan


def family(model: nn.Module) -> str:
    name = type(model).__name__
    if name == "ResNet":
        return "resnet"
    if name == "EfficientNet" and hasattr(model, "blocks") and len(model.blocks) == 7:
        return "mobilenetv2"
    if name == "ConvNeXt":
        return "convnext"
    if name == "VisionTransformer":
        return "vit"
    raise ValueError(f"convert_model supports timm ResNet, MobileNetV2, ConvNeXt and ViT/DeiT, not {name}")


_PLANS: dict[str, Callable[..., Plan]] = {"resnet": resnet_plan, "mobilenetv2": mobilenetv2_plan,
                                          "convnext": convnext_plan, "vit": vit_plan}
_DEFAULT_SHARING = {"resnet": ("layer", "conv"), "mobilenetv2": ("layer", "pwconv"),
                    "convnext": ("layer", "pwconv"), "vit": ("layer",)}


# ---------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------
def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def convert_model(model: nn.Module, cell_num_ratio: Any = 1.0, reduction: Any = 1 / 16,
                  cell_inplane_ratio: Any = 1.0, cell_outplane_ratio: Any = 1.0,
                  sharing_range: Any = None, nonlocal_basis_ratio: float = 1.0, norm: str | None = None,
                  plan: Plan | None = None, budget: float | None = None, **plan_kwargs: Any) -> nn.Module:
    """Turn a timm ResNet / MobileNetV2 / ConvNeXt / ViT into its KernelWarehouse version, in place.

    ``cell_num_ratio`` is the budget b (``KW (b x)``); the per-warehouse ratios may be scalars, sequences in
    warehouse order or dicts by warehouse name. ``budget`` is a shorthand: it sets ``cell_num_ratio`` and,
    for b < 1, halves the cells (``cell_*_ratio = 0.5``) as the official b < 1 configs do, so that every
    layer's number of mixtures is a multiple of 1/b. ``reduction`` is the attention's hidden ratio (1/16),
    not the budget. ``sharing_range`` and the attention ``norm`` default to the family's official choice.
    The manager is ``model.warehouse_manager``.
    """
    if budget is not None:
        cell_num_ratio = budget
        if budget < 1 and cell_inplane_ratio == 1.0 and cell_outplane_ratio == 1.0:
            cell_inplane_ratio = cell_outplane_ratio = 0.5
    fam = family(model)
    plan = plan if plan is not None else _PLANS[fam](model, **plan_kwargs)
    norm = norm or ("ln" if fam == "convnext" else "bn")
    manager = WarehouseManager(reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio,
                               sharing_range if sharing_range is not None else _DEFAULT_SHARING[fam],
                               nonlocal_basis_ratio, norm=norm)
    for path, name, layer_type in plan:
        old = model.get_submodule(path)
        if layer_type == "linear":
            new = manager.reserve(old.in_features, old.out_features, bias=old.bias is not None,
                                  warehouse_name=name, layer_type="linear")
        else:
            if not isinstance(old.padding, tuple):
                raise ValueError(f"{path}: only explicit symmetric padding is supported, got {old.padding!r}")
            new = manager.reserve(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                  old.dilation, old.groups, bias=old.bias is not None, warehouse_name=name,
                                  layer_type=f"conv{len(old.kernel_size)}d")
        _swap(model, path, new)
    model.warehouse_manager = manager
    manager.finalize(model)
    return model


def warehouse_manager(model: nn.Module) -> WarehouseManager | None:
    """The model's manager (looked up through wrappers such as DDP or a classifier)."""
    for mod in model.modules():
        if isinstance(mod, WarehouseManager):
            return mod
    return None


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the attention temperature of every KW layer of ``model`` (a no-op for plain models)."""
    for mod in model.modules():
        if isinstance(mod, WarehouseManager):
            mod.set_temperature(tau)


# ---------------------------------------------------------------------------------------------------------
# the paper's rows
# ---------------------------------------------------------------------------------------------------------
ARCHS = {  # row arch name -> timm model
    "resnet18": "resnet18", "resnet50": "resnet50",
    "mobilenetv2_100": "mobilenetv2_100", "mobilenetv2_050": "mobilenetv2_050",
    "convnext_tiny": "convnext_tiny",
    "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
}
BUDGETS = {"1d4x": 0.25, "1d2x": 0.5, "1x": 1.0, "2x": 2.0, "4x": 4.0}


@dataclass
class KWRecipe:
    """The KW hyper-parameters of one official config (``configs/<arch>/kw*.json``)."""

    cell_num_ratio: Any = 1.0
    reduction: Any = 1 / 16
    cell_inplane_ratio: Any = 1.0
    cell_outplane_ratio: Any = 1.0
    sharing_range: Any = None
    nonlocal_basis_ratio: float = 1.0
    plan_kwargs: dict[str, Any] = field(default_factory=dict)


def kw_recipe(arch: str, budget: str) -> KWRecipe:
    """The official KW settings for ``arch`` at ``budget`` (spec §c, official JSON configs)."""
    b = BUDGETS[budget]
    if arch.startswith("resnet"):
        rho = 0.5 if b < 1 else 1.0  # b < 1 also halves the cells so every m is a multiple of 1/b
        basis = 0.0625 if (arch == "resnet50" and b < 1) else 1.0
        if b == 0.25 and arch != "resnet18":
            raise ValueError(f"the paper has no KW 1/4x {arch}")
        return KWRecipe(b, 1 / 16, rho, rho, "layer_conv", basis)
    if arch.startswith("mobilenetv2"):
        if b == 0.5:  # models/kw1d2x_mobilenetv2.py: hard-coded per-warehouse tuples (spec §c.3)
            return KWRecipe((1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5), 1 / 32,
                            (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025), (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
                            ("layer",),
                            plan_kwargs={"pw_min_stage": 6, "kw_classifier": True})
        if b in (1.0, 4.0):
            return KWRecipe(b, 1 / 16, 1, 1, ("layer", "pwconv") if b == 1 else ("layer",))
        raise ValueError(f"the paper has KW 1/2x, 1x, 4x MobileNetV2, not {budget}")
    if arch == "convnext_tiny":
        if b != 1.0:
            raise ValueError("the paper has only KW 1x ConvNeXt-Tiny")
        return KWRecipe(1.0, 1 / 16, 1, 1, ("layer", "pwconv"))
    if arch.startswith("deit"):
        if b < 1:
            raise ValueError("KW DeiT rows are b >= 1")
        return KWRecipe(b, 1 / 16, 1, 1, ("layer",))
    raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")


def model_names() -> list[str]:
    """Every buildable row name (baselines and KW variants)."""
    names = list(ARCHS)
    for arch in ARCHS:
        for budget in BUDGETS:
            try:
                kw_recipe(arch, budget)
            except ValueError:
                continue
            names.append(f"kw{budget}_{arch}")
    return names


def _official_init(model: nn.Module, arch: str, kw: bool) -> None:
    """Match the official initialisation of the plain parts where timm's differs (spec §c)."""
    with torch.no_grad():
        if arch.startswith("mobilenetv2") and isinstance(model.classifier, nn.Linear):
            nn.init.normal_(model.classifier.weight, 0, 0.01)
            nn.init.zeros_(model.classifier.bias)
        if arch.startswith("resnet") and not kw:
            nn.init.normal_(model.fc.weight, 0, 0.01)
            nn.init.zeros_(model.fc.bias)


def create_model(name: str, num_classes: int = 1000, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 img_size: int | None = None, **overrides: Any) -> nn.Module:
    """Build a row's model by name: ``<arch>`` (baseline) or ``kw<budget>_<arch>``, e.g. ``kw1d2x_resnet50``.

    ``overrides`` replace fields of the official :class:`KWRecipe` (e.g. ``reduction``, ``norm``);
    ``img_size`` applies to the ViTs only.
    """
    m = re.fullmatch(r"(?:kw(?P<budget>1d4x|1d2x|1x|2x|4x)_)?(?P<arch>[a-z0-9_]+)", name)
    if m is None or m.group("arch") not in ARCHS:
        raise ValueError(f"unknown model {name!r}; choose from {model_names()}")
    arch, budget = m.group("arch"), m.group("budget")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path_rate,
                              "drop_rate": drop_rate}
    if img_size is not None and arch.startswith("deit"):
        kwargs["img_size"] = img_size
    if arch.startswith("resnet"):
        kwargs["zero_init_last"] = False  # the official ResNets do not zero-init the last BN
    model = timm.create_model(ARCHS[arch], pretrained=False, **kwargs)
    if arch.startswith("resnet") and drop_path_rate > 0:  # official: one constant rate, timm: a linear ramp
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in stage:
                block.drop_path = DropPath(drop_path_rate)
    _official_init(model, arch, kw=budget is not None)
    if budget is None:
        if overrides:
            raise ValueError(f"{name} is a baseline; KW overrides {sorted(overrides)} do not apply")
        return model
    recipe = kw_recipe(arch, budget)
    norm = overrides.pop("norm", None)
    for key, value in overrides.items():
        if not hasattr(recipe, key):
            choices = sorted(KWRecipe.__dataclass_fields__)
            raise ValueError(f"unknown KW setting {key!r}; choose from {choices}")
        setattr(recipe, key, value)
    return convert_model(model, recipe.cell_num_ratio, recipe.reduction, recipe.cell_inplane_ratio,
                         recipe.cell_outplane_ratio, recipe.sharing_range, recipe.nonlocal_basis_ratio, norm,
                         **recipe.plan_kwargs)


_OFFICIAL_KW = {"kw_resnet18": "resnet18", "kw_resnet50": "resnet50", "kw_mobilenetv2_100": "mobilenetv2_100",
                "kw_mobilenetv2_050": "mobilenetv2_050", "kw_convnext_tiny": "convnext_tiny"}
_OFFICIAL_KW_KEYS = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio",
                     "sharing_range", "nonlocal_basis_ratio")


def official_model(name: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                   **official_kwargs: Any) -> nn.Module:
    """Our equivalent of an official registry entry (``kw_resnet18(**json)``, ``kw1d2x_mobilenetv2_100``).

    Official KW kwargs that are ``None`` are dropped, as timm's ``create_model`` does (spec §b.11 item 9).
    """
    kwargs = {k: v for k, v in official_kwargs.items() if v is not None}
    allowed = set(_OFFICIAL_KW_KEYS) | {"dropout", "drop_path", "layer_scale_init_value"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"official model {name}: unsupported kwargs {unknown}")
    drop_path_rate = kwargs.pop("drop_path", drop_path_rate)
    if name in ARCHS:
        return create_model(name, num_classes, drop_path_rate)
    m = re.fullmatch(r"kw1d2x_(mobilenetv2_\d+)", name)
    if m:
        return create_model(f"kw1d2x_{m.group(1)}", num_classes, drop_path_rate)
    if name not in _OFFICIAL_KW:
        raise ValueError(f"unknown official model {name!r}; known: {sorted(_OFFICIAL_KW) + sorted(ARCHS)}")
    arch = _OFFICIAL_KW[name]
    model = create_model(arch, num_classes, drop_path_rate)
    _official_init(model, arch, kw=True)
    kw = {k: kwargs[k] for k in _OFFICIAL_KW_KEYS if k in kwargs}
    return convert_model(model, **kw)


def kw_layers(model: nn.Module) -> dict[str, KWLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KWLayer)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of the official ``get_parameter_groups`` (spec §b.10): no decay for 1-D tensors and
    biases. The official KW ConvNeXt stores layer-scale ``gamma`` as ``[1, C, 1, 1]``, so it *is* decayed
    there; timm's is ``[C]``, so we decay it explicitly in KW ConvNeXt to keep the official recipe.
    """
    kw_convnext = warehouse_manager(model) is not None and any(
        type(m).__name__ == "ConvNeXt" for m in model.modules())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer_scale = kw_convnext and name.endswith(".gamma")
        (no_decay if (p.ndim <= 1 or name.endswith(".bias")) and not layer_scale else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
