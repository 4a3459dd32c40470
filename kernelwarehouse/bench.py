"""What KernelWarehouse costs: each KW model beside its plain baseline (and the official KW model), in one run.

    python -m kernelwarehouse.bench                               # ResNet18 KW 1x vs ResNet18, B=16, 160 px
    python -m kernelwarehouse.bench official=/path/to/KernelWarehouse threads=1   # + the official KW model
    python -m kernelwarehouse.bench models=kw1x_resnet18,kw4x_mobilenetv2_100 batch=32 size=224 threads=8
    python -m kernelwarehouse.bench impl=grouped                  # our model with the official op order
    python -m kernelwarehouse.bench mixed_ratio=0 tapwise_ratio=0 # impl=auto's thresholds (0: never that path)
    python -m kernelwarehouse.bench channels_last=false           # every candidate in NCHW memory instead
    KW_HEAP=off python -m kernelwarehouse.bench                   # glibc's default allocator (slower)
    python -m kernelwarehouse.bench modes=infer layers=true       # + every KW layer in every application

Every ``common.bench`` key works (``device``, ``threads``, ``repeats``, ``warmup``, ``modes``, ``memory``,
``macs``). Training step = forward, mean-of-logits loss, backward, SGD step; inference = eval-mode
``inference_mode`` forward; the candidates alternate round by round and the medians are reported, with
``time / <baseline>`` the cost relative to the plain network. KW runs at tau = 0.5 (input-dependent
attention, as during and after the anneal). ``official=`` points at a checkout of the official repository:
its model is built from its own ``configs/<arch>/<row>.json`` *after* ours (importing its ``models`` package
re-registers timm names) and timed in the same rounds; the official sources never enter this tree.
All candidates run in one memory format, channels_last by default: it is the plain ResNet's faster format on
the CPU too (its stem max-pool alone costs ~10x more in NCHW), so NCHW would handicap the baseline.
On a GPU: bf16 autocast, TFLOP/s against the card's peak.

``layers=true`` (inference) also times every KW conv layer alone on its real input from one batch, in each
mathematically equal kernel application it is eligible for, next to the plain model's conv of the same name,
and prints the floor these applications put on the network's inference cost: the plain network plus, per
KW layer, the fastest application's excess over its plain conv. Layers are timed with the warehouse
layouts of ``im2col``/``mixed`` already made (in a network forward they are made once per warehouse).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.allocator import heap_kept
from common.bench import (
    BENCH_DEFAULTS,
    BenchConfig,
    Candidate,
    amp_dtype,
    bench_config,
    classification_steps,
    compare,
    describe,
    print_table,
    time_once,
)
from common.bench import ratio as time_ratio
from common.cli import parse_overrides, split_list
from common.engine import to_channels_last
from common.errors import UserError, cli_guard
from kernelwarehouse.models import create_model, warehouse_manager
from kernelwarehouse.warehouse import KWConvNd, KWLayer, KWLinear

DEFAULTS: dict[str, Any] = {**BENCH_DEFAULTS, "threads": 2, "models": "kw1x_resnet18", "batch": 16, "size": 160,
                            "impl": "auto", "tapwise_ratio": None, "mixed_ratio": None, "official": None,
                            "temperature": 0.5, "channels_last": True, "layers": False}
_OFFICIAL_KW_KEYS = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "sharing_range",
                     "nonlocal_basis_ratio")


def baseline_of(name: str) -> str:
    """``kw1x_resnet18`` -> ``resnet18``."""
    return name.split("_", 1)[1] if name.startswith("kw") else name


def macs_per_image(model: nn.Module, size: int) -> dict[str, float]:
    """Analytic multiply-adds of conv / linear layers and of the KW kernel assembly (spec §c.5 split)."""
    totals = {"conv_linear": 0.0, "assembly": 0.0, "attention": 0.0}
    hooks = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(mod, KWLayer):
            params = mod.out_planes * (mod.in_planes // mod.groups) * mod.groups_spatial
            positions = out[0].numel() / mod.out_planes
            totals["conv_linear"] += params * positions
            totals["assembly"] += params * mod.num_cells
            totals["attention"] += sum(p.numel() for n, p in mod.attention.named_parameters()
                                       if n.endswith("weight") and p.ndim == 2)
        elif isinstance(mod, nn.Conv2d):
            totals["conv_linear"] += mod.weight.numel() * out[0].numel() / mod.out_channels
        elif isinstance(mod, nn.Linear):
            totals["conv_linear"] += mod.weight.numel() * x[0].numel() / mod.in_features

    for mod in model.modules():
        if isinstance(mod, (KWConvNd, KWLinear, nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return totals


def official_model(root: Path, name: str, temperature: float) -> nn.Module:
    """The official implementation of row ``name`` from its own JSON config (``configs/<arch>/<name>.json``)."""
    configs = sorted(root.glob(f"configs/*/{name}.json"))
    if not (root / "models" / "__init__.py").is_file() or not configs:
        raise UserError(f"bench: official={root} has no models/ package or no configs/*/{name}.json; point it at "
                        "a checkout of github.com/OSVAI/KernelWarehouse")
    config = json.loads(configs[0].read_text())
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import models as official  # the official package, importable only from `root`

    kwargs = {k: config[k] for k in _OFFICIAL_KW_KEYS if k in config}
    model = getattr(official, config["model"])(num_classes=1000, drop_path_rate=0.0, **kwargs)
    if hasattr(model, "net_update_temperature"):
        model.net_update_temperature(temperature)
    return model


def candidates_for(name: str, opts: dict[str, Any], device: torch.device) -> list[Candidate]:
    """Plain baseline, ours, and (with ``official=``) the official model of one row, on one batch."""
    batch, size = int(opts["batch"]), int(opts["size"])
    models: dict[str, nn.Module] = {baseline_of(name): create_model(baseline_of(name))}
    if name != baseline_of(name):
        kw = create_model(name)
        manager = warehouse_manager(kw)
        manager.impl = str(opts["impl"])
        for key in ("tapwise_ratio", "mixed_ratio"):  # the cost-model thresholds of impl=auto
            if opts[key] is not None:
                setattr(manager, key, float(opts[key]))
        manager.set_temperature(float(opts["temperature"]))
        models[name] = kw
        if opts["official"]:  # after ours: the official package re-registers timm names
            models[f"{name} (official)"] = official_model(Path(opts["official"]), name, float(opts["temperature"]))
    memory_format = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    x = torch.randn(batch, 3, size, size).to(device, memory_format=memory_format)
    sample = torch.zeros(1, 3, size, size, device=device)
    out = []
    for label, model in models.items():
        model.to(device)
        if opts["channels_last"]:
            to_channels_last(model)
        out.append(Candidate(label, model, classification_steps(model, x), batch=batch, sample=sample))
    return out


def _forced(layer: KWConvNd, how: str, x: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        layer.kernel_application = lambda _x: how  # type: ignore[method-assign]
        try:
            return layer(x)
        finally:
            del layer.kernel_application
    return step


def layer_rows(kw: nn.Module, plain: nn.Module, x: torch.Tensor, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Inference time (s, median) of every KW conv layer of ``kw`` per eligible application, beside the conv of
    the same name in ``plain``, each on its input from one forward of ``x``, each candidate's calls back to back."""
    inputs: dict[str, dict[str, torch.Tensor]] = {"kw": {}, "plain": {}}
    hooks = [m.register_forward_hook(lambda m, a, o, key=key, name=name: inputs[key].__setitem__(name, a[0]))
             for key, net in (("kw", kw), ("plain", plain)) for name, m in net.named_modules()
             if isinstance(m, KWConvNd) or (key == "plain" and isinstance(m, nn.Conv2d))]
    kw.eval(), plain.eval()
    dtype = amp_dtype(x.device)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        kw(x), plain(x)
    for h in hooks:
        h.remove()
    plain_convs = dict(plain.named_modules())
    manager = warehouse_manager(kw)
    rows = []
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        manager._open_forward(kw, ())  # the warehouse layouts are made once, as in one network forward
        try:
            for name, layer in kw.named_modules():
                if not isinstance(layer, KWConvNd) or name not in inputs["kw"]:
                    continue
                x_kw = inputs["kw"][name]
                steps = {"auto": lambda layer=layer, x_kw=x_kw: layer(x_kw)}
                steps |= {how: _forced(layer, how, x_kw) for how in layer.applications()}
                if name in inputs["plain"]:
                    steps["plain"] = lambda conv=plain_convs[name], x_p=inputs["plain"][name]: conv(x_p)
                seconds = {}
                for key, step in steps.items():  # back to back: caches warm, as for a layer inside the network
                    for _ in range(max(cfg.warmup, 1)):
                        step()
                    seconds[key] = statistics.median(time_once(step, cfg.threads) for _ in range(cfg.repeats))
                rows.append({"layer": name, "input": list(x_kw.shape[1:]), "auto": layer.kernel_application(x_kw),
                             "seconds": seconds})
        finally:
            manager._close_forward(kw, (), None)
    return rows


