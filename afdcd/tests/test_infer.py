"""afdcd.infer: a user's image -> palette PNG of the predicted train ids, computed as afdcd.eval scores images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afdcd.convert import to_official
from afdcd.data import normalise
from afdcd.infer import CITYSCAPES, main, palette
from afdcd.models import create_model


def _checkpoint(tmp_path: Path, official: bool) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = create_model("deeplabv3_resnet18", 5, width=0.125).eval()
    with torch.no_grad():  # spread the prediction over several classes
        net.head.block[4].bias.copy_(torch.tensor([0.0, 0.02, -0.02, 0.01, -0.01]))
    path = tmp_path / ("official.pth" if official else "best.pt")
    obj = dict(to_official(net.state_dict(), net)) if official else {
        "model": net.state_dict(), "arch": {"name": "deeplabv3_resnet18", "num_classes": 5, "width": 0.125,
                                            "dataset": "cityscapes"}}
    torch.save(obj, path)
    return path, net


@pytest.mark.parametrize("official", [False, True])
def test_infer_writes_the_eval_prediction_as_a_palette_png(tmp_path: Path, official: bool) -> None:
    ckpt, net = _checkpoint(tmp_path, official)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)  # not a multiple of 8: upsampled to 45x70
    cv2.imwrite(str(tmp_path / "street.png"), image)
    out = main([f"checkpoint={ckpt}", f"image={tmp_path / 'street.png'}", f"out={tmp_path / 'pred' / 'x.png'}"])
    png = Image.open(out)
    assert png.mode == "P" and png.size == (70, 45)
    x = torch.from_numpy(normalise(image).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        want = F.interpolate(net(x), (45, 70), mode="bilinear", align_corners=True).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(png), want)
    colours = np.asarray(png.getpalette()[: 3 * 5], np.uint8).reshape(5, 3)
    # ours records the dataset (Cityscapes train-id colours); an official 5-class file gets VOC-style colours
    expected = np.asarray(CITYSCAPES[:5], np.uint8) if not official else palette(None, 5)[:5]
    assert np.array_equal(colours, expected)


def test_infer_reads_what_convert_writes_roundtrip(tmp_path: Path) -> None:
    """`python -m afdcd.convert` writes what afdcd.infer reads (issue 8 item 3): the converted file predicts the
    same label map as the official release it came from."""
    from afdcd.convert import main as convert_main

    official, _ = _checkpoint(tmp_path, official=True)
    converted = tmp_path / "converted.pt"
    convert_main([str(official), str(converted), "--model", "deeplabv3_resnet18", "--num-classes", "5"])
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "street.png"), image)
    maps = [np.asarray(Image.open(main([f"checkpoint={c}", f"image={tmp_path / 'street.png'}",
                                        f"out={tmp_path / (c.stem + '.png')}"])))
            for c in (official, converted)]
    assert maps[0].shape == (40, 56) and np.array_equal(maps[0], maps[1])


@pytest.mark.parametrize("what", ["missing", "not_an_image"])
def test_infer_bad_image_is_one_line(tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = _checkpoint(tmp_path, official=False)
    image = tmp_path / "street.png"
    if what == "not_an_image":
        image.write_text("not a png")
    with pytest.raises(SystemExit) as err:
        main([f"checkpoint={ckpt}", f"image={image}", f"out={tmp_path / 'x.png'}"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(image) in lines[0] and "image=" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_dataset_palettes() -> None:
    assert tuple(palette("cityscapes", 19)[10]) == (70, 130, 180)  # sky
    assert tuple(palette("voc", 21)[1]) == (128, 0, 0) and tuple(palette("voc", 21)[15]) == (192, 128, 128)
    assert tuple(palette("camvid", 11)[3]) == (128, 64, 128)  # road
    assert tuple(palette("ade20k", 150)[0]) == (120, 120, 120) and tuple(palette("ade20k", 150)[149]) == (92, 0, 255)
    coco = palette("coco_stuff_164k", 182)
    assert len({tuple(c) for c in coco[:182]}) > 100 and not coco[182:].any()
