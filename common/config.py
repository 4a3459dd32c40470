"""Hydra glue: the shared structured configs, one-line errors, the run directory, the saved config.

The trainer, optimizer, schedule and logger schemas below are registered once in Hydra's ConfigStore
(`osvai_base`), which is on every config search path. A paper's `configs/train.yaml` starts with it and
then lists only its own groups:

    defaults:
      - osvai_base        # trainer / optim / schedule / logger, typed (common.config)
      - _self_
      - model: ...        # the paper's own groups
      - optim: sgd        # files in the paper's optim/ and schedule/ groups fill the shared schemas

so a wrong key (`trainer.epochz=3`) or a wrong type or choice (`trainer.amp=fp8`) fails while Hydra
composes, and value ranges are checked right after (`check_schemas`): either way one line naming the
key. Each entry point is

    @hydra_main(CONFIG_DIR)
    def main(cfg: DictConfig) -> None: ...

which runs under `@hydra.main` (overrides, `--cfg job`, `-m` sweeps all work) and turns a `UserError`
into one line on stderr. `validate(cfg.model, ModelConfig, "model.")` checks a paper's own group
against its dataclass the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError, cli_guard

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------------


class Device(StrEnum):
    auto = "auto"  # cuda if visible, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Amp(StrEnum):
    auto = "auto"  # bf16 on GPU (fp16 + scaler where bf16 is missing), off on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class Switch(StrEnum):
    auto = "auto"  # on for GPU, off on CPU
    on = "on"
    off = "off"


class Selection(StrEnum):
    """Which weights the final metrics belong to (`result.json`'s `selection`)."""

    last = "last"  # the last epoch
    best_heldout = "best_heldout"  # the best epoch on a held-out split of the training data
    best_test = "best_test"  # the best epoch on the evaluation set itself (the official practice of some papers)


class LrScaling(StrEnum):
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class ScheduleName(StrEnum):
    cosine = "cosine"
    step = "step"
    multistep = "multistep"
    constant = "constant"
    poly = "poly"  # lr * (1 - t / T)^power over the whole run (segmentation recipes)


class WandbMode(StrEnum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


# --------------------------------------------------------------------------------------------------
# Schemas shared by every paper (a paper adds its own model / data / method schemas)
# --------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name: sgd, momentum, adamw, adam, lamb ...
    lr: float = 0.1  # the lr at `base_batch`; scaled to the global batch by `lr_scaling`
    base_batch: int | None = None  # None: lr is used as given
    lr_scaling: LrScaling = LrScaling.linear
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_1d: bool = False  # no weight decay on biases and norm parameters (timm's filter_bias_and_bn)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise UserError(f"config optim.lr={self.lr}, optim.weight_decay={self.weight_decay}: the lr must be "
                            "positive and the weight decay not negative")
        _check_optimizer_name(self.name)


def _check_optimizer_name(name: str) -> None:
    """`optim.name` is any name timm's optimizer factory takes (an open set, so a str and not an Enum): checked
    here, while composing, so that a wrong name fails before a run directory or a dataset is written."""
    from timm.optim import get_optimizer_info, list_optimizers

    try:  # timm's own parsing: "lookahead_<name>" wraps <name>
        get_optimizer_info(str(name).lower().split("_")[-1])
    except ValueError:
        common = ", ".join(n for n in ("sgd", "momentum", "adam", "adamw", "lamb", "lion") if n in list_optimizers())
        raise UserError(f"config optim.name={name!r}: not an optimizer timm knows (e.g. {common}; "
                        "timm.optim.list_optimizers() lists all)") from None


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 30.0  # step
    milestones: list[int] = field(default_factory=list)  # multistep: the lr drops at the start of these epochs
    decay_rate: float = 0.1
    power: float = 0.9  # poly
    per_step: bool = True  # update the lr every optimizer step (else at epoch boundaries)
    warmup_prefix: bool = False  # False (timm/DeiT): the decay curve counts the warmup epochs; True: starts after

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0 or self.decay_epochs <= 0:
            raise UserError(f"config schedule.warmup_epochs={self.warmup_epochs}, schedule.decay_epochs="
                            f"{self.decay_epochs}: warmup must not be negative, decay_epochs must be positive")
        if self.power <= 0:
            raise UserError(f"config schedule.power={self.power}: the poly power must be positive")


@dataclass
class TrainerConfig:
    epochs: int = 100
    iterations: int | None = None  # iteration budget: this many optimizer steps (epochs follow); reaching it = complete
    global_batch: int = 256
    max_device_batch: int | None = None  # cap per device; the rest is gradient accumulation
    eval_batch: int | None = None  # per-device evaluation batch (None: the training per-device batch)
    workers: int = 4
    device: Device = Device.auto
    amp: Amp = Amp.auto
    channels_last: Switch = Switch.auto
    deterministic: bool = False  # torch.use_deterministic_algorithms
    clip_grad: float | None = None
    ema_decay: float | None = None
    label_smoothing: float = 0.0  # classification tasks
    mixup: float = 0.0  # classification tasks
    cutmix: float = 0.0  # classification tasks
    precise_bn_batches: int = 0  # before each evaluation, recompute BatchNorm statistics from N batches (0: off)
    log_every: int = 50
    ckpt_every_steps: int = 0  # 0: only at epoch ends (and on SIGTERM)
    eval_every: int = 1  # epochs
    eval_every_steps: int = 0  # evaluate every N optimizer steps instead of at epoch ends (0: off)
    max_steps: int | None = None  # stop after this many optimizer steps (tests, quick looks): not complete
    selection: Selection = Selection.last
    seed: int = 0
    resume: str = "auto"  # auto | none | <path to last.pt>
    compile: bool = False
    ddp_find_unused_parameters: bool = False  # for methods whose extra parts skip some steps

    def __post_init__(self) -> None:
        for key in ("epochs", "global_batch", "log_every", "eval_every"):
            if getattr(self, key) < 1:
                raise UserError(f"config trainer.{key}={getattr(self, key)}: must be at least 1")
        for key in ("max_device_batch", "max_steps", "eval_batch", "iterations"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"config trainer.{key}={value}: must be at least 1 (or null)")
        for key in ("workers", "ckpt_every_steps", "precise_bn_batches", "eval_every_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"config trainer.{key}={getattr(self, key)}: must not be negative")


CLASSIFICATION_OPTIONS = ("mixup", "cutmix", "label_smoothing")  # TrainerConfig keys only classification reads


def refuse_unused_trainer_options(trainer: Any, unused: tuple[str, ...], reason: str) -> None:
    """A shared trainer option this paper's training never reads, set away from its default: one line naming it.

    The shared `TrainerConfig` carries options of one kind of work (mixup, cutmix and label smoothing belong to
    image classification); a paper whose training ignores one refuses it instead of recording a value that
    changed nothing.
    """
    defaults = TrainerConfig()
    for key in unused:
        value = trainer.get(key, getattr(defaults, key)) if hasattr(trainer, "get") else getattr(trainer, key)
        if value != getattr(defaults, key):
            raise UserError(f"config trainer.{key}={value}: {reason}, so it would change nothing; leave it at "
                            f"{getattr(defaults, key)}")


def refusing_unused_trainer_options(check: Callable[[Any], T], unused: tuple[str, ...],
                                    reason: str) -> Callable[[Any], T]:
    """`check` (a paper's config validation, returning an object with `.trainer`) followed by
    `refuse_unused_trainer_options` on that trainer group: a paper's `hydra_main(check=...)` and its `run`."""
    @functools.wraps(check)
    def checked(cfg: Any) -> T:
        run = check(cfg)
        refuse_unused_trainer_options(run.trainer, unused, reason)  # type: ignore[attr-defined]
        return run

    return checked


@dataclass
class LoggerConfig:
    wandb_mode: WandbMode = WandbMode.disabled
    project: str = "osvai-repro"


SHARED_SCHEMAS: dict[str, type] = {"trainer": TrainerConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                                   "logger": LoggerConfig}


def _register() -> None:
    """Put the shared schemas in Hydra's ConfigStore as `osvai_base` (on every config search path)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="osvai_base", node={k: v for k, v in SHARED_SCHEMAS.items()})


_register()


def check_schemas(cfg: DictConfig) -> None:
    """Build the shared groups present in `cfg` once, so value ranges fail at start-up in one line."""
    for key, schema in SHARED_SCHEMAS.items():
        if key in cfg:
            validate(cfg[key], schema, f"{key}.")


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
        raise UserError(_one_line(err, prefix)) from None
    return obj  # type: ignore[return-value]


def validate_groups(cfg: DictConfig, schema: type[T], **given: Any) -> T:
    """A run's config as the dataclass `schema`: every field whose type is a dataclass is `validate`d
    from the group of the same name (errors name `group.key`); the other fields come from `given`."""
    hints = typing.get_type_hints(schema)
    values = dict(given)
    for f in dataclasses.fields(schema):  # type: ignore[arg-type]
        if f.name in values:
            continue
        kind = hints[f.name]
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            raise TypeError(f"validate_groups: pass {schema.__name__}.{f.name} explicitly (not a dataclass group)")
        if f.name not in cfg:
            raise UserError(f"config: group {f.name!r} is missing; add it to the experiment or pass {f.name}=...")
        values[f.name] = validate(cfg[f.name], kind, f"{f.name}.")
    return schema(**values)


def _one_line(err: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    return f"config {prefix}{key}: {msg}" if key else f"config {prefix.rstrip('.')}: {msg}".replace("config : ",
                                                                                                   "config: ")


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
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_root_message(err)) from None
    check_schemas(cfg)
    return cfg


def _root_message(err: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; show that one line."""
    inner = err
    while inner.__cause__ is not None and not isinstance(inner, OmegaConfBaseException):
        inner = inner.__cause__
    if isinstance(inner, OmegaConfBaseException) and getattr(inner, "full_key", None):
        return f"config {inner.full_key}: {str(inner).splitlines()[0]}"
    return f"config: {str(err).splitlines()[0]}"


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


def hydra_main(config_dir: str | os.PathLike, config_name: str = "train",
               check: Callable[[DictConfig], Any] | None = None) -> Callable[[Task], Callable[[], Any]]:
    """`@hydra.main` for an entry point in `config_dir`, with `UserError` shown as one line (exit 2).

    `check` (the paper's validation of its own groups, e.g. `parse`) runs on the composed config before Hydra
    makes the run directory, so a wrong value in a paper's group also fails with nothing written."""
    import hydra

    def decorate(task: Task) -> Callable[[], Any]:
        def checked(cfg: DictConfig) -> Any:
            check_schemas(cfg)
            return task(cfg)

        guarded = cli_guard(checked)

        @functools.wraps(task)
        def entry() -> Any:
            import sys

            argv = sys.argv[1:]
            if not any(a in ("-m", "--multirun") or a.startswith("--cfg") for a in argv):
                # Hydra reports its own composition errors over several lines: compose once here first,
                # so a wrong key or value is the usual one line (exit 2).
                cfg = cli_guard(compose)(config_dir, [a for a in argv if not a.startswith("-")], config_name)
                if check is not None:
                    cli_guard(check)(cfg)
            return hydra.main(version_base=None, config_path=str(Path(config_dir).resolve()),
                              config_name=config_name)(guarded)()

        return entry

    return decorate
