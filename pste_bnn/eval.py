"""Evaluate one pste_bnn checkpoint on a row's evaluation set: ours, a `convert` output, or an official file.

    python -m pste_bnn.eval experiment=imagenet_r18_snn_tau5 data.root=/data/imagenet checkpoint=RUN/best.pt
    python -m pste_bnn.eval experiment=imagenet_r18_snn_tau5 data.root=... checkpoint=checkpoint.pth.tar \
        export=r18_tau5_export.pt                     # official SNN step-2 file, read without running its code

The network is the row's (`model`, `method.quantizer`, `method.tau`); the weights go through
`convert.checkpoint_filter_fn` and load strictly. Top-1 / top-5, size and BOPs (b.12) go to `result.json`
(kind=evaluated, the weights' origin ours/official, real/synthetic data). `export` writes the deployable form
(per layer: codeword ids, tau-bit index map, alpha; b.9), and the exported network is scored too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from common.checkpoint import atomic_save, extract_state_dict, load_state_dict_verbose, read_checkpoint
from common.config import hydra_main, run_dir, save_resolved
from common.dist import cleanup, init_distributed
from common.engine import eval_loader
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import evaluate

from .accounting import accounting
from .config import build_network
from .convert import checkpoint_filter_fn
from .data import build_data
from .models import SubBitNet
from .sparks import ExportedBinaryConv, HardBinaryConv
from .train import CONFIG_DIR, PAPER, parse


def load_weights(net: SubBitNet, path: str, key: str | None = None) -> str:
    """Our run checkpoint, a convert output or an official file -> `net` (strict); returns the origin."""
    obj, origin = read_checkpoint(path)
    load_state_dict_verbose(net, checkpoint_filter_fn(extract_state_dict(obj, key), net), strict=True, source=path)
    return origin


def exported_network(net: SubBitNet) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """A copy of `net` whose binary convs are `ExportedBinaryConv`s built from their export (b.9)."""
    import copy

    net = net.eval()
    layers = {name: conv.export() for name, conv in net.named_modules() if isinstance(conv, HardBinaryConv)}
    deployed = copy.deepcopy(net)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(deployed.get_submodule(parent) if parent else deployed, child, ExportedBinaryConv(layer))
    return deployed.eval(), layers


def run(cfg: DictConfig) -> dict[str, float]:
    r = parse(cfg)
    if cfg.get("checkpoint") is None:
        raise UserError("config checkpoint is not set: pass checkpoint=<best.pt of a run, a convert output, "
                        "or an official checkpoint*.pth.tar>")
    env = init_distributed(r.trainer.device)
    _, val_set = build_data(r.data)
    net = build_network(r.model, r.method)
    origin = load_weights(net, str(cfg.checkpoint), cfg.get("checkpoint_key"))
    net = net.to(env.device).eval()
    loader = eval_loader(val_set, r.trainer.eval_batch or r.trainer.global_batch, env, r.trainer.workers)
    metrics = dict(evaluate(net, loader, env))
    tau = 9 if r.method.quantizer in ("real", "bnn") else r.method.tau
    counts = accounting(net, tau, r.data.image_size)
    if r.method.quantizer != "real":
        deployed, layers = exported_network(net)
        metrics.update({f"{k}_export": v for k, v in evaluate(deployed, loader, env).items()})
    if env.is_main:
        out = run_dir(cfg, PAPER, f"eval_{cfg.name}")
        save_resolved(cfg, out)
        dataset = "cifar10" if r.data.name.startswith("synthetic") else r.data.name
        write_record(out, evaluation_record(PAPER, str(cfg.name), cfg.get("row"), metrics, dataset, origin,
                                            str(cfg.get("profile", "full")), cfg.checkpoint, data_root=r.data.root,
                                            accounting={"tau": tau, **counts}))
        print(f"{cfg.name} ({origin} checkpoint): " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
              + f" size_bits={counts['size_bits']} bops={counts['bops_subbit']}")
        if cfg.get("export"):
            if r.method.quantizer == "real":
                raise UserError("export: a step-1 (real-weight) network has no binary export; evaluate a step-2 row")
            atomic_save({"layers": layers, "tau": tau, "model": r.model.name}, Path(cfg.export))
            print(f"wrote the export (ids, index map, alpha per layer) to {cfg.export}")
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