def print_layer_rows(rows: list[dict[str, Any]], plain_seconds: float | None) -> None:
    """The per-layer table (ms) and the floor the fastest applications put on the inference ratio."""
    paths = ["grouped", "pointwise", "tapwise", "im2col", "mixed"]
    print("\n| KW layer | input | auto picks | auto | " + " | ".join(paths) + " | plain conv | fastest |")
    print("|" + "---|" * (len(paths) + 6))
    auto = best = plain = 0.0
    for row in rows:
        sec = row["seconds"]
        fastest = min((p for p in paths if p in sec), key=lambda p: sec[p])
        cells = [row["layer"], "x".join(map(str, row["input"])), row["auto"], f"{1e3 * sec['auto']:.2f}"]
        cells += [f"{1e3 * sec[p]:.2f}" if p in sec else "-" for p in paths + ["plain"]] + [fastest]
        print("| " + " | ".join(cells) + " |")
        auto += sec["auto"]
        best += min(sec[fastest], sec["auto"])
        plain += sec.get("plain", 0.0)
    print(f"KW layers alone: auto {1e3 * auto:.1f} ms, fastest application each {1e3 * best:.1f} ms; the plain "
          f"model's convs of the same names {1e3 * plain:.1f} ms")
    if plain_seconds:
        print(f"floor from these applications: with the fastest in every KW layer, inference would cost "
              f"{1 + (best - plain) / plain_seconds:.2f}x the plain network ({1e3 * plain_seconds:.1f} ms per batch "
              "plus each KW layer's excess over its plain conv)")


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts, _ = parse_overrides(argv, DEFAULTS, "bench", __doc__ or "")
    if opts["impl"] not in ("auto", "grouped"):
        raise UserError(f"bench: impl must be auto or grouped, got {opts['impl']!r}")
    return opts


