"""Official ScaleKD / mmcls checkpoints -> this project's modules (timm `checkpoint_filter_fn` style, spec g).

`checkpoint_filter_fn(state_dict, model)` picks the rules from the target `model` and the keys:

* `ScaleKDDistiller` <- an mmengine distillation checkpoint (`teacher.backbone.*`, `teacher.head.fc.*`,
  `student.backbone.*`, `student.head.fc.*`, `distill_losses.loss_fmd_s{3,4}.projector_{0,1}.*`; the dead
  `linear.*` of `ClassificationDistiller` is dropped), or our own (`student.*`, `teacher.*`, `distill.*`);
* `DualViewFeatureMimicking` <- one official `FreqMaskingDistillLoss{,v2,ConvNext}` (`projector_{0,1}.*`);
* a timm network <- an mmcls classifier (`backbone.*`, `head.fc.*`: model-zoo students after
  `pth_transfer.py`, or mmcls teachers), the student of a distillation checkpoint (official or ours), or
  timm's own keys (passed through).

Key rules: CAP `projector_0/1` -> `cap_spatial/cap_frequency`, `pos_attention.` -> `attn.`, `ffn.layers.0.0` ->
`mlp.fc1`, `ffn.layers.1` -> `mlp.fc2`; mmcls backbones -> timm per family (g), including Swin's PatchMerging,
which moves to the next timm stage with its 4C axis permuted (timm index (w*2+h)*C+c <- mmcls c*4+h*2+w).
Every rule works key by key, so a partial dict (gradients, say) converts the same way.

`load_official(path, model)` reads a file with the restricted unpickler (no code runs) and loads it
strictly, naming missing, unexpected and mis-shaped keys; `deploy_student` writes the plain student.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from common.checkpoint import atomic_save, load_foreign_state_dict, load_state_dict_verbose
from common.errors import UserError

from .distiller import ClassLoss, ScaleKDDistiller, StageConfig
from .scalekd import DualViewFeatureMimicking

DEAD_KEYS = re.compile(r"^(linear\.(weight|bias)|steps)$")  # ClassificationDistiller.linear, EMA step count

_CAP_RULES = [
    (re.compile(r"^projector_0\."), "cap_spatial."),
    (re.compile(r"^projector_1\."), "cap_frequency."),
    (re.compile(r"\.pos_attention\."), ".attn."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
]


def convert_cap_key(key: str) -> str:
    """One official `FreqMaskingDistillLoss*` key -> ours (`DualViewFeatureMimicking`)."""
    for pattern, new in _CAP_RULES:
        key = pattern.sub(new, key)
    return key


# ---------------------------------------------------------------------------------------------------
# mmcls backbones -> timm, per family (spec g)
# ---------------------------------------------------------------------------------------------------


def swin_merge_permutation(channels: int) -> Tensor:
    """Index p with timm_vector = mmcls_vector[p] for a PatchMerging 4C axis of C = `channels`."""
    t = torch.arange(4 * channels)
    pos, c = t // channels, t % channels  # timm: position-major, positions (h,w) = (0,0),(1,0),(0,1),(1,1)
    w, h = pos // 2, pos % 2
    return c * 4 + h * 2 + w  # mmcls: unfold order, channel-major


def _swin(key: str, value: Tensor) -> tuple[str | None, Tensor]:
    if key.endswith("relative_position_index") or re.match(r"^norm[0-2]\.", key):
        return None, value  # a buffer timm rebuilds; norms of untapped stages (out_indices)
    m = re.match(r"^stages\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$", key)
    if m:
        stage, mod, what = int(m.group(1)), m.group(2), m.group(3)
        axis = 1 if (mod == "reduction" and what == "weight") else 0
        value = value.index_select(axis, swin_merge_permutation(value.shape[axis] // 4))
        return f"layers.{stage + 1}.downsample.{mod}.{what}", value
    key = re.sub(r"^patch_embed\.projection\.", "patch_embed.proj.", key)
    key = re.sub(r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks.", key)
    key = key.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
    key = key.replace(".ffn.layers.1.", ".mlp.fc2.")
    key = re.sub(r"^norm3\.", "norm.", key)
    return key, value


def _vit(key: str, value: Tensor, class_token: bool) -> tuple[str | None, Tensor]:
    if key == "cls_token" and not class_token:
        return None, value
    if key == "pos_embed" and not class_token:
        return key, value[:, 1:]  # 197 slots, the patch tokens take 1..196
    key = key.replace("patch_embed.projection.", "patch_embed.proj.")
    key = re.sub(r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1.", key)
    key = re.sub(r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2.", key)
    key = re.sub(r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1.", key)
    key = re.sub(r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2.", key)
    key = re.sub(r"^layers\.(\d+)\.attn\.", r"blocks.\1.attn.", key)
    key = re.sub(r"^ln1\.", "norm.", key)
    return key, value


def _mixer(key: str, value: Tensor) -> tuple[str | None, Tensor]:
    key = key.replace("patch_embed.projection.", "stem.proj.")
    key = re.sub(r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1.", key)
    key = re.sub(r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2.", key)
    key = re.sub(r"^layers\.(\d+)\.token_mix\.layers\.0\.0\.", r"blocks.\1.mlp_tokens.fc1.", key)
    key = re.sub(r"^layers\.(\d+)\.token_mix\.layers\.1\.", r"blocks.\1.mlp_tokens.fc2.", key)
    key = re.sub(r"^layers\.(\d+)\.channel_mix\.layers\.0\.0\.", r"blocks.\1.mlp_channels.fc1.", key)
    key = re.sub(r"^layers\.(\d+)\.channel_mix\.layers\.1\.", r"blocks.\1.mlp_channels.fc2.", key)
    key = re.sub(r"^ln1\.", "norm.", key)
    return key, value


def _convnext(key: str, value: Tensor) -> tuple[str | None, Tensor]:
    key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
    key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
    m = re.match(r"^stages\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        sub = m.group(3)
        for old, new in (("depthwise_conv.", "conv_dw."), ("pointwise_conv1.", "mlp.fc1."),
                         ("pointwise_conv2.", "mlp.fc2.")):
            sub = sub.replace(old, new)
        key = f"stages.{m.group(1)}.blocks.{m.group(2)}.{sub}"
    key = re.sub(r"^norm3\.", "norm_pre.", key)
    return key, value


_MBV1_STAGES = (1, 2, 2, 6, 2)  # timm mobilenetv1_100 blocks per stage
_MBV1_SUB = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
_MBV1_OFFICIAL = (("s1", 1, 4), ("s2", 0, 4), ("s3", 0, 4), ("s4", 0, 2))  # dw blocks s1.1-s1.3, s2.0-s2.3...


def _mobilenet_v1(key: str, value: Tensor) -> tuple[str | None, Tensor]:
    m = re.match(r"^(s[1-4])\.(\d+)\.(\d+)\.(.+)$", key)
    if not m:
        return key, value
    stage, idx, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if stage == "s1" and idx == 0:
        return {"0": "conv_stem", "1": "bn1"}[sub] + "." + rest, value
    flat = 0
    for name, first, last in _MBV1_OFFICIAL:
        if name == stage:
            flat += idx - first
            break
        flat += last - first
    for s, n in enumerate(_MBV1_STAGES):
        if flat < n:
            return f"blocks.{s}.{flat}.{_MBV1_SUB[sub]}.{rest}", value
        flat -= n
    raise UserError(f"official MobileNet-V1 key backbone.{key} is out of range")


def _resnet(key: str, value: Tensor, deep_stem: bool) -> tuple[str | None, Tensor]:
    if deep_stem:
        stem = {"stem.0.conv": "conv1.0", "stem.0.bn": "conv1.1", "stem.1.conv": "conv1.3",
                "stem.1.bn": "conv1.4", "stem.2.conv": "conv1.6", "stem.2.bn": "bn1"}
        m = re.match(r"^(stem\.\d\.(?:conv|bn))\.(.+)$", key)
        if m:
            return f"{stem[m.group(1)]}.{m.group(2)}", value
        # ResNet-D layer1 shortcut (stride 1, no pool): mmcls downsample.{0 conv,1 bn} -> timm {1,2}
        m = re.match(r"^layer1\.0\.downsample\.([01])\.(.+)$", key)
        if m:
            return f"layer1.0.downsample.{int(m.group(1)) + 1}.{m.group(2)}", value
    return key, value


def backbone_family(model: nn.Module) -> str:
    """The converter family of a timm network."""
    name = type(model).__name__
    if name == "ResNet":
        return "resnet_d" if isinstance(getattr(model, "conv1", None), nn.Sequential) else "resnet"
    if name == "EfficientNet":
        return "mobilenet_v1"
    families = {"SwinTransformer": "swin", "VisionTransformer": "vit", "MlpMixer": "mixer", "ConvNeXt": "convnext"}
    if name not in families:
        raise UserError(f"no mmcls -> timm key rules for {name}")
    return families[name]


def _head_key(key: str, family: str) -> str:
    rest = key[len("head.fc."):]
    if family in ("resnet", "resnet_d"):
        return "fc." + rest
    if family == "mobilenet_v1":
        return "classifier." + rest
    if family in ("swin", "convnext"):
        return "head.fc." + rest
    return "head." + rest  # vit, mixer


def convert_classifier(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """An mmcls classifier's `backbone.*` / `head.fc.*` keys -> the timm network `model`'s."""
    family = backbone_family(model)
    class_token = getattr(model, "cls_token", None) is not None
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("head.fc."):
            out[_head_key(key, family)] = value
            continue
        if key.startswith(("neck.", "data_preprocessor.")) or DEAD_KEYS.match(key):
            continue
        if not key.startswith("backbone."):
            raise UserError(f"unexpected key {key!r} in an mmcls classifier checkpoint (expected backbone.* or "
                            "head.fc.*)")
        key = key[len("backbone."):]
        new: str | None
        if family == "swin":
            new, value = _swin(key, value)
        elif family == "vit":
            new, value = _vit(key, value, class_token)
        elif family == "mixer":
            new, value = _mixer(key, value)
        elif family == "convnext":
            new, value = _convnext(key, value)
        elif family == "mobilenet_v1":
            new, value = _mobilenet_v1(key, value)
        else:
            new, value = _resnet(key, value, family == "resnet_d")
        if new is not None:
            out[new] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------------------


def _sub(state_dict: Mapping[str, Tensor], prefix: str) -> OrderedDict[str, Tensor]:
    return OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))


def convert_distiller(state_dict: Mapping[str, Tensor], model: ScaleKDDistiller) -> OrderedDict[str, Tensor]:
    """An official mmengine distillation state dict -> `ScaleKDDistiller` keys (partial dicts allowed)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for part in ("teacher", "student"):
        sub = _sub(state_dict, part + ".")
        for k, v in convert_classifier(sub, getattr(model, part)).items():
            out[f"{part}.{k}"] = v
    for stage in ("s3", "s4"):
        for k, v in _sub(state_dict, f"distill_losses.loss_fmd_{stage}.").items():
            out[f"distill.mimic_{stage}.{convert_cap_key(k)}"] = v
    known = ("teacher.", "student.", "distill_losses.loss_fmd_s3.", "distill_losses.loss_fmd_s4.")
    for k in state_dict:
        if not k.startswith(known) and not DEAD_KEYS.match(k):
            raise UserError(f"unexpected key {k!r} in an official ScaleKD distillation checkpoint")
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Any supported checkpoint's tensors -> `model`'s state dict keys (see the module docstring)."""
    keys = list(state_dict)
    official_distiller = any(k.startswith(("distill_losses.", "student.backbone.", "teacher.backbone."))
                             for k in keys)
    if isinstance(model, ScaleKDDistiller):
        if official_distiller:
            return convert_distiller(state_dict, model)
        return OrderedDict((k, v) for k, v in state_dict.items() if not DEAD_KEYS.match(k))
    if isinstance(model, DualViewFeatureMimicking):
        return OrderedDict((convert_cap_key(k), v) for k, v in state_dict.items())
    if official_distiller:  # the student of an official distillation checkpoint (pth_transfer.py)
        return convert_classifier(_sub(state_dict, "student."), model)
    if any(k.startswith("student.") for k in keys):  # ours: a ScaleKDDistiller checkpoint
        return _sub(state_dict, "student.")
    if any(k.startswith("backbone.") for k in keys):
        return convert_classifier(state_dict, model)
    return OrderedDict(state_dict)  # timm's own keys


def load_official(path: str | Path, model: nn.Module, key: str | None = None, strict: bool = True,
                  ) -> tuple[list[str], list[str]]:
    """Restricted-load `path` (official or ours), convert it for `model` and load it, naming bad keys.

    `key` picks a checkpoint entry: for mmengine files with EMA, "state_dict" holds the EMA weights and
    "ema_state_dict" the raw ones. A teacher of another architecture fails with the first mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass an existing file")
    converted = checkpoint_filter_fn(load_foreign_state_dict(path, key), model)
    return load_state_dict_verbose(model, converted, strict=strict, source=f"checkpoint {path}")


