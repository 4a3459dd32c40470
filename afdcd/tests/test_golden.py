"""Golden tests: every `*.pt` of the fixture directory, dispatched on its recorded `config`, through convert.py.

Two kinds (shared/fixtures/afdcd/README.md): the official `OmniContrastiveFeatureLoss` (any channels, tau, M,
pool or CamVid crop, patch, mask, generator) and an official segmentation model forward with task/KD losses and
the metric (any spec-c model, aux or not, class count, input size). A recorded value this harness cannot honour
fails by name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from afdcd import convert
from afdcd.afdcd import AfDCDLoss, contrastive_samples, dense_contrastive_loss
from afdcd.distiller import pixel_kd_loss, seg_cross_entropy
from afdcd.metrics import SegMetric, official_pixel_accuracy
from common.testing import golden_files

SCALAR = {"rtol": 1e-4, "atol": 1e-5}
LOSS_META = {"batch", "height", "width", "init_seed", "input_seed", "mask_seed", "student_features_relu",
             "official_class", "torch_version"}
MODEL_META = {"official_factory", "model", "backbone", "aux", "num_class", "norm_layer", "mode", "weight_seed",
              "input_shape", "torch_version", "pretrained_base", "pretrained"}


def assert_tensor(name: str, ours: torch.Tensor, ref: torch.Tensor, rounding: float = 0.0) -> None:
    """Feature maps, logits, gradients: atol = 1e-4 max|ref| + 1e-6, rtol = 1e-4 (fixture README).

    `rounding` widens atol for gradients whose float32 value is cancellation-dominated (see `loss_gradients`).
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    atol = 1e-4 * float(ref.abs().max()) + 1e-6 + rounding
    torch.testing.assert_close(ours.detach().float(), ref.float(), rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_scalar(name: str, ours: torch.Tensor | float, ref: torch.Tensor | float) -> None:
    ours_t = torch.as_tensor(ours).detach().to(torch.float64)
    ref_t = torch.as_tensor(ref).detach().to(torch.float64)
    torch.testing.assert_close(ours_t, ref_t, **SCALAR, msg=lambda m: f"{name}: {m}")


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def unknown(cfg: Mapping[str, Any], known: set[str], extra: tuple[str, ...] = ()) -> list[str]:
    return [k for k in cfg if k not in known and k not in extra]


# --------------------------------------------------------------------------------------------- loss fixtures
def loss_gradients(module: AfDCDLoss, feat_s: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor, index: int,
                   names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Gradients of L_fm (index 0) or L_ctr (1) w.r.t. `feat_S` and the named parameters, computed in `dtype`.

    The float64 run measures how far float32 rounding alone moves each gradient: the contrastive gradients of
    a rectified teacher are sums of nearly cancelling L1 sign terms (fixture README), so the official float32
    reference carries rounding error of that order; 10x our own float32 deviation from float64 is added to atol.
    """
    copy = copy_module(module, dtype)
    x = feat_s.to(dtype).requires_grad_(True)
    loss = copy(x, feat_t.to(dtype), keep=mask.to(dtype))[index]
    named = dict(copy.named_parameters(), feat_S=x)
    grads = torch.autograd.grad(loss, [named[k] for k in names])
    return dict(zip(names, grads))


def copy_module(module: AfDCDLoss, dtype: torch.dtype) -> AfDCDLoss:
    return copy.deepcopy(module).to(dtype)


def check_loss_fixture(fx: dict[str, Any]) -> None:
    cfg = fx["config"]
    kwargs = convert.loss_kwargs_from_official(cfg)
    bad = unknown(cfg, LOSS_META, ("student_channels", "teacher_channels", "tau_ocd", "M_ocd", "pool_size",
                                   "patch_size", "rand_mask", "mask_ratio", "enhance_projector", "dataset"))
    assert not bad, f"loss fixture records settings this harness does not know: {bad}"
    module = convert.load_loss_module(fx["state_dict"], AfDCDLoss(**kwargs))
    feat_s, feat_t, mask = fx["inputs"]["feat_S"], fx["inputs"]["feat_T"], fx["mask"]

    # the keep-mask: recomputed from the recorded uniforms, and drawn on the default path
    if kwargs["mask"] == "random":
        assert torch.equal((fx["mask_uniform"] <= 1 - kwargs["mask_ratio"]).float(), mask.float())
        torch.manual_seed(int(cfg["mask_seed"]))
    assert torch.equal(module.keep_mask(feat_t), mask.float()), "keep-mask differs from the official one"

    with torch.no_grad():
        assert_tensor("intermediates.aligned", module.align(feat_s), fx["intermediates"]["aligned"])
        assert_tensor("intermediates.new_fea", module.reconstruct(feat_s, mask), fx["intermediates"]["new_fea"])

    # default path: the mask is drawn inside forward from the global generator, as the official code does
    torch.manual_seed(int(cfg["mask_seed"]))
    with torch.no_grad():
        loss_fm, loss_ctr = module(feat_s, feat_t)
    assert_scalar("outputs.dis_loss", loss_fm, fx["outputs"]["dis_loss"])
    assert_scalar("outputs.ctr_loss", loss_ctr, fx["outputs"]["ctr_loss"])
    for index, key in enumerate(("grads_dis_loss", "grads_ctr_loss")):
        if key not in fx:
            continue
        ref = convert.loss_filter_fn(fx[key])
        grads = loss_gradients(module, feat_s, feat_t, mask, index, list(ref), torch.float32)
        exact = loss_gradients(module, feat_s, feat_t, mask, index, list(ref), torch.float64)
        for k, r in ref.items():
            rounding = 10 * float((grads[k].double() - exact[k]).abs().max())
            assert_tensor(f"{key}.{k}", grads[k], r, rounding)
        assert not grads["feat_S"][(mask == 0).expand_as(grads["feat_S"])].any(), "gradient at a masked position"

    if "direct_contrastive" in fx:  # the contrastive term alone, not divided by the batch
        dc = fx["direct_contrastive"]
        preds = dc["preds"].clone().requires_grad_(True)
        value = dense_contrastive_loss(module.reduce(preds), module.reduce(dc["targets"]), module.groups,
                                       module.patch_size, module.tau, module.contrast)
        assert_scalar("direct_contrastive.value", value, dc["value"])
        (grad,) = torch.autograd.grad(value, preds)
        assert_tensor("direct_contrastive.grad_preds", grad, dc["grad_preds"])

    if "contrastive_similarity" in fx:  # the official sample layout
        cs = fx["contrastive_similarity"]
        with torch.no_grad():
            pooled = module.reduce(module.reconstruct(feat_s, mask))
            assert_tensor("contrastive_similarity.pooled_pred", pooled, cs["pooled_pred"])
            assert_tensor("contrastive_similarity.pooled_target", module.reduce(feat_t), cs["pooled_target"])
            p = contrastive_samples(pooled, module.groups, module.patch_size)
            t = contrastive_samples(module.reduce(feat_t), module.groups, module.patch_size)
            assert_tensor("contrastive_similarity.pred_vectors", p, cs["pred_vectors"])
            assert_tensor("contrastive_similarity.target_vectors", t, cs["target_vectors"])
            assert_tensor("contrastive_similarity.neg_l1_similarity", -torch.cdist(p, t, p=1),
                          cs["neg_l1_similarity"])


# --------------------------------------------------------------------------------------------- model fixtures
def unpack_state_dict(fx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`state_dict` as is, or `state_dict_packed`: 4-bit codes q, value = (q + offset) * 2**exp2 (exact)."""
    if "state_dict" in fx:
        return dict(fx["state_dict"])
    out = {}
    for key, rec in fx["state_dict_packed"].items():
        if "int_value" in rec:
            out[key] = rec["int_value"]
            continue
        packed = rec["packed_uint8"]
        q = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[: rec["numel"]].float()
        value = ((q + rec["offset"]) * 2.0 ** rec["exp2"]).reshape(rec["shape"])
        assert float(value.double().sum()) == pytest.approx(rec["checksum_sum"], rel=1e-6, abs=1e-6), key
        out[key] = value
    return out


def check_metric(name: str, logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 ref: Mapping[str, Any]) -> None:
    metric = SegMetric(num_classes)
    metric.update_logits(logits, labels)
    inter, union = metric.inter_union()
    up = torch.nn.functional.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=True)
    for key, want in ref.items():
        if key in ("total_inter", "total_union"):
            got = inter if key == "total_inter" else union
            assert torch.equal(got.float(), want.float()), f"{name}.{key}: {got.tolist()} vs {want.tolist()}"
        elif key == "mIoU":
            assert metric.scores()["mIoU"] / 100 == pytest.approx(float(want), rel=1e-6, abs=1e-9), f"{name}.mIoU"
        elif key == "pixAcc_true":
            assert metric.scores()["pixAcc"] / 100 == pytest.approx(float(want), rel=1e-6), f"{name}.pixAcc_true"
        elif key == "pixAcc_official":
            assert official_pixel_accuracy(up, labels) == pytest.approx(float(want), rel=1e-6), f"{name}.{key}"
        elif key == "upsampled_logits_argmax":
            assert torch.equal(up.argmax(1), want), f"{name}.{key} differs"
        elif key not in ("logits", "labels", "nclass"):
            pytest.fail(f"{name}.{key}: recorded metric this harness does not know")


def check_model_fixture(fx: dict[str, Any]) -> None:
    cfg = fx["config"]
    bad = unknown(cfg, MODEL_META)
    assert not bad, f"model fixture records settings this harness does not know: {bad}"
    key = (cfg["model"], cfg["backbone"])
    assert key in convert.OFFICIAL_MODELS, f"config.model/backbone {key} is not a spec-c model"
    assert cfg.get("mode", "eval") == "eval", f"config.mode={cfg['mode']!r}: only eval-mode fixtures are reproducible"
    assert cfg.get("norm_layer", "nn.BatchNorm2d") in ("nn.BatchNorm2d", "nn.SyncBatchNorm"), "config.norm_layer"
    name = convert.OFFICIAL_MODELS[key]
    aux = bool(cfg.get("aux", False)) and cfg["model"] != "deeplab_mobile"  # the mobile model ignores aux
    model = convert.load_model(unpack_state_dict(fx), name=name, num_classes=int(cfg["num_class"]), aux=aux).eval()
    image = fx["inputs"]["image"]
    assert list(image.shape) == list(cfg.get("input_shape", image.shape)), "config.input_shape vs inputs.image"
    with torch.no_grad():
        out = model.forward_all(image)
    by_name = {"logits": out.logits, "c4": out.c4, "head_feat": out.head_feat, "aux_logits": out.aux,
               "aux": out.aux, "auxout": out.aux}
    for k, ref in fx["outputs"].items():
        assert k in by_name and by_name[k] is not None, f"outputs.{k}: not an output of {name} (aux={aux})"
        assert_tensor(f"outputs.{k}", by_name[k], ref)

    labels = fx["inputs"]["labels"]
    main = seg_cross_entropy(out.logits, labels)
    total = main + (0.4 * seg_cross_entropy(out.aux, labels) if out.aux is not None else 0.0)
    for k, ref in fx.get("losses", {}).items():
        if k == "task_loss_main":
            assert_scalar(f"losses.{k}", main, ref)
        elif k == "task_loss_aux":
            assert out.aux is not None, "losses.task_loss_aux recorded for a model without aux head"
            assert_scalar(f"losses.{k}", seg_cross_entropy(out.aux, labels), ref)
        elif k == "task_loss_total":
            assert_scalar(f"losses.{k}", total, ref)
        elif k.startswith("kd_loss_T"):
            temperature = float(k[len("kd_loss_T"):])
            assert math.isfinite(temperature)
            assert_scalar(f"losses.{k}", pixel_kd_loss(out.logits, fx["inputs"]["teacher_logits"], temperature), ref)
        else:
            pytest.fail(f"losses.{k}: recorded loss this harness does not know")

    if "metric" in fx:
        check_metric("metric", out.logits, labels, int(cfg["num_class"]), fx["metric"])
    if "metric_synthetic" in fx:
        ms = fx["metric_synthetic"]
        check_metric("metric_synthetic", ms["logits"], ms["labels"], int(ms["nclass"]), ms)


@pytest.mark.parametrize("path", golden_files("afdcd"))
def test_golden(path: Path) -> None:
    fx = load(path)
    cfg = fx.get("config", {})
    if "M_ocd" in cfg or "OmniContrastiveFeatureLoss" in str(cfg.get("official_class", "")):
        check_loss_fixture(fx)
    elif "official_factory" in cfg or "model" in cfg:
        check_model_fixture(fx)
    else:
        pytest.fail(f"{path.name}: config {sorted(cfg)} matches no fixture kind of the README")


@pytest.mark.parametrize("path", golden_files("afdcd"))
def test_golden_state_dict_round_trip(path: Path) -> None:
    """official -> ours -> official is the identity for every state dict a fixture holds (spec h)."""
    fx = load(path)
    cfg = fx.get("config", {})
    if "M_ocd" in cfg:
        sd = fx["state_dict"]
        assert dict(convert.loss_to_official(convert.loss_filter_fn(sd))).keys() == sd.keys()
        return
    sd = unpack_state_dict(fx)
    model = convert.load_model(sd)
    back = convert.to_official(model.state_dict(), model)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