@cli_guard
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = bench_config(opts)
    torch.manual_seed(0)
    print(f"KernelWarehouse bench: {describe(cfg)}, batch {opts['batch']}, {opts['size']} px, impl={opts['impl']}, "
          f"tau={opts['temperature']}, {'channels_last' if opts['channels_last'] else 'NCHW'}, "
          f"large allocations on the heap: {'yes' if heap_kept() else 'no (KW_HEAP=off)'}")
    records: list[dict[str, Any]] = []
    for name in split_list(str(opts["models"])):
        candidates = candidates_for(name, opts, cfg.device)
        rows = compare(candidates, cfg)
        print_table(rows, baseline=baseline_of(name), title=f"\n{name} vs {baseline_of(name)}")
        if name != baseline_of(name):
            split = macs_per_image(create_model(name), int(opts["size"]))
            print(f"analytic MACs/image of {name}: conv/linear {split['conv_linear'] / 1e9:.3f} G, kernel "
                  f"assembly {split['assembly'] / 1e9:.3f} G, attention {split['attention'] / 1e9:.4f} G")
            plain, official = baseline_of(name), f"{name} (official)"
            for mode in cfg.modes:
                line = f"{mode}: {name} costs {time_ratio(rows, mode, name, plain):.2f}x {plain}"
                if opts["official"]:
                    line += f"; ours is {time_ratio(rows, mode, official, name):.2f}x the official throughput"
                print(line)
            if opts["layers"]:
                models = {c.name: c for c in candidates}
                plain_infer = [r["seconds"] for r in rows if r["mode"] == "infer" and r["name"] == plain]
                x = torch.randn(int(opts["batch"]), 3, int(opts["size"]), int(opts["size"]), device=cfg.device)
                if opts["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                print_layer_rows(layer_rows(models[name].model, models[plain].model, x, cfg),
                                 plain_infer[0] if plain_infer else None)
        records += rows
    return records


if __name__ == "__main__":
    main()