def deploy_student(model: ScaleKDDistiller, path: str | Path) -> Path:
    """Write the plain student (timm keys), as the official `pth_transfer.py` keeps `student.*` only."""
    return atomic_save({"state_dict": model.eval_model().state_dict()}, path)


# ---------------------------------------------------------------------------------------------------
# Official configs -> our modules (golden fixtures, official checkpoints)
# ---------------------------------------------------------------------------------------------------

OFFICIAL_DFM = {"FreqMaskingDistillLossv2": "v2", "FreqMaskingDistillLoss": "v1",
                "FreqMaskingDistillLossConvNext": "layernorm"}
_DFM_KEYS = {"type", "name", "use_this", "alpha", "student_dims", "teacher_dims", "query_hw", "pos_hw", "pos_dims",
             "window_shapes", "self_query", "softmax_scale", "num_heads", "dis_freq", "official_class"}


def _official_class(cfg: Mapping) -> str:
    return str(cfg.get("official_class", cfg.get("type", ""))).split(" ")[0]


def dfm_kwargs(cfg: Mapping) -> tuple[str, dict]:
    """An official `FreqMaskingDistillLoss*` config -> (CAP variant, `DualViewFeatureMimicking` kwargs).

    Omitted arguments take the official defaults (self_query True, softmax_scale 1, 8 heads).
    """
    kind = _official_class(cfg)
    if kind not in OFFICIAL_DFM:
        raise UserError(f"official class {kind!r} is not a ScaleKD CAP loss; expected one of {sorted(OFFICIAL_DFM)}")
    unknown = sorted(set(cfg) - _DFM_KEYS - {"seed", "mode", "batch", "student_hw", "teacher_hw"})
    if unknown:
        raise UserError(f"{kind} config key(s) {unknown} are not arguments of the official class")
    if "alpha" not in cfg:
        raise UserError(f"{kind} config needs 'alpha' (the two view weights)")
    if tuple(cfg.get("window_shapes", (1, 1))) != (1, 1):
        raise UserError(f"window_shapes={cfg['window_shapes']}: only global attention (1, 1) is supported (b.2)")
    variant = OFFICIAL_DFM[kind]
    kwargs = dict(student_dims=int(cfg["student_dims"]), teacher_dims=int(cfg["teacher_dims"]),
                  query_hw=tuple(cfg["query_hw"]), alpha=tuple(float(a) for a in cfg["alpha"]),
                  pos_hw=tuple(cfg["pos_hw"]) if variant == "v1" else None,
                  pos_dims=int(cfg["pos_dims"]) if "pos_dims" in cfg else None,
                  self_query=bool(cfg.get("self_query", True)), softmax_scale=cfg.get("softmax_scale", 1.0),
                  num_heads=int(cfg.get("num_heads", 8)), norm="layernorm" if variant == "layernorm" else "batchnorm")
    return variant, kwargs


