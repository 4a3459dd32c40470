"""Evaluate a NORM student before and after folding the FT into its classifier (or a plain network).

    python -m norm.eval experiment=cifar100_resnet32x4_resnet8x4 data.root=/data/cifar100 checkpoint=RUN/best.pt
    python -m norm.eval experiment=cifar100_resnet32x4_resnet8x4 data.root=... checkpoint=OFFICIAL_best.pth \
        export=resnet8x4_deployed.pt

`checkpoint` may be one of our runs (`best.pt`, `last.pt`) or an official NORM / RepDistiller file.
`export` writes the deployed (folded, plain-architecture) state dict. The metrics go to `result.json`
(`common.results`, kind=evaluated, with the weights' origin ours/official and real/synthetic data).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from common.checkpoint import atomic_save
from common.config import hydra_main, run_dir, save_resolved
from common.dist import cleanup, init_distributed
from common.engine import eval_loader
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import evaluate

from .convert import load_student, load_teacher, read_state_dict
from .models import create_model, is_foldable
from .train import CONFIG_DIR, build_data, parse


def run(cfg: DictConfig) -> dict[str, float]:
    r = parse(cfg)
    if cfg.get("checkpoint") is None:
        raise UserError("config checkpoint is not set: pass checkpoint=<best.pt of a run, or an official .pth>")
    env = init_distributed(r.trainer.device)
    _, val_set = build_data(r.data)
    loader = eval_loader(val_set, r.trainer.global_batch, env, r.trainer.workers)
    nc = r.data.num_classes
    metrics: dict[str, float] = {}
    state, origin = read_state_dict(cfg.checkpoint)  # ours: weights_only; official: the safe official loader
    if r.method.name == "ce":
        net = load_teacher(state, r.model.student, nc).to(env.device)
        metrics.update({f"{k}": v for k, v in evaluate(net, loader, env).items()})
        deployed = net
    else:
        assert r.model.teacher is not None
        teacher_channels = create_model(r.model.teacher, nc).num_features
        student = load_student(state, r.model.student, teacher_channels, nc).to(env.device).eval()
        metrics.update({f"{k}_unfolded": v for k, v in evaluate(student, loader, env).items()})
        if not is_foldable(student.net):
            raise UserError(f"{r.model.student} students cannot be folded exactly (spec b.5); "
                            f"unfolded top1 {metrics['top1_unfolded']:.2f}")
        deployed = student.fold()
        metrics.update({f"{k}_folded": v for k, v in evaluate(deployed, loader, env).items()})
        metrics["params_deployed"] = float(sum(p.numel() for p in deployed.parameters()))
        metrics["params_train"] = float(sum(p.numel() for p in student.parameters()))
    if env.is_main:
        out = run_dir(cfg, "norm", f"eval_{cfg.name}")
        save_resolved(cfg, out)
        write_record(out, evaluation_record("norm", cfg.name, cfg.get("row"), metrics, r.data.name, origin,
                                            str(cfg.get("profile", "full")), cfg.checkpoint, data_root=r.data.root))
        print(f"{cfg.name} ({origin} checkpoint): " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        if cfg.get("export"):
            atomic_save({k: v.cpu() for k, v in deployed.state_dict().items()}, Path(cfg.export))
            print(f"wrote the deployed {r.model.student} to {cfg.export}")
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
