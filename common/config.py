"""Hydra glue: typed validation with one-line errors, the run directory, the saved resolved config.

Each paper's `configs/train.yaml` composes groups (model/, data/, method/, optim/, schedule/,
profile/) and one `experiment/<row>.yaml` per table row. Its entry point is

    @hydra_main(CONFIG_DIR)
    def main(cfg: DictConfig) -> None: ...

which runs under `@hydra.main` (overrides, `--cfg job`, `-m` sweeps all work) and turns a
`UserError` into one line on stderr. `validate(cfg.trainer, TrainerConfig)` checks a group against a
dataclass schema: an unknown key or a value of the wrong type names the key in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError, cli_guard

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Schemas shared by the classification-style papers (a paper adds its own `method` schema)
# --------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name: sgd, momentum, adamw, adam, lamb ...
    lr: float = 0.1  # the lr at `base_batch`; scaled to the global batch by `lr_scaling`
    base_batch: int | None = None  # None: lr is used as given
    lr_scaling: str = "linear"  # linear | sqrt | none
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_1d: bool = False  # no weight decay on biases and norm parameters (timm's filter_bias_and_bn)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | multistep | constant
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 30.0  # step
    milestones: list[int] = field(default_factory=list)  # multistep
    decay_rate: float = 0.1
    per_step: bool = True  # update the lr every optimizer step (else at epoch boundaries)
    warmup_prefix: bool = False  # False (timm/DeiT): the decay curve counts the warmup epochs; True: starts after


@dataclass
class TrainerConfig:
    epochs: int = 100
    global_batch: int = 256
    max_device_batch: int | None = None  # cap per device; the rest is gradient accumulation
    workers: int = 4
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    channels_last: str = "auto"  # auto (on GPU) | on | off
    clip_grad: float | None = None
    ema_decay: float | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    log_every: int = 50
    ckpt_every_steps: int = 0  # 0: only at epoch ends (and on SIGTERM)
    eval_every: int = 1  # epochs
    max_steps: int | None = None  # stop after this many optimizer steps (tests, quick looks)
    seed: int = 0
    resume: str = "auto"  # auto | none | <path to last.pt>
    compile: bool = False
    ddp_find_unused_parameters: bool = False  # for methods whose extra parts skip some steps

    def __post_init__(self) -> None:
        for key in ("epochs", "global_batch", "log_every", "eval_every"):
            if getattr(self, key) < 1:
                raise UserError(f"config trainer.{key}={getattr(self, key)}: must be at least 1")
        for key in ("max_device_batch", "max_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"config trainer.{key}={value}: must be at least 1 (or null)")
        if self.workers < 0 or self.ckpt_every_steps < 0:
            raise UserError("config trainer.workers and trainer.ckpt_every_steps must not be negative")


@dataclass
class LoggerConfig:
    wandb_mode: str = "disabled"  # disabled | offline | online
    project: str = "osvai-repro"


# --------------------------------------------------------------------------------------------------
# Validation and composition
# --------------------------------------------------------------------------------------------------


def validate(cfg: Any, schema: type[T], prefix: str = "") -> T:
    """Check `cfg` against the dataclass `schema` and return a typed instance.

    Unknown keys, missing required values and wrong types become a one-line `UserError`
    naming the full key (with `prefix`, e.g. "trainer.").
    """
    try:
        if isinstance(cfg, DictConfig):  # resolve interpolations against the whole config first
            cfg = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(err).splitlines()[0]
        raise UserError(f"config {prefix}{key}: {msg}" if key else f"config {prefix.rstrip('.')}: {msg}") from None
    return obj  # type: ignore[return-value]


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"config {key}={value!r}: choose one of {', '.join(map(str, choices))}")


def compose(config_dir: str | os.PathLike, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose a config outside `@hydra.main` (tests, reproduce scripts); errors are one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"config: {str(err).splitlines()[0]}") from None


def run_dir(cfg: DictConfig, paper: str, experiment: str) -> Path:
    """Hydra's output directory when running under @hydra.main, else outputs/<paper>/<experiment>/<time>."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    base = Path(cfg.get("output_dir", "outputs") if isinstance(cfg, DictConfig) else "outputs")
    return base / paper / experiment / time.strftime("%Y%m%d-%H%M%S")


def save_resolved(cfg: DictConfig, directory: str | os.PathLike) -> Path:
    """Write the fully resolved config as `config.yaml` in the run directory."""
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance (or DictConfig) as a plain dict."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)  # type: ignore[arg-type]
    return OmegaConf.to_container(obj, resolve=True)  # type: ignore[return-value]


Task = Callable[[DictConfig], Any]


def hydra_main(config_dir: str | os.PathLike, config_name: str = "train") -> Callable[[Task], Callable[[], Any]]:
    """`@hydra.main` for an entry point in `config_dir`, with `UserError` shown as one line (exit 2)."""
    import hydra

    def decorate(task: Task) -> Callable[[], Any]:
        guarded = cli_guard(task)

        @functools.wraps(task)
        def entry() -> Any:
            return hydra.main(version_base=None, config_path=str(Path(config_dir).resolve()),
                              config_name=config_name)(guarded)()

        return entry

    return decorate
