"""Evaluate a checkpoint on the validation set of a row's data.

    python -m kernelwarehouse.eval experiment=kw1x_resnet18 data.root=/data/imagenet checkpoint=kw1x_resnet18.pth
    python -m kernelwarehouse.eval experiment=kw1x_convnext_tiny ... checkpoint=x.pth checkpoint_key=model_ema
    python -m kernelwarehouse.eval experiment=kw1x_resnet18 profile=smoke checkpoint=outputs/.../best.pt

``checkpoint`` is one of our runs' ``last.pt`` / ``best.pt``, the output of ``kernelwarehouse.convert``, or a
released official ``.pth`` (read safely and converted on the fly; tau = 0 as in the official evaluation).
Writes ``result.json`` (``common.results``: kind=evaluated, the weights' origin ours/official, real/synthetic).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from common.checkpoint import extract_state_dict, load_state_dict_verbose, read_checkpoint
from common.config import TrainerConfig, hydra_main, save_resolved, validate
from common.dist import cleanup, init_distributed
from common.engine import eval_loader, resolve_amp, resolve_channels_last, to_channels_last
from common.errors import UserError
from common.results import evaluation_record, write_record
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
    """Load ``path`` into ``model``; returns the weights' origin, ``ours`` or ``official``.

    Our files (a run's ``last.pt`` / ``best.pt``, or ``kernelwarehouse.convert``'s output) are read with
    ``weights_only=True``; anything else is an official release, read safely and converted by
    ``kernelwarehouse.convert.checkpoint_filter_fn`` (tau = 0, as in the official evaluation).
    """
    obj, origin = read_checkpoint(path)
    if isinstance(obj, dict) and origin == "ours":  # a run checkpoint: {"model": the method wrapper's state}
        state = obj["model"]
        if all(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items()}
        load_state_dict_verbose(model, state, source=f"checkpoint {path} (is it another row's checkpoint?)")
        return origin
    if isinstance(obj, dict) and obj.get("paper") == PAPER and "state_dict" in obj:  # converted already
        load_state_dict_verbose(model, obj["state_dict"], source=f"converted checkpoint {path}")
        return origin
    try:
        load_official(model, extract_state_dict(obj, key))
    except ValueError as err:
        raise UserError(f"checkpoint {path} fits neither our model nor the official one: {err}") from None
    return origin


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
        to_channels_last(model)
    batch = trainer_cfg.max_device_batch or 64
    metrics = evaluate(model, eval_loader(val_set, batch, env, trainer_cfg.workers), env, amp, channels_last,
                       show_progress=True)
    if env.is_main:
        out = Path(cfg.output_dir) / PAPER / cfg.name / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        save_resolved(cfg, out)
        write_record(out, evaluation_record(PAPER, cfg.name, cfg.row, metrics, data.name, kind, cfg.profile,
                                            cfg.checkpoint, data_root=data.root,
                                            checkpoint_key=cfg.get("checkpoint_key")))
        print(f"{cfg.name} ({kind} checkpoint): " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
