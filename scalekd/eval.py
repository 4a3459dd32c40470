"""Evaluate a ScaleKD student (or a teacher) from our run or an official file: one command, one result.json.

    python -m scalekd.eval experiment=swinl_resnet50 data.root=/data/imagenet checkpoint=RUN/best.pt
    python -m scalekd.eval experiment=swinl_resnet50 data.root=... checkpoint=swin-l_distill_res50.pth   # mmengine
    python -m scalekd.eval experiment=swinl_vit_b16 data.root=... checkpoint=ckpt.pth checkpoint_key=ema_state_dict
    python -m scalekd.eval experiment=teacher_swin_l data.root=... checkpoint=swin_large_..._22kto1k-5f0996db.pth

`checkpoint` may be our best.pt / last.pt, a `scalekd.convert` output, an official mmengine distillation
checkpoint (the student is taken; "state_dict" holds the EMA weights where the run had EMA, "ema_state_dict"
the raw ones), an mmcls model-zoo classifier or timm weights. The teacher rows evaluate the teacher. The
record (`common.results`, kind=evaluated) says whether the weights are ours or official.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn

from common.checkpoint import extract_state_dict, load_state_dict_verbose, read_checkpoint
from common.config import hydra_main, run_dir, save_resolved
from common.dist import cleanup, init_distributed
from common.engine import eval_loader
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import evaluate

from .convert import checkpoint_filter_fn
from .models import create_teacher
from .train import CONFIG_DIR, RunConfig, build_data, build_student, parse


def load_network(r: RunConfig, path: str, key: str | None = None) -> tuple[nn.Module, str]:
    """The row's evaluated network (the student, or the teacher on teacher rows) with `path`'s weights."""
    obj, origin = read_checkpoint(path)  # ours: weights_only; anything else: the safe official loader
    state = extract_state_dict(obj, key)
    if r.model.student is not None:
        net = build_student(r)
    else:
        assert r.model.teacher is not None
        net = create_teacher(r.model.teacher, num_classes=r.data.num_classes, **(r.model.teacher_kwargs or {}))
    load_state_dict_verbose(net, checkpoint_filter_fn(state, net), strict=True, source=f"checkpoint {path}")
    return net, origin


def run(cfg: DictConfig) -> dict[str, float]:
    r = parse(cfg)
    if cfg.get("checkpoint") is None:
        raise UserError("config checkpoint is not set: pass checkpoint=<best.pt of a run, a scalekd.convert "
                        "output, or an official .pth>")
    env = init_distributed(r.trainer.device)
    _, val_set = build_data(r.data)
    net, origin = load_network(r, str(cfg.checkpoint), cfg.get("checkpoint_key"))
    net = net.to(env.device).eval()
    loader = eval_loader(val_set, r.trainer.eval_batch or r.trainer.global_batch, env, r.trainer.workers)
    metrics = evaluate(net, loader, env)
    extra: dict[str, Any] = {"network": r.model.student or r.model.teacher,
                             "params": sum(p.numel() for p in net.parameters())}
    if env.is_main:
        out = run_dir(cfg, "scalekd", f"eval_{cfg.name}")
        save_resolved(cfg, out)
        write_record(out, evaluation_record("scalekd", str(cfg.name), cfg.get("row"), metrics, "imagenet", origin,
                                            str(cfg.get("profile", "full")), str(cfg.checkpoint),
                                            data_root=r.data.root, **extra))
        print(f"{cfg.name} ({origin} checkpoint, {extra['network']}): "
              + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
