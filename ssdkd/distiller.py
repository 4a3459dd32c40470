"""The data-free distiller (mdistiller shape) and the factory that turns a composed config into a method object.

* `DataFreeDistiller`: a frozen teacher kept in eval mode, the student, the generator as an extra trainable
  part; `forward_train(images, weights)` is one KD step's loss on replayed [0,1] images (tau^2-scaled KL,
  optional IS weights; spec b.6/b.7(iv)); `eval_model()` is the deployable student (spec b.8).
* `build_method(cfg, teacher, student)` builds SSD-KD, Fast-k, DeepInv-k or real-data KD from the `method`,
  `data`, `optim`, `schedule` groups, reading every key; an unknown key or bad value is a one-line `UserError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import UserError

from .datafree import (
    NORMALIZE_DICT,
    DataFreeKD,
    DeepInversionSynthesizer,
    FastMetaSynthesizer,
    Generator,
    ImagePool,
    InversionAugment,
    Normalizer,
    StageTimer,
    kd_loss,
)
from .ssdkd import DIV_FORMS, SSDKD, ReplayBuffer, SSDKDConfig


class DataFreeDistiller(nn.Module):
    """Teacher (frozen, eval), student, generator: the modules of a data-free KD run (mdistiller shape)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, generator: nn.Module | None, augment: nn.Module,
                 temperature: float = 20.0):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.generator = generator
        self.augment = augment
        self.temperature = temperature
        self.last_discrepancy: Tensor | None = None  # per-sample KL of the last step, for the priorities

    def train(self, mode: bool = True) -> DataFreeDistiller:
        super().train(mode)
        self.teacher.eval()
        if self.generator is not None:
            self.generator.train()  # always train mode (spec b.2)
        return self

    def forward_train(self, images: Tensor, weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """KD loss on replayed [0,1] images: tau^2 (1/b) sum_i w_i KL_i."""
        x = self.augment(images)
        with torch.no_grad():
            t_out = self.teacher(x)
        s_out = self.student(x)
        per = kd_loss(s_out, t_out, self.temperature, reduction="none")
        self.last_discrepancy = per.detach() / self.temperature ** 2
        loss = per.mean() if weights is None else (weights * per).mean()
        return s_out, {"loss_kd": loss}

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def eval_model(self) -> nn.Module:
        """Only the student is kept (spec b.8)."""
        return self.student


# ------------------------------------------------------------------------------------------ factory
SYNTH_KEYS = {
    "fast_meta": {"kind", "batch_size", "nz", "ngf", "img_size", "nc", "g_steps", "lr_g", "lr_z", "adv", "bn", "oh",
                  "bn_mmt", "is_maml", "reset_l0", "augment"},
    "deepinv": {"kind", "batch_size", "img_size", "nc", "iterations", "lr", "adv", "bn", "oh", "tv", "l2", "true_best"},
}
METHOD_KEYS = {
    "ssdkd": {"name", "warmup", "kd_steps_per_epoch", "kd_batch_size", "temperature", "synthesis", "store", "phi",
              "priority", "segmentation_reading"},
    "fast": {"name", "warmup", "kd_steps_per_epoch", "kd_batch_size", "temperature", "synth_per_epoch", "synthesis",
             "store", "segmentation_reading"},
    "deepinv": {"name", "warmup", "kd_steps_per_epoch", "kd_batch_size", "temperature", "synth_per_epoch",
                "synthesis", "store"},
    "kd_real": {"name", "warmup", "kd_steps_per_epoch", "kd_batch_size", "temperature", "subset", "subset_seed",
                "store"},
}
STORE_KEYS = {"buffer": {"kind", "scale", "capacity", "replace_per_call", "quantize_uint8", "max_generated"},
              "pool": {"kind", "quantize_uint8"}}
PHI_KEYS = {"in_inversion", "for_buffer", "in_priority", "use_div", "use_dif", "gamma", "div_form"}
PRIORITY_KEYS = {"use", "alpha", "epsilon", "beta0", "beta_end"}


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return cfg


def check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Unknown keys are a one-line error naming them."""
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise UserError(f"unknown config key {where}.{unknown[0]}; valid keys: {', '.join(sorted(allowed))}")


def _positive(value: Any, key: str, allow_zero: bool = False) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return value


def buffer_capacity(store: Mapping[str, Any], train_size: int) -> int:
    """N_buf = capacity, or round(scale * |D_train|) (spec b.7(i))."""
    if store.get("capacity") is not None:
        return int(_positive(store["capacity"], "method.store.capacity"))
    scale = store.get("scale")
    if scale is None or not 0 < float(scale) <= 1:
        raise UserError(f"method.store.scale must be in (0, 1] (or set method.store.capacity), got {scale!r}")
    return max(1, round(float(scale) * int(train_size)))


def validate_method(method: Mapping[str, Any]) -> None:
    """Check every key and value of the `method` group (no side effects)."""
    name = method.get("name")
    if name not in METHOD_KEYS:
        raise UserError(f"method.name must be one of {', '.join(METHOD_KEYS)}, got {name!r}")
    check_keys(method, METHOD_KEYS[name], "method")
    if "synthesis" in method:
        kind = method["synthesis"].get("kind")
        if kind not in SYNTH_KEYS:
            raise UserError(f"method.synthesis.kind must be one of {', '.join(SYNTH_KEYS)}, got {kind!r}")
        check_keys(method["synthesis"], SYNTH_KEYS[kind], "method.synthesis")
        for key in ("batch_size", "lr_g", "lr_z", "g_steps", "iterations", "lr"):
            if key in method["synthesis"]:
                _positive(method["synthesis"][key], f"method.synthesis.{key}")
    store = method["store"]
    if store.get("kind") not in STORE_KEYS:
        raise UserError(f"method.store.kind must be one of {', '.join(STORE_KEYS)}, got {store.get('kind')!r}")
    check_keys(store, STORE_KEYS[store["kind"]], "method.store")
    if name == "ssdkd":
        check_keys(method["phi"], PHI_KEYS, "method.phi")
        check_keys(method["priority"], PRIORITY_KEYS, "method.priority")
        if method["phi"]["div_form"] not in DIV_FORMS:
            raise UserError(f"method.phi.div_form must be one of {', '.join(DIV_FORMS)}, got "
                            f"{method['phi']['div_form']!r}")
        if store["kind"] != "buffer":
            raise UserError("method.store.kind must be 'buffer' for SSD-KD")
    if method.get("temperature") is not None:
        _positive(method["temperature"], "method.temperature")
    _positive(method["warmup"], "method.warmup", allow_zero=True)
    _positive(method["kd_batch_size"], "method.kd_batch_size")


def inversion_augment(data: Mapping[str, Any], normalizer: Normalizer, enabled: bool = True) -> InversionAugment:
    """The view teacher and student get of a [0,1] image (spec b.3): the dataset's training crop/flip (`data.
    crop_padding`, `data.hflip`; CIFAR 4 / flip, grey digits 2 / no flip, as the teacher was trained), normalised,
    a grey image repeated to the teacher's `data.in_chans`."""
    return InversionAugment(normalizer, enabled=enabled, padding=int(data.get("crop_padding", 4)),
                            flip=bool(data.get("hflip", True)), channels=int(data.get("in_chans", 3)))


def build_method(cfg: Any, teacher: nn.Module, student: nn.Module,
                 device: torch.device | str = "cpu") -> DataFreeKD:
    """SSD-KD / Fast-k / DeepInv-k from a composed config (`method`, `data`, `optim`, `schedule`, `trainer`).

    Real-data KD (`method.name = kd_real`) needs the real images: build it with `build_real_kd`."""
    cfg = _plain(cfg)
    method, data = cfg["method"], cfg["data"]
    validate_method(method)
    if method["name"] == "kd_real":
        raise UserError("method kd_real reads real images: use ssdkd.distiller.build_real_kd(cfg, ..., images)")
    if data["name"] == "nyuv2" and not method.get("segmentation_reading", False):
        raise UserError("NYUv2 distillation runs our reading of spec d.3 (per-pixel KL at tau, image-level phi and "
                        "L_oh; SSD-KD's is not public): set method.segmentation_reading=true to run it")
    if method.get("segmentation_reading", False) and method["synthesis"]["kind"] != "fast_meta":
        raise UserError("method.segmentation_reading is for Fast meta-synthesis (SSD-KD, Fast-k) only")
    device = torch.device(device)
    num_classes = int(data["num_classes"])
    normalizer = Normalizer(**NORMALIZE_DICT[data["normalize"]]).to(device)
    syn_cfg = method["synthesis"]
    augment = inversion_augment(data, normalizer, enabled=bool(syn_cfg.get("augment", True)))
    optimizer, scheduler = build_optim(cfg, student)
    img = int(syn_cfg.get("img_size") or data["image_size"])
    if syn_cfg["kind"] == "fast_meta":
        generator = Generator(int(syn_cfg["nz"]), int(syn_cfg["ngf"]), img, int(syn_cfg["nc"])).to(device)
        synth: Any = FastMetaSynthesizer(
            teacher, student, generator, num_classes=num_classes, batch_size=int(syn_cfg["batch_size"]),
            g_steps=int(syn_cfg["g_steps"]), lr_g=float(syn_cfg["lr_g"]), lr_z=float(syn_cfg["lr_z"]),
            adv=float(syn_cfg["adv"]), bn=float(syn_cfg["bn"]), oh=float(syn_cfg["oh"]),
            bn_mmt=float(syn_cfg["bn_mmt"]), is_maml=bool(syn_cfg["is_maml"]), warmup=int(method["warmup"]),
            reset_l0=bool(syn_cfg["reset_l0"]), augment=augment)
    else:
        synth = DeepInversionSynthesizer(
            teacher, student, normalizer, num_classes=num_classes, img_size=(int(syn_cfg["nc"]), img, img),
            batch_size=int(syn_cfg["batch_size"]), iterations=int(syn_cfg["iterations"]), lr=float(syn_cfg["lr"]),
            adv=float(syn_cfg["adv"]), bn=float(syn_cfg["bn"]), oh=float(syn_cfg["oh"]), tv=float(syn_cfg["tv"]),
            l2=float(syn_cfg["l2"]), true_best=bool(syn_cfg["true_best"]), flip=augment.flip,
            channels=augment.channels)
    timer = StageTimer(device)
    store = method["store"]
    if method["name"] == "ssdkd":
        phi, pri = method["phi"], method["priority"]
        scfg = SSDKDConfig(
            epochs=int(cfg["trainer"]["epochs"]), warmup=int(method["warmup"]),
            kd_steps_per_epoch=int(method["kd_steps_per_epoch"]), batch_size=int(method["kd_batch_size"]),
            temperature=float(method["temperature"]),
            max_generated=None if store["max_generated"] is None else int(store["max_generated"]),
            phi_in_inversion=bool(phi["in_inversion"]), phi_for_buffer=bool(phi["for_buffer"]),
            phi_in_priority=bool(phi["in_priority"]), use_div=bool(phi["use_div"]), use_dif=bool(phi["use_dif"]),
            gamma=float(phi["gamma"]), div_form=phi["div_form"], use_priority=bool(pri["use"]),
            alpha=float(pri["alpha"]), epsilon=float(pri["epsilon"]), beta0=float(pri["beta0"]),
            beta_end=float(pri["beta_end"]))
        capacity = buffer_capacity(store, int(data["train_size"]))
        buffer = ReplayBuffer(capacity, num_classes, (int(syn_cfg["nc"]), img, img),
                              replace_per_call=int(store["replace_per_call"]), quantize=bool(store["quantize_uint8"]),
                              alpha=scfg.alpha, epsilon=scfg.epsilon, use_priority=scfg.use_priority, device=device)
        return SSDKD(teacher, student, synth, buffer, optimizer, scheduler, augment, scfg, timer)
    return DataFreeKD(teacher, student, synth, ImagePool(quantize=bool(store["quantize_uint8"])), optimizer, scheduler,
                      augment, warmup=int(method["warmup"]), kd_steps=int(method["kd_steps_per_epoch"]),
                      batch_size=int(method["kd_batch_size"]), temperature=float(method["temperature"]),
                      synth_per_epoch=int(method["synth_per_epoch"]), timer=timer)


def build_real_kd(cfg: Any, teacher: nn.Module, student: nn.Module, train_images: Tensor, train_labels: Tensor,
                  device: torch.device | str = "cpu") -> DataFreeKD:
    """KD on real images (full set or a seeded class-balanced subset, spec d.5 item 6 / Fig. 1) on the same harness:
    `train_images` uint8 (N, C, H, W)."""
    from .datafree import class_balanced_subset

    cfg = _plain(cfg)
    method, data = cfg["method"], cfg["data"]
    validate_method(method)
    if method["name"] != "kd_real":
        raise UserError(f"build_real_kd needs method.name = kd_real, got {method['name']!r}")
    subset = float(method["subset"])
    if not 0 < subset <= 1:
        raise UserError(f"method.subset must be in (0, 1], got {subset}")
    idx = (torch.arange(len(train_labels)) if subset == 1.0 else
           class_balanced_subset(train_labels, round(subset * len(train_labels)), int(method["subset_seed"])))
    pool = ImagePool(quantize=bool(method["store"]["quantize_uint8"]))
    pool.add(train_images[idx].float().div(255.0).to(device))
    b = int(method["kd_batch_size"])
    steps = method["kd_steps_per_epoch"]
    steps = -(-len(idx) // b) if steps is None else int(steps)
    normalizer = Normalizer(**NORMALIZE_DICT[data["normalize"]]).to(device)
    optimizer, scheduler = build_optim(cfg, student)
    return DataFreeKD(teacher, student, None, pool, optimizer, scheduler, inversion_augment(data, normalizer),
                      warmup=int(method["warmup"]), kd_steps=steps, batch_size=b,
                      temperature=float(method["temperature"]), timer=StageTimer(device))


def build_optim(cfg: Mapping[str, Any], student: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """SGD + the per-epoch schedule of the recipes (spec d.2 / b.9 item 7) for `DataFreeKD.run_epoch` (golden
    tests, bench): cosine over the epochs after warm-up (T_max = trainer.epochs - method.warmup, eta_min =
    schedule.min_lr) or multi-step (schedule.milestones, decay_rate). Same keys as common's optim/schedule schemas;
    `ssdkd.train` runs the same recipe on common's Trainer (its timm optimizer and scheduler)."""
    from common.dist import scale_lr

    o, s = cfg["optim"], cfg["schedule"]
    if o["name"] != "sgd":
        raise UserError(f"optim.name must be 'sgd' (the only optimiser of the recipes), got {o['name']!r}")
    # optim.lr is the lr at optim.base_batch (None: as given), scaled to the KD batch as the Trainer does
    lr = scale_lr(float(_positive(o["lr"], "optim.lr")), int(cfg["method"]["kd_batch_size"]), o.get("base_batch"),
                  str(o.get("lr_scaling", "linear")))
    opt = torch.optim.SGD(student.parameters(), lr=lr,
                          momentum=float(o.get("momentum", 0.9)), weight_decay=float(o.get("weight_decay", 0.0)),
                          nesterov=bool(o.get("nesterov", False)))
    if s["name"] == "cosine":
        t_max = int(cfg["trainer"]["epochs"]) - int(cfg["method"]["warmup"])
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(t_max, 1), eta_min=float(s.get("min_lr", 0)))
    if s["name"] == "multistep":
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(s["milestones"]),
                                                         gamma=float(s.get("decay_rate", 0.1)))
    raise UserError(f"schedule.name must be 'cosine' or 'multistep', got {s['name']!r}")


# ------------------------------------------------------------------------------ on common's Trainer
def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class HarnessDistiller(DataFreeDistiller):
    """A `DataFreeKD` / `SSDKD` run driven by common's Trainer (spec b.7(vi) epoch, split at its seams).

    `synthesize_epoch(e)` is the epoch's inversion (the warm-up rounds, synthesis only, run before KD epoch 0:
    the student does not move during them, so this is the same maths as separate epochs); `kd_step(b)` is one
    student step's loss on b replayed images (SSD-KD: priority draw with IS weights, priorities refreshed from
    the step's per-sample KL; Fast/DeepInv/real KD: uniform pool passes). The Trainer does backward, the SGD step
    and the per-epoch cosine. The generator, meta-Adam, BN history, store and counters are not submodules (the
    generator trains in synthesis, never through the student's optimiser or DDP): they travel as extra state, so
    `last.pt` resumes them exactly."""

    def __init__(self, engine: DataFreeKD):
        super().__init__(engine.student, engine.teacher, None, engine.augment, engine.temperature)
        self.__dict__["engine"] = engine  # plain attribute: not registered as a module
        self.synthesized_epoch = -1
        self.epoch_log: list[dict[str, float]] = []

    @property
    def store(self) -> Any:
        return self.engine.pool

    def synthesize_epoch(self, epoch: int) -> None:
        """The inversion of KD epoch `epoch` (once: a resumed, partly done epoch does not synthesise again)."""
        e = self.engine
        if epoch <= self.synthesized_epoch or e.synthesizer is None:
            self.synthesized_epoch = max(self.synthesized_epoch, epoch)
            return
        rounds = e.synth_per_epoch * ((e.warmup + 1) if self.synthesized_epoch < 0 else 1)
        with e.timer.stage("inv"):
            for _ in range(rounds):
                e.synthesis_round()
        # synthesis backpropagates its adversarial / JS + student-BN term through the student: those gradients
        # are not the KD step's (Fast's release and `kd_train_step` zero them before the KD backward; the Trainer
        # zeroes only after its steps, so without this the epoch's first KD step added them)
        self.student.zero_grad(set_to_none=True)
        self.synthesized_epoch = epoch

    def kd_step(self, batch_size: int) -> dict[str, Tensor]:
        """One student step's losses on `batch_size` replayed images (spec b.6, b.7(iv))."""
        e = self.engine
        if isinstance(e, SSDKD):
            from .ssdkd import beta_schedule

            cfg, buf = e.cfg, e.buffer
            beta = beta_schedule(e.kd_step_count, e.total_kd_steps, cfg.beta0, cfg.beta_end)
            idx, w = buf.sample(batch_size, beta)
            _, losses = self.forward_train(buf.get(idx), w if cfg.use_priority else None)
            d = self.last_discrepancy
            if cfg.phi_in_priority and cfg.phi_active:
                d = d * buf.phi(buf.teacher_logits[idx], buf.targets[idx], **cfg.phi_kwargs())
            buf.update_priority(idx, d)
        else:
            _, images, _ = e.pool.sample(batch_size)
            _, losses = self.forward_train(images)
        e.kd_step_count += 1
        return losses

    def accounting(self) -> dict[str, float]:
        """Cumulative time accounting (spec d.6) and sizes: t_inv, t_kd, t_total, Fast's synthesis-only time,
        samples generated, store size."""
        e = self.engine
        return {**e.timer.summary(), "samples_generated": float(e.n_generated), "buffer_size": float(len(e.pool))}

    def get_extra_state(self) -> dict[str, Any]:
        e = self.engine
        synth = e.synthesizer.state_dict() if hasattr(e.synthesizer, "state_dict") else None
        return {"synthesizer": synth, "store": e.pool.state_dict(), "n_generated": e.n_generated,
                "kd_step_count": e.kd_step_count, "timer": e.timer.state_dict(),
                "synthesized_epoch": self.synthesized_epoch, "epoch_log": list(self.epoch_log)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        e = self.engine
        device = next(self.student.parameters()).device
        if state["synthesizer"] is not None:
            e.synthesizer.load_state_dict(_to(state["synthesizer"], device))
        e.pool.load_state_dict(_to(state["store"], e.pool.device if hasattr(e.pool, "device") else device))
        e.n_generated, e.kd_step_count = int(state["n_generated"]), int(state["kd_step_count"])
        e.timer.load_state_dict(state["timer"])
        self.synthesized_epoch = int(state["synthesized_epoch"])
        self.epoch_log = list(state["epoch_log"])
