"""Issue 8 item 1 (one training loop): `ssdkd.bench` times `DataFreeKD.run_epoch` (its own SGD steps in
`kd_train_step`), `ssdkd.train` runs `HarnessDistiller` on common's Trainer. The same small config is run both ways
from the same teacher, student initialisation and seed, and the students, KD steps, samples synthesised and the
learning rate of every student step are compared.

They are the same maths. One difference was found this way and fixed: synthesis backpropagates its adversarial
(Fast, SSD-KD) or JS + student-BN (DeepInversion) term through the student, which leaves gradients on the
student's parameters. `kd_train_step` zeroes the gradients before its backward (as Fast's `datafree_kd.py::train`
does); the Trainer zeroes only after each step, so `ssdkd.train`'s first KD step of every epoch added the epoch's
synthesis gradients to its KD gradient, until `HarnessDistiller.synthesize_epoch` discarded them. Rows in `LEAKS`
fail this test without that line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common.checkpoint import load_checkpoint
from common.config import compose
from common.engine import seed_everything
from ssdkd.bench import build_bench_runs
from ssdkd.convert import load_teacher
from ssdkd.train import CONFIG_DIR, run

TINY = ["profile=smoke", "data.train_per_class=2", "data.test_per_class=2", "method.warmup=1", "trainer.epochs=3",
        "method.kd_batch_size=8", "method.kd_steps_per_epoch=3", "method.synthesis.batch_size=8",
        "trainer.log_every=1"]
GEN = ["method.synthesis.nz=16", "method.synthesis.ngf=8"]
SSD = ["experiment=cifar10_wrn40_2_wrn16_1_ssdkd", "method.store.capacity=12", "method.store.replace_per_call=4", *GEN]
ROWS = {
    # the random teacher gives every image one class, so phi_div = 0 and SSD-KD's phi-weighted adversarial term
    # (hence its gradient on the student) vanishes; without phi_div the same term reaches the student
    "ssdkd": SSD,
    "ssdkd_no_div": [*SSD, "method.phi.use_div=false"],
    "fast2": ["experiment=cifar10_wrn40_2_wrn16_1_fast2", *GEN],
    "deepinv2k": ["experiment=cifar10_wrn40_2_wrn16_1_deepinv2k", "method.synthesis.iterations=4"],
}
LEAKS = ("ssdkd_no_div", "fast2", "deepinv2k")  # rows whose synthesis leaves non-zero student gradients here


class StudentSteps:
    """Records the lr of every SGD step (the student's optimiser is the only SGD; synthesis uses Adam)."""

    def __enter__(self) -> list[float]:
        self.lrs: list[float] = []
        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self.lrs

    def _hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if isinstance(opt, torch.optim.SGD):
            self.lrs.append(float(opt.param_groups[0]["lr"]))

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _both_paths(tmp_path: Path, teacher_file: Path, row: str) -> None:
    cfg = compose(CONFIG_DIR, [*ROWS[row], *TINY, f"model.teacher_checkpoint={teacher_file}",
                               f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'train'}"])
    # (a) ssdkd.train: HarnessDistiller on common.engine.Trainer
    with StudentSteps() as lrs_train:
        metrics, out = run(cfg)
    state = load_checkpoint(out / "last.pt")["model"]
    trained = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    extra = state["_extra_state"]

    # (b) ssdkd.bench: DataFreeKD.run_epoch, built by build_bench_runs (student from the seed, method from seed + 1,
    # as ssdkd.train builds them), then seeded as Trainer.fit seeds before its first synthesis (the bench itself
    # does not re-seed: its draws are another sample of the same process)
    plain = OmegaConf.to_container(cfg, resolve=True)
    seed, epochs = int(plain["trainer"]["seed"]), int(plain["trainer"]["epochs"])
    teacher = load_teacher(teacher_file, plain["model"]["teacher"], int(plain["data"]["num_classes"]))
    bench = build_bench_runs({row: plain}, teacher, seed=seed)[row]
    init = {k: v.clone() for k, v in bench.student.state_dict().items()}
    seed_everything(seed)
    with StudentSteps() as lrs_bench:
        hist = [bench.epoch() for _ in range(epochs)]
    m = bench.method

    kd_epochs = epochs - int(plain["method"]["warmup"])
    assert len(lrs_train) == len(lrs_bench) == kd_epochs * m.kd_steps == m.kd_step_count == extra["kd_step_count"]
    assert len(set(lrs_bench)) == kd_epochs  # the per-epoch cosine moved
    assert lrs_bench == pytest.approx(lrs_train, rel=1e-6)
    assert m.n_generated == extra["n_generated"] == metrics["samples_generated"] == hist[-1]["samples_generated"] > 0
    assert len(m.pool) == metrics["buffer_size"]
    got = bench.student.state_dict()
    assert got.keys() == trained.keys()
    off = {}
    for k, v in got.items():
        if not v.is_floating_point():
            assert torch.equal(v, trained[k]), k  # BN batch counters
            continue
        moved = float((v - init[k]).abs().max())  # judged against how far the KD steps moved this tensor
        if moved > 0:
            off[k] = float((v - trained[k]).abs().max()) / moved
        else:
            assert torch.equal(v, trained[k]), k
    assert max(off.values()) < 1e-3, sorted(off.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("row", list(ROWS))
def test_bench_loop_is_the_training_loop(tmp_path: Path, teacher_file: Path, row: str) -> None:
    _both_paths(tmp_path, teacher_file, row)