def build_dfm(cfg: Mapping) -> DualViewFeatureMimicking:
    """`DualViewFeatureMimicking` equal to the official loss module that `cfg` records."""
    return DualViewFeatureMimicking(**dfm_kwargs(cfg)[1])


def class_loss_from_head(head: Mapping) -> ClassLoss:
    """The student head's loss config (mmcls) -> `ClassLoss`."""
    loss = dict(head.get("loss", {"type": "CrossEntropyLoss"}))
    kind = loss.pop("type")
    weight = float(loss.pop("loss_weight", 1.0))
    if kind == "CrossEntropyLoss":
        sigmoid = bool(loss.pop("use_sigmoid", False))
        loss.pop("use_soft", None)
        if loss:
            raise UserError(f"CrossEntropyLoss argument(s) {sorted(loss)} are not supported")
        return ClassLoss("bce" if sigmoid else "ce", weight=weight)
    if kind == "LabelSmoothLoss":
        if loss.pop("mode", "original") != "original":
            raise UserError("LabelSmoothLoss: only mode='original' (= torch label_smoothing) is supported")
        eps = float(loss.pop("label_smooth_val"))
        loss.pop("num_classes", None)
        if loss:
            raise UserError(f"LabelSmoothLoss argument(s) {sorted(loss)} are not supported")
        return ClassLoss("ce", label_smoothing=eps, weight=weight)
    raise UserError(f"student head loss {kind!r} is not supported (CrossEntropyLoss, LabelSmoothLoss)")


