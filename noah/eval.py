"""Evaluate a checkpoint on the validation set of a row's data, in one command.

    python -m noah.eval experiment=noah_resnet50 data.root=/data/imagenet checkpoint=model_best.pth.tar
    python -m noah.eval experiment=noah_deit_small_patch16_224 data.root=... checkpoint=x.pth checkpoint_key=model_ema
    python -m noah.eval experiment=noah_resnet18 profile=smoke checkpoint=outputs/noah/.../best.pt

``checkpoint`` is one of our runs' ``last.pt`` / ``best.pt``, the output of ``noah.convert``, or a released
official file (any container of spec g, read without running its code and converted on the fly). Writes
``result.json`` (``common.results``: kind=evaluated, the weights' origin ours/official, real/synthetic).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from common.config import TrainerConfig, hydra_main, save_resolved, validate
from common.dist import cleanup, init_distributed
from common.engine import eval_loader, resolve_amp, resolve_channels_last, to_channels_last
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import EvalContext
from noah.convert import load_weights
from noah.train import CONFIG_DIR, PAPER, DataConfig, MethodConfig, ModelConfig, build_data, build_model, build_task


def run(cfg: DictConfig) -> dict[str, float]:
    model_cfg = validate(cfg.model, ModelConfig, "model.")
    data = validate(cfg.data, DataConfig, "data.")
    method = validate(cfg.method, MethodConfig, "method.")
    trainer_cfg = validate(cfg.trainer, TrainerConfig, "trainer.")
    if not cfg.get("checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=/path/to/model.pth (ours, a noah.convert output or "
                        "an official release)")
    task, _ = build_task(method, trainer_cfg, data)
    model = build_model(model_cfg, data, method)
    origin = load_weights(model, cfg.checkpoint, cfg.get("checkpoint_key"))
    env = init_distributed(trainer_cfg.device)
    _, val_set = build_data(data, train=False)
    model.to(env.device)
    amp = resolve_amp(trainer_cfg.amp, env.device)
    channels_last = resolve_channels_last(trainer_cfg.channels_last, env.device)
    if channels_last:
        to_channels_last(model)
    batch = trainer_cfg.eval_batch or trainer_cfg.max_device_batch or 100
    loader = eval_loader(val_set, batch, env, trainer_cfg.workers)
    metrics = task.evaluate(model, loader, EvalContext(env, amp, channels_last, show_progress=True))
    if env.is_main:
        out = Path(cfg.output_dir) / PAPER / cfg.name / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        save_resolved(cfg, out)
        dataset = "coco" if data.name.endswith("coco") else "imagenet"
        write_record(out, evaluation_record(PAPER, cfg.name, cfg.row, metrics, dataset, origin, cfg.profile,
                                            cfg.checkpoint, data_root=data.root,
                                            checkpoint_key=cfg.get("checkpoint_key")))
        print(f"{cfg.name} ({origin} checkpoint): " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
