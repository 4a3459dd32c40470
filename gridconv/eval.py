"""Evaluate a checkpoint with the official protocol (Human3.6M P1/P2 action-wise, per axis) or on the
MPI-INF-3DHP test set (PCK@150mm, AUC, per scene).

    python -m gridconv.eval experiment=gt_dgridconv_learnable data.root=/data/h36m checkpoint=.../best.pt
    python -m gridconv.eval experiment=gt_dgridconv_learnable data.root=/data/h36m \\
        checkpoint=gt_d-gridconv_autogrids.pth.tar            # an official release, converted on the fly
    python -m gridconv.eval experiment=gt_dgridconv_learnable data=mpi3dhp \\
        data.root=/data/mpi_inf_3dhp_valid.npz checkpoint=...

Official checkpoints pickle the optimizer object; they are read safely (``common.checkpoint``: the allow-list,
then the restricted unpickler), never executed; ``gridconv.convert``'s output is read with ``weights_only``.
The metrics go to ``result.json`` (``common.results``: kind=evaluated, origin ours/official, real/synthetic).
Official releases take their padding modes from the experiment (README: c r for
GT rows, c z for HRNet rows), their temperature from ``temperature=`` (default 30, as the official --eval).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from common.checkpoint import load_state_dict_verbose, read_checkpoint
from common.config import hydra_main, run_dir, save_resolved
from common.errors import UserError
from common.results import evaluation_record, write_record

from .convert import official_from_checkpoint
from .data import read_h36m, read_mpi3dhp
from .models import build_model
from .train import CONFIG_DIR, PAPER, evaluate, validate_config

OFFICIAL_TEMPERATURE = 30.0


def load_model(path: str | Path, padding_mode: tuple[str, str],
               temperature: float | None) -> tuple[nn.Module, dict]:
    """Any checkpoint eval / infer are given: ours (a run's last.pt / best.pt) or ``gridconv.convert``'s
    output, read with ``weights_only=True``; an official release through the safe official loader and the
    converter. ``meta["source"]`` is the weights' origin, ``ours`` or ``official``."""
    saved, origin = read_checkpoint(path)
    if not isinstance(saved, Mapping):
        raise UserError(f"{path} holds a {type(saved).__name__}, not a gridconv checkpoint")
    if origin == "official" and not (saved.get("paper") == PAPER and "state_dict" in saved):  # a release
        model, meta = official_from_checkpoint(saved, padding_mode, temperature or OFFICIAL_TEMPERATURE,
                                               source=str(path))
        return model, meta | {"source": "official"}
    weights, config = (saved.get("state_dict"), saved.get("model_config")) if origin == "official" else (
        saved.get("model"), saved.get("model_config"))
    if weights is None or config is None:
        raise UserError(f"{path} is not a gridconv checkpoint (no weights / 'model_config'); pass last.pt or "
                        "best.pt of a gridconv run, the output of gridconv.convert, or an official .pth.tar")
    model = build_model(config)
    load_state_dict_verbose(model, weights, source=str(path))
    if temperature is not None:
        model.set_temperature(temperature)
    extra = {"state": saved.get("state", {})} if origin == "ours" else dict(saved.get("official_meta") or {})
    return model, {"source": origin, **extra}


def run(cfg: DictConfig) -> dict[str, Any]:
    c = validate_config(cfg)
    if not cfg.get("checkpoint"):
        raise UserError("checkpoint is not set: pass checkpoint=<last.pt | best.pt | official .pth.tar>")
    if c.data.root is None:
        raise UserError("data.root is not set: pass the Human3.6M folder (or data=mpi3dhp data.root=<npz>)")
    device = torch.device("cuda" if torch.cuda.is_available() and c.trainer.device != "cpu" else "cpu")
    model, meta = load_model(cfg.checkpoint, tuple(c.model.padding_mode), cfg.get("temperature"))
    model.to(device)
    if c.data.name == "mpi3dhp":
        poses = read_mpi3dhp(c.data.root)
    else:
        poses = read_h36m(c.data.root, "test", c.data.input, c.data.exclude_drift)
    metrics = evaluate(model, poses, c.trainer.eval_batch, device, c.trainer.amp,
                       "mpi3dhp" if c.data.name == "mpi3dhp" else "h36m")
    out = run_dir(cfg, PAPER, f"eval_{cfg.name}")
    save_resolved(cfg, out)
    temperature = getattr(model, "temperature", None)
    official_meta = {k: v for k, v in meta.items() if k not in ("state", "source")}
    record = {"checkpoint": str(cfg.checkpoint), "temperature": temperature, "frames": len(poses),
              "metrics": metrics, "source": meta["source"], "official_meta": official_meta}
    write_record(out, evaluation_record(PAPER, str(cfg.name), cfg.get("row"), metrics, c.data.name, meta["source"],
                                        str(cfg.get("profile", "full")), cfg.checkpoint, data_root=c.data.root,
                                        temperature=None if temperature is None else float(temperature),
                                        frames=len(poses), official_meta=json.loads(json.dumps(official_meta,
                                                                                               default=str))))
    print(f"{cfg.checkpoint} on {c.data.name} ({len(poses)} frames, T={record['temperature']}):")
    for key, value in metrics.items():
        print(f"  {key:<22s} {value:8.2f}")
    return record


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
