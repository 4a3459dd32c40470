"""NYUv2 distillation (spec d.3; our reading behind `method.segmentation_reading`): on a tiny synthetic NYUv2, one
SSD-KD run of DeepLabV3 students from a DeepLabV3 teacher goes through synthesis, the replay buffer, a KD step and
mIoU evaluation; the per-pixel losses reduce to the classifier ones for 1x1 maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import compose
from common.errors import UserError
from ssdkd.datafree import adversarial_kl, image_level_logits, kd_loss, one_hot_ce
from ssdkd.models import create_model
from ssdkd.train import CONFIG_DIR, run

NYU = ["experiment=nyuv2_deeplabv3_resnet50_deeplabv3_mobilenet_ssdkd", "model.teacher=deeplabv3_mobilenet",
       "data.synthetic=true", "data.train_per_class=4", "data.test_per_class=2", "data.image_size=32",
       "data.resize=40", "method.synthesis.img_size=32", "method.synthesis.batch_size=2", "method.synthesis.nz=16",
       "method.synthesis.ngf=8", "method.kd_batch_size=2", "method.kd_steps_per_epoch=1", "method.warmup=1",
       "method.store.capacity=3", "method.store.replace_per_call=1", "trainer.epochs=3", "trainer.log_every=1"]


def test_pixel_losses_reduce_to_the_classifier_losses_on_1x1_maps() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 13), torch.randn(4, 13), torch.randint(0, 13, (4,))
    s4, t4 = s[:, :, None, None], t[:, :, None, None]
    # tau = 20: the KL is a difference of nearly equal terms; float32 summation order differs between layouts
    assert torch.allclose(kd_loss(s4, t4, 20.0), kd_loss(s, t, 20.0), rtol=1e-3)
    assert torch.allclose(kd_loss(s4, t4, 20.0, "none"), kd_loss(s, t, 20.0, "none"), rtol=1e-3)
    assert torch.allclose(adversarial_kl(s4, t4)[0], adversarial_kl(s, t)[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(one_hot_ce(t4, y), one_hot_ce(t, y), rtol=1e-5, atol=1e-6)
    # image-level scores: softmax = mean per-pixel confidence, arg-max = the class with the largest mean
    maps = torch.randn(2, 13, 5, 6)
    assert torch.allclose(image_level_logits(maps).softmax(1), maps.softmax(1).mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_nyuv2_ssdkd_one_run_on_synthetic_nyuv2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = tmp_path / "nyuv2_deeplabv3_mobilenet.pth"
    torch.save({"state_dict": create_model("deeplabv3_mobilenet", 13).state_dict()}, teacher)
    common = [*NYU, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path}", f"model.teacher_checkpoint={teacher}"]
    metrics, out = run(compose(CONFIG_DIR, common))
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 100.0 and "teacher_mIoU" in result["extra"]
    assert metrics["samples_generated"] == 2 * 3 and metrics["buffer_size"] == 3  # 3 calls of 2, capacity 3
    assert metrics["t_inv"] > 0 and metrics["t_kd"] > 0
    with pytest.raises(UserError, match="segmentation_reading"):
        run(compose(CONFIG_DIR, [*common, "method.segmentation_reading=false", f"output_dir={tmp_path / 'b'}"]))
