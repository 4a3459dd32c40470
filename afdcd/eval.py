"""Evaluate one segmentation checkpoint on a dataset's whole split (spec d): ours or official, one command.

    python -m afdcd.eval experiment=cityscapes_deeplabv3_mobilenetv2_afdcd data.root=/data/cityscapes \
        checkpoint=kd_deeplab_mobile_mobilenetv2_citys_best_model.pth
    python -m afdcd.eval experiment=voc_deeplabv3_resnet18_afdcd data.root=/data/voc checkpoint=RUN/best.pt \
        "evaluation.scales=[0.75,1.0,1.25]" evaluation.flip=true
    python -m afdcd.eval experiment=cityscapes_teacher_deeplabv3_resnet101 data.root=... \
        checkpoint=deeplabv3_resnet101_citys_best_model.pth

`checkpoint` may be one of our runs (`best.pt`, `last.pt`), a `python -m afdcd.convert` output, or an official
Af-DCD/CIRKD `.pth`; its keys say the architecture and class count, and a file that does not fit the row's
model (`model.student`) or the dataset's classes is refused by name. Whole images at full resolution, no sliding
window, batch 1; multi-scale averages upsampled logits, flip adds the mirrored image. Each image is scored
once over all ranks; absent classes count 0. The metrics go to `result.json` (kind=evaluated, the weights'
origin ours/official, real/synthetic data).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from common.checkpoint import read_checkpoint
from common.config import hydra_main, run_dir, save_resolved
from common.dist import cleanup, init_distributed
from common.engine import eval_loader, resolve_amp, resolve_channels_last, to_channels_last
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import EvalContext

from .convert import load_model
from .train import CONFIG_DIR, build_sets, parse, prepare_data, segmentation_task


def run(cfg: DictConfig) -> tuple[dict[str, float], Path]:
    r = parse(cfg)
    if cfg.get("checkpoint") is None:
        raise UserError("config checkpoint is not set: pass checkpoint=<best.pt of a run, a convert output, or an "
                        "official .pth>")
    if not Path(str(cfg.checkpoint)).expanduser().is_file():
        raise UserError(f"config checkpoint: no file at {cfg.checkpoint}")
    env = init_distributed(r.trainer.device)
    prepare_data(r.data, env)
    _, eval_set, _ = build_sets(r.data, train=False)
    obj, origin = read_checkpoint(cfg.checkpoint)
    model = load_model(obj, name=r.model.student, num_classes=r.data.num_classes, aux=False).to(env.device).eval()
    task = segmentation_task(r)
    loader = eval_loader(eval_set, r.trainer.eval_batch or 1, env, r.trainer.workers, task.collate)
    ctx = EvalContext(env, resolve_amp(r.trainer.amp, env.device), resolve_channels_last(r.trainer.channels_last,
                                                                                          env.device), True)
    if ctx.channels_last:
        to_channels_last(model)
    metrics = task.evaluate(model, loader, ctx)
    out = run_dir(cfg, "afdcd", f"eval_{cfg.name}")
    if env.is_main:
        save_resolved(cfg, out)
        write_record(out, evaluation_record("afdcd", cfg.name, cfg.get("row"), metrics, r.data.name, origin,
                                            str(cfg.get("profile", "full")), cfg.checkpoint, data_root=r.data.root,
                                            split=r.data.eval_split, scales=list(r.evaluation.scales),
                                            flip=r.evaluation.flip))
        print(f"{cfg.name} ({origin} checkpoint, {r.data.name} {r.data.eval_split}, {len(eval_set)} images): "  # type: ignore[arg-type]
              + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    cleanup()
    return metrics, out


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
