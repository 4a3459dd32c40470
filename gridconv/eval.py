"""Evaluate a checkpoint with the official protocol (Human3.6M P1/P2 action-wise, per axis) or on the
MPI-INF-3DHP test set (PCK@150mm, AUC, per scene).

    python -m gridconv.eval experiment=gt_dgridconv_learnable data.root=/data/h36m checkpoint=.../best.pt
    python -m gridconv.eval experiment=gt_dgridconv_learnable data.root=/data/h36m \\
        checkpoint=gt_d-gridconv_autogrids.pth.tar            # an official release, converted on the fly
    python -m gridconv.eval experiment=gt_dgridconv_learnable data=mpi3dhp \\
        data.root=/data/mpi_inf_3dhp_valid.npz checkpoint=...

Official checkpoints pickle the optimizer object; they are read through the restricted unpickler
(``common.checkpoint``), never executed. Their padding modes come from the experiment (README: c r for
GT rows, c z for HRNet rows), their temperature from ``temperature=`` (default 30, as the official --eval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from common.checkpoint import load_checkpoint, load_state_dict_verbose
from common.config import hydra_main, run_dir, save_resolved
from common.errors import UserError

from .convert import load_official
from .data import read_h36m, read_mpi3dhp
from .models import build_model
from .train import CONFIG_DIR, PAPER, evaluate, validate_config

OFFICIAL_TEMPERATURE = 30.0


def load_model(path: str | Path, padding_mode: tuple[str, str],
               temperature: float | None) -> tuple[nn.Module, dict]:
    """Our checkpoint (weights_only) or, failing that, an official one through the converter."""
    try:
        saved = load_checkpoint(path)
    except UserError as err:
        if "other than tensors" not in str(err):
            raise
        model, meta = load_official(path, padding_mode, temperature or OFFICIAL_TEMPERATURE)
        return model, meta | {"source": "official"}
    except Exception as err:  # noqa: BLE001 - e.g. struct.error on a truncated file
        raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}); "
                        "re-download or re-save it") from None
    if "model" not in saved or "model_config" not in saved:
        raise UserError(f"{path} is not a gridconv checkpoint (no 'model' / 'model_config'); pass last.pt or "
                        "best.pt of a gridconv run, or an official .pth.tar")
    model = build_model(saved["model_config"])
    load_state_dict_verbose(model, saved["model"], source=str(path))
    if temperature is not None:
        model.set_temperature(temperature)
    return model, {"source": "ours", "state": saved.get("state", {})}


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
    record = {"checkpoint": str(cfg.checkpoint), "temperature": getattr(model, "temperature", None),
              "frames": len(poses), "metrics": metrics,
              "source": meta.get("source"), "official_meta": {k: v for k, v in meta.items() if k != "state"}}
    (out / "eval.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"{cfg.checkpoint} on {c.data.name} ({len(poses)} frames, T={record['temperature']}):")
    for key, value in metrics.items():
        print(f"  {key:<22s} {value:8.2f}")
    return record


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
