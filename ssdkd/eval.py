"""Evaluate a student (or teacher) checkpoint on the real held-out split of a row's dataset.

    python -m ssdkd.eval experiment=cifar10_resnet34_resnet18_ssdkd data.root=/data/cifar10 checkpoint=RUN/best.pt
    python -m ssdkd.eval experiment=cifar10_wrn40_2_wrn16_1_fast2 data.root=... checkpoint=OFFICIAL_student.pth
    python -m ssdkd.eval experiment=... checkpoint=cifar10_resnet34.pth model.student=resnet34   # a teacher

`checkpoint` may be one of our runs (`best.pt`: the student; `last.pt`: its student part), an `ssdkd.convert`
output, or a Fast-Datafree / CMI release (`{'state_dict': ...}`), read with the restricted loader. The network is
`model.student`. The metrics go to `result.json` (`common.results`, kind=evaluated, origin ours/official,
real/synthetic data).
"""

from __future__ import annotations

from omegaconf import DictConfig

from common.config import hydra_main, run_dir, save_resolved
from common.dist import cleanup, init_distributed
from common.engine import eval_loader
from common.errors import UserError
from common.results import evaluation_record, write_record
from common.tasks import evaluate

from .convert import load_teacher, read_state_dict
from .train import CONFIG_DIR, build_data, parse


def run(cfg: DictConfig) -> dict[str, float]:
    r = parse(cfg)
    if cfg.get("checkpoint") is None:
        raise UserError("config checkpoint is not set: pass checkpoint=<best.pt of a run, or an official .pth>")
    env = init_distributed(r.trainer.device)
    _, val_set = build_data(r.data)
    _, origin = read_state_dict(cfg.checkpoint, "student")
    net = load_teacher(cfg.checkpoint, r.model.student, r.data.num_classes, what="student").to(env.device)
    metrics = evaluate(net, eval_loader(val_set, r.trainer.eval_batch or 256, env, r.trainer.workers), env)
    if env.is_main:
        out = run_dir(cfg, "ssdkd", f"eval_{cfg.name}")
        save_resolved(cfg, out)
        write_record(out, evaluation_record("ssdkd", cfg.name, cfg.get("row"), metrics, r.data.name, origin,  # type: ignore[arg-type]
                                            str(cfg.get("profile", "full")), cfg.checkpoint,
                                            data_root=r.data.root,
                                            arch=r.model.student))
        print(f"{cfg.name} ({origin} checkpoint, {r.model.student}): " +
              " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    cleanup()
    return metrics


@hydra_main(CONFIG_DIR)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
