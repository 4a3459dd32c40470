"""The multi-clip test of a checkpoint on a row's test split (pyskl's test: 10 clips, softmax averaged).

    python -m ske2grid.eval experiment=ske2grid_d5_ntu60_xsub_hrnet data.root=/data/pyskl checkpoint=best.pt
    python -m ske2grid.eval experiment=ske2grid_d6_pls_ntu60_xsub_hrnet data.root=... checkpoint=d5tod6_j.pth
    python -m ske2grid.eval experiment=ske2grid_d5_ntu60_xsub_hrnet profile=smoke checkpoint=outputs/.../best.pt

``checkpoint`` is one of our runs' ``best.pt`` / ``last.pt``, a ``ske2grid.convert`` output, or a released
official mmcv ``.pth`` (read with the restricted loader and converted on the fly; every GIT assignment
recomputed from its scores). Clips are folded into the batch; top-1, top-5 and mean class accuracy (%).
Writes ``result.json`` (``common.results.evaluation_record``: kind=evaluated, the weights' origin).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from common.checkpoint import extract_state_dict, load_state_dict_verbose, read_checkpoint
from common.config import hydra_main, save_resolved
from common.dist import cleanup, init_distributed
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import MultiClipClassificationTask
from ske2grid.convert import checkpoint_filter_fn
from ske2grid.train import (
    CLIP_DIMS,
    CONFIG_DIR,
    PAPER,
    build_datasets,
    build_model,
    strip_prefix,
    test_clips,
    validate_config,
)


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> str:
    """Load ``path`` into ``model``; returns the weights' origin, ``ours`` or ``official``."""
    obj, origin = read_checkpoint(path)
    if isinstance(obj, dict) and origin == "ours" and isinstance(obj.get("model"), dict):  # a run's best/last.pt
        load_state_dict_verbose(model, strip_prefix(obj["model"]),
                                source=f"checkpoint {path} (is it another row's checkpoint?)")
        return origin
    if isinstance(obj, dict) and obj.get("paper") == PAPER and "state_dict" in obj:  # a ske2grid.convert output
        load_state_dict_verbose(model, obj["state_dict"], source=f"converted checkpoint {path}")
        return origin
    try:
        state = extract_state_dict(obj, key)
    except UserError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    load_state_dict_verbose(model, checkpoint_filter_fn(state, model),
                            source=f"official checkpoint {path} (is it another row's checkpoint?)")
    return origin


def run(cfg: DictConfig) -> dict[str, float]:
    c = validate_config(cfg)
    if not cfg.get("checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=/path/to/best.pt (ours) or an official .pth")
    model = build_model(c)
    kind = load_weights(model, cfg.checkpoint, cfg.get("checkpoint_key"))
    test = build_datasets(c.data, c.trainer.selection)["test"]
    env = init_distributed(c.trainer.device)
    model.to(env.device)
    t = c.trainer
    batch = t.eval_batch or t.max_device_batch or t.global_batch  # videos; each holds test_clips clips
    task = MultiClipClassificationTask(c.data.num_classes, CLIP_DIMS)
    metrics = test_clips(model, test, task, env, batch, t.amp, t.channels_last, t.workers)
    if env.is_main:
        out = Path(cfg.output_dir) / PAPER / str(cfg.name) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        save_resolved(cfg, out)
        write_record(out, evaluation_record(PAPER, str(cfg.name), cfg.get("row"), metrics, c.data.name, kind,
                                            str(cfg.get("profile", "full")), str(cfg.checkpoint),
                                            data_root=c.data.root, test_split=c.data.test_split,
                                            test_clips=c.data.test_clips))
        print(f"{cfg.name} ({kind} checkpoint, {c.data.test_clips}-clip test on {c.data.test_split}): "
              + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
