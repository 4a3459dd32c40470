"""Evaluate a checkpoint on the validation set of a row's data.

    python -m kernelwarehouse.eval experiment=kw1x_resnet18 data.root=/data/imagenet checkpoint=kw1x_resnet18.pth
    python -m kernelwarehouse.eval experiment=kw1x_convnext_tiny ... checkpoint=x.pth checkpoint_key=model_ema
    python -m kernelwarehouse.eval experiment=kw1x_resnet18 profile=smoke checkpoint=outputs/.../best.pt

``checkpoint`` is one of our runs' ``last.pt`` / ``best.pt`` or a released official ``.pth`` (read with a
restricted unpickler and converted by ``kernelwarehouse.convert``; tau = 0 as in the official evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from common.checkpoint import load_foreign_state_dict
from common.config import TrainerConfig, hydra_main, save_resolved, validate
from common.dist import cleanup, init_distributed
from common.engine import eval_loader, resolve_amp, resolve_channels_last
from common.errors import UserError
from common.report import write_result
from common.tasks import evaluate
from kernelwarehouse.convert import load_official
from kernelwarehouse.train import (
    CONFIG_DIR,
    PAPER,
    DataConfig,
    MethodConfig,
    ModelConfig,
    build_data,
    build_model,
)


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> str:
    """Load our checkpoint or an official one into ``model``; returns which kind it was."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass checkpoint=/path/to/file.pth")
    state = load_foreign_state_dict(path, key)
    ours = model.state_dict()
    if all(k.startswith("model.") for k in state):  # a Trainer checkpoint of the method wrapper
        state = type(state)((k[len("model."):], v) for k, v in state.items())
    if set(state) == set(ours):
        mismatched = [k for k, v in state.items() if v.shape != ours[k].shape]
        if mismatched:
            raise UserError(f"checkpoint {path} does not fit model {type(model).__name__}: shape mismatch at "
                            f"{mismatched[:4]}; is it another row's checkpoint?")
        model.load_state_dict(state, strict=True)
        return "ours"
    try:
        load_official(model, state)
    except ValueError as err:
        raise UserError(f"checkpoint {path} fits neither our model nor the official one: {err}") from None
    return "official"


def run(cfg: DictConfig) -> dict[str, float]:
    model_cfg = validate(cfg.model, ModelConfig, "model.")
    data = validate(cfg.data, DataConfig, "data.")
    method = validate(cfg.method, MethodConfig, "method.")
    trainer_cfg = validate(cfg.trainer, TrainerConfig, "trainer.")
    if not cfg.get("checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=/path/to/model.pth (ours or an official release)")
    env = init_distributed(trainer_cfg.device)
    _, val_set = build_data(data, train=False)
    model = build_model(model_cfg, data, method)
    kind = load_weights(model, cfg.checkpoint, cfg.get("checkpoint_key"))
    model.to(env.device)
    amp = resolve_amp(trainer_cfg.amp, env.device)
    channels_last = resolve_channels_last(trainer_cfg.channels_last, env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batch = trainer_cfg.max_device_batch or 64
    metrics = evaluate(model, eval_loader(val_set, batch, env, trainer_cfg.workers), env, amp, channels_last,
                       show_progress=True)
    if env.is_main:
        out = Path(cfg.output_dir) / PAPER / cfg.name / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        save_resolved(cfg, out)
        write_result(out, PAPER, cfg.name, cfg.row, cfg.profile, metrics, seed=None,
                     checkpoint=str(cfg.checkpoint), checkpoint_kind=kind)
        print(f"{cfg.name} ({kind} checkpoint): " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