def build_distiller(cfg: Mapping) -> ScaleKDDistiller:
    """A `ScaleKDDistiller` equal to an official `ClassificationDistiller` config (teacher_cfg, student_cfg,
    distill_cfg, is_vit, use_logit, image_size). CAP widths and grids come from the dry run and must
    equal the recorded ones."""
    from .models.mmcls import build_classifier
    from .models.taps import teacher_adapter

    image_size = int(cfg.get("image_size", 224))
    teacher = build_classifier(cfg["teacher_cfg"], image_size)
    student = build_classifier(cfg["student_cfg"], image_size)
    entries = [m for group in cfg.get("distill_cfg") or [] for m in
               (group.get("methods", []) if isinstance(group, Mapping) else group)]
    stages: dict[str, tuple[str, dict]] = {}
    kd = None
    for m in entries:
        if not m.get("use_this", True):
            continue
        name = m.get("name")
        if name in ("loss_fmd_s3", "loss_fmd_s4"):
            stages[name[-2:]] = dfm_kwargs(m)
        elif name == "loss_kd" and _official_class(m) == "KDLoss":
            kd = (float(m.get("temp", 4.0)), float(m.get("alpha", 0.5)))
        else:
            raise UserError(f"distill_cfg entry {name!r} ({m.get('type')}) is not part of ScaleKD")
    variants = {v for v, _ in stages.values()}
    if len(variants) > 1:
        raise UserError(f"the s3 and s4 CAPs use different official classes {sorted(variants)}")
    cfgs = {s: StageConfig(alpha=kw["alpha"], num_heads=kw["num_heads"],
                           softmax_scale=kw["softmax_scale"] if isinstance(kw["softmax_scale"], (list, tuple))
                           else (float(kw["softmax_scale"]),) * 2, self_query=kw["self_query"])
            for s, (_, kw) in stages.items()}
    use_logit = bool(cfg.get("use_logit", False))
    adapter = teacher_adapter(teacher)
    if bool(cfg.get("is_vit", False)) != adapter.is_vit:
        raise UserError(f"is_vit={cfg.get('is_vit')} does not fit the {type(teacher).__name__} teacher")
    model = ScaleKDDistiller(student, teacher, s3=cfgs.get("s3"), s4=cfgs.get("s4"),
                             kd_temperature=kd[0] if kd else 4.0, kd_alpha=kd[1] if (kd and use_logit) else None,
                             class_loss=class_loss_from_head(cfg["student_cfg"]["head"]),
                             cap_variant=variants.pop() if variants else "v2", image_size=image_size,
                             teacher_adapter_=adapter)
    for s, (_, kw) in stages.items():
        cap = getattr(model.distill, f"mimic_{s}").cap_spatial
        built = {"student_dims": cap.student_dims, "teacher_dims": cap.teacher_dims, "query_hw": cap.query_hw,
                 "pos_dims": cap.pos_dims, "pos_hw": cap.pos_hw}
        for k, v in built.items():
            want = kw.get(k)
            if want is not None and tuple(want if isinstance(want, tuple) else (want,)) != (
                    tuple(v) if isinstance(v, tuple) else (v,)):
                raise UserError(f"loss_fmd_{s}.{k} is {want} in the config but the dry run gives {v}")
    return model


