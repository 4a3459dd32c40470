"""Segment one image with a trained student and write its label map as a colour PNG (spec d's inference).

    python -m afdcd.infer checkpoint=RUN/best.pt image=frankfurt_000000_000294_leftImg8bit.png out=pred.png
    python -m afdcd.infer checkpoint=kd_deeplab_mobile_mobilenetv2_citys_best_model.pth image=street.jpg \
        scales=0.75,1.0,1.25 flip=true

The prediction is made as `afdcd.eval` makes it: the whole image at its own resolution (no sliding window),
BGR mean subtraction only (f.1), stride-8 logits bilinearly upsampled (align_corners=True) to the image size,
optionally averaged over `scales` and a horizontal flip, then arg-maxed. `checkpoint` is one of our runs
(`best.pt`, `last.pt`), a `python -m afdcd.convert` output or an official Af-DCD/CIRKD `.pth`; its keys say
the architecture, width and class count. The PNG is palette-indexed: its pixel values are the predicted train
ids and its palette is the dataset's (`dataset=auto`: the one the run trained on, else the one of the class
count: Cityscapes 19, VOC 21, CamVid 11, ADE20K 150, COCO-Stuff 182/171; any other count gets VOC-style
colours). Palettes: Cityscapes' train-id colours, the VOC colour map, SegNet's CamVid colours, the ADE20K
benchmark's 150 colours (as the official visualiser), COCO-Stuff as the official visualiser (jet_r of id/182).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from common.checkpoint import read_checkpoint
from common.cli import parse_overrides, split_list
from common.errors import UserError, cli_guard
from common.tasks import SegmentationTask

from .convert import load_model
from .data import normalise

DEFAULTS: dict[str, Any] = {"checkpoint": None, "image": None, "out": None, "dataset": "auto", "scales": "1.0",
                            "flip": False, "device": "auto"}
DATASET_CLASSES = {"cityscapes": (19,), "voc": (21,), "camvid": (11,), "ade20k": (150,),
                   "coco_stuff_164k": (182, 171)}

CITYSCAPES = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
              (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
              (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist (SegNet's order)
CAMVID = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
          (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
# the ADE20K scene-parsing benchmark's 150 class colours, RGB hex
ADE20K_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff06528fff8cccff04"
    "ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0ffb8060aff47ff290a07ffff"
    "e0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff8c8c8cfa0a0f14ff001fff00ff1f00ffe000"
    "99ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff00"
    "0052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ffff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc2"
    "00ff52000aff0070ff3300ff00c2ff007aff00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ff"
    "ff001f00b8ff00d6ffff00705cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ff"
    "ff007afff5000abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)


def voc_colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the PASCAL VOC colour map (the bits of the class id spread over R, G, B, high bits first)."""
    ids = np.arange(n)
    cmap = np.zeros((n, 3), np.uint8)
    for shift in range(8):
        for channel in range(3):
            cmap[:, channel] |= (((ids >> (3 * shift + channel)) & 1) << (7 - shift)).astype(np.uint8)
    return cmap