# ---------------------------------------------------------------------------------------------------
# CLI: official file -> what scalekd.eval reads
# ---------------------------------------------------------------------------------------------------


def convert_file(source: str | Path, target: str | Path, overrides: list[str]) -> Path:
    """`source` (mmengine distillation checkpoint, mmcls classifier, timm or ours) -> `target`: the row's
    evaluated network (the student; the teacher on teacher rows) in our keys, loaded strictly first."""
    from common.checkpoint import save_converted
    from common.config import compose

    from .eval import load_network
    from .train import CONFIG_DIR, parse

    cfg = compose(CONFIG_DIR, overrides)
    r = parse(cfg)
    net, origin = load_network(r, str(source), cfg.get("checkpoint_key"))
    return save_converted(net.state_dict(), target, "scalekd", source, origin=origin, experiment=str(cfg.name),
                          network=str(r.model.student or r.model.teacher))


def main(argv: list[str] | None = None) -> None:
    """``python -m scalekd.convert OFFICIAL.pth OURS.pt experiment=<row> [checkpoint_key=ema_state_dict]``

    Writes (atomically) what ``scalekd.eval experiment=<row> checkpoint=OURS.pt`` reads."""
    import sys

    from common.errors import cli_guard

    @cli_guard
    def _run(args: list[str]) -> None:
        paths = [a for a in args if "=" not in a]
        if len(paths) != 2 or any(a in ("-h", "--help") for a in args):
            raise UserError("usage: python -m scalekd.convert OFFICIAL.pth OURS.pt experiment=<row> "
                            "[checkpoint_key=state_dict|ema_state_dict] [other config overrides]")
        out = convert_file(paths[0], paths[1], [a for a in args if "=" in a])
        print(f"wrote {out} (our keys; evaluate with python -m scalekd.eval checkpoint={out} and the same overrides)")

    _run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