def palette(dataset: str | None, num_classes: int) -> np.ndarray:
    """(256, 3) uint8 RGB palette whose row i colours train id i (rows past the classes are black)."""
    out = np.zeros((256, 3), np.uint8)
    if dataset == "cityscapes":
        out[:19] = CITYSCAPES
    elif dataset == "camvid":
        out[:11] = CAMVID
    elif dataset == "ade20k":
        hexes = "".join(ADE20K_HEX)
        out[:150] = np.frombuffer(bytes.fromhex(hexes), np.uint8).reshape(150, 3)
    elif dataset == "coco_stuff_164k":
        from matplotlib import colormaps

        out[:num_classes] = np.round(colormaps["jet_r"](np.arange(num_classes) / 182)[:, :3] * 255).astype(np.uint8)
    else:  # voc, and any other class count
        out[:] = voc_colormap(256)
    return out


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 (H, W, 3), as the dataset readers give it (OpenCV)."""
    if not path.is_file():
        raise UserError(f"afdcd.infer: image={path}: no such file (give a .png/.jpg image)")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"afdcd.infer: image={path}: OpenCV cannot read it as an image (.png, .jpg, ...)")
    return image


def resolve_dataset(name: str, obj: Any, num_classes: int) -> str | None:
    """`dataset=auto`: the run's dataset (our checkpoints record it), else the one with this class count."""
    if name != "auto":
        if name not in DATASET_CLASSES:
            raise UserError(f"afdcd.infer: dataset={name}: choose auto or one of {', '.join(DATASET_CLASSES)}")
        return name
    arch = obj.get("arch") if isinstance(obj, dict) else None
    if isinstance(arch, dict) and arch.get("dataset") in DATASET_CLASSES:
        return str(arch["dataset"])
    return next((d for d, counts in DATASET_CLASSES.items() if num_classes in counts), None)


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, scales: tuple[float, ...] = (1.0,), flip: bool = False,
            device: torch.device | str = "cpu") -> np.ndarray:
    """(H, W) int64 train ids of a BGR uint8 image: whole-image inference exactly as afdcd.eval scores it."""
    x = torch.from_numpy(np.ascontiguousarray(normalise(image).transpose(2, 0, 1)))[None].to(device)
    task = SegmentationTask(model.num_classes, scales=scales, flip=flip)
    return task.predict(model.eval(), x, tuple(image.shape[:2])).argmax(1)[0].cpu().numpy()


@cli_guard
def main(argv: list[str] | None = None) -> Path:
    opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, DEFAULTS, "afdcd.infer", __doc__ or "")
    for key in ("checkpoint", "image"):
        if not opts[key]:
            raise UserError(f"afdcd.infer: {key}= is not set; usage: python -m afdcd.infer checkpoint=<.pt/.pth> "
                            "image=<png/jpg> [out=<png>]")
    image_path = Path(str(opts["image"])).expanduser()
    image = read_image(image_path)
    ckpt = Path(str(opts["checkpoint"])).expanduser()
    if not ckpt.is_file():
        raise UserError(f"afdcd.infer: checkpoint={ckpt}: no such file (a run's best.pt, a convert output or an "
                        "official .pth)")
    try:
        scales = tuple(float(s) for s in split_list(str(opts["scales"])))
    except ValueError:
        raise UserError(f"afdcd.infer: scales={opts['scales']}: a comma list of positive numbers") from None
    if not scales or min(scales) <= 0:
        raise UserError(f"afdcd.infer: scales={opts['scales']}: a comma list of positive numbers")
    device = torch.device("cuda" if opts["device"] == "auto" and torch.cuda.is_available() else
                          "cpu" if opts["device"] == "auto" else str(opts["device"]))
    obj, _ = read_checkpoint(ckpt)
    model = load_model(obj, aux=False).to(device)
    dataset = resolve_dataset(str(opts["dataset"]), obj, model.num_classes)
    if dataset is not None and model.num_classes > max(DATASET_CLASSES[dataset]):
        raise UserError(f"afdcd.infer: dataset={dataset} has {max(DATASET_CLASSES[dataset])} classes, the "
                        f"checkpoint predicts {model.num_classes}")
    out = Path(str(opts["out"])).expanduser() if opts["out"] else Path(f"{image_path.stem}_afdcd.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"afdcd.infer: out={out}: the label map is written as a .png")
    labels = predict(model, image, scales, bool(opts["flip"]), device)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(palette(dataset, model.num_classes).reshape(-1).tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    counts = np.bincount(labels.reshape(-1), minlength=model.num_classes)
    print(f"{out}: {labels.shape[1]}x{labels.shape[0]} label map of {model.num_classes} classes "
          f"({dataset or 'generic'} palette), {int((counts > 0).sum())} classes present")
    return out


if __name__ == "__main__":
    main()
