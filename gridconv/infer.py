"""Lift 2D keypoints from a file to 3D poses, and draw one of them.

    python -m gridconv.infer keypoints.npy --checkpoint best.pt --image-size 1920 1080 --out lifted/
    python -m gridconv.infer detections.json --layout coco --checkpoint gt_d-gridconv_autogrids.pth.tar \\
        --image-size 1280 720

Input: ``.npy`` of shape (N, 17, 2|3) or (17, 2|3) in pixels (a third column, a confidence, is ignored),
or ``.json`` holding such a nested list, a list of ``{"keypoints": [...]}`` records (COCO results style,
x, y, score triplets), or ``{"keypoints": ...}``. Joint order: Human3.6M (``--layout h36m``, the
network's order) or COCO-17 (``--layout coco``, mapped with ``coco_to_h36m``).

Normalisation (the authors' rule for images other than Human3.6M, GitHub issue #2):
``x = (u - L/2) / (L/2)`` on both axes with ``L = max(W, H)``. Output: ``poses3d.npy`` / ``poses3d.json``
(N, 17, 3) root-relative camera-frame metres (x right, y down, z forward), and ``skeleton.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, cli_guard

from .data import normalise_in_the_wild
from .gridconv import H36M_JOINTS, H36M_PARENTS

COCO_JOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
               "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
               "right_knee", "left_ankle", "right_ankle")


def coco_to_h36m_matrix() -> torch.Tensor:
    """(17 H36M, 17 COCO) linear map. Pelvis = mid-hips, thorax = mid-shoulders, spine = mid(pelvis,
    thorax), neck/nose = nose; the head top (not a COCO keypoint) is extrapolated from the thorax through
    the ears' midpoint by a third of that distance: 4/3 mid-ears - 1/3 thorax."""
    m = torch.zeros(17, 17, dtype=torch.float64)
    direct = {1: 12, 2: 14, 3: 16, 4: 11, 5: 13, 6: 15, 9: 0, 11: 5, 12: 7, 13: 9, 14: 6, 15: 8, 16: 10}
    for h36m, coco in direct.items():
        m[h36m, coco] = 1.0
    m[0, [11, 12]] = 0.5
    m[8, [5, 6]] = 0.5
    m[7, [11, 12, 5, 6]] = 0.25
    m[10, [3, 4]] = 2.0 / 3.0
    m[10, [5, 6]] = -1.0 / 6.0
    return m


def coco_to_h36m(keypoints: torch.Tensor) -> torch.Tensor:
    """COCO-17 keypoints (..., 17, 2) -> Human3.6M-17 (..., 17, 2)."""
    return torch.einsum("hc,...cd->...hd", coco_to_h36m_matrix().to(keypoints.dtype), keypoints)


def read_keypoints(path: Path) -> torch.Tensor:
    """(N, 17, 2) pixels from a .npy or .json file (see the module docstring)."""
    if not path.is_file():
        raise UserError(f"keypoint file {path} not found")
    if path.suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise UserError(f"{path}: not a numeric .npy array ({err})") from None
    elif path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(raw, dict):
            raw = raw.get("keypoints", raw)
        if isinstance(raw, list) and raw and isinstance(raw[0], dict):
            raw = [r["keypoints"] for r in raw]
        data = np.asarray(raw, dtype=np.float64)
        if data.ndim == 2 and data.shape[-1] in (34, 51):  # flat COCO-style records
            data = data.reshape(len(data), 17, -1)
    else:
        raise UserError(f"{path}: expected a .npy or .json keypoint file")
    kps = torch.as_tensor(np.asarray(data, dtype=np.float64))
    if kps.ndim == 2:
        kps = kps[None]
    if kps.ndim != 3 or kps.shape[1] != 17 or kps.shape[2] not in (2, 3):
        raise UserError(f"{path}: keypoints must be (N, 17, 2|3) or (17, 2|3), got {tuple(kps.shape)}")
    return kps[..., :2]


def draw_skeleton(pose: np.ndarray, path: Path, keypoints_2d: np.ndarray | None = None) -> Path:
    """PNG of a lifted pose (camera frame, drawn with y up), beside its 2D input when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 4) if keypoints_2d is not None else (4, 4))
    ax3 = fig.add_subplot(1, 2 if keypoints_2d is not None else 1, 2 if keypoints_2d is not None else 1,
                          projection="3d")
    for j, parent in enumerate(H36M_PARENTS):
        if parent >= 0:
            color = "tab:red" if H36M_JOINTS[j].startswith("R") else "tab:blue"
            seg = pose[[parent, j]]
            ax3.plot(seg[:, 0], seg[:, 2], -seg[:, 1], color=color, lw=2)
    radius = 1.0
    ax3.set(xlim=(-radius, radius), ylim=(-radius, radius), zlim=(-radius, radius), xlabel="x",
            ylabel="z (depth)", zlabel="-y", title="lifted 3D (m)")
    ax3.view_init(elev=15, azim=-70)
    if keypoints_2d is not None:
        ax2 = fig.add_subplot(1, 2, 1)
        for j, parent in enumerate(H36M_PARENTS):
            if parent >= 0:
                seg = keypoints_2d[[parent, j]]
                color = "tab:red" if H36M_JOINTS[j].startswith("R") else "tab:blue"
                ax2.plot(seg[:, 0], seg[:, 1], color=color)
        ax2.invert_yaxis()
        ax2.set_aspect("equal")
        ax2.set_title("2D input (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@cli_guard
def main(argv: list[str] | None = None) -> None:
    from .eval import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keypoints", type=Path, help=".npy or .json 2D keypoints in pixels")
    parser.add_argument("--checkpoint", required=True,
                        help="gridconv last.pt / best.pt or an official .pth.tar")
    parser.add_argument("--image-size", type=float, nargs=2, metavar=("W", "H"), default=(1000.0, 1000.0),
                        help="image width and height in pixels (default 1000 1000: Human3.6M frames)")
    parser.add_argument("--layout", choices=("h36m", "coco"), default="h36m", help="joint order of the input")
    parser.add_argument("--padding", nargs=2, default=["c", "r"], help="official checkpoints: padding modes")
    parser.add_argument("--temperature", type=float, default=None, help="attention temperature override")
    parser.add_argument("--frame", type=int, default=0, help="which pose to draw")
    parser.add_argument("--out", type=Path, default=Path("gridconv_lifted"), help="output folder")
    args = parser.parse_args(argv)

    kps = read_keypoints(args.keypoints)
    if args.layout == "coco":
        kps = coco_to_h36m(kps)
    model, _ = load_model(args.checkpoint, tuple(args.padding), args.temperature)
    model.eval()
    with torch.no_grad():
        poses = model(normalise_in_the_wild(kps, *args.image_size).float()).double().numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "poses3d.npy", poses)
    (args.out / "poses3d.json").write_text(json.dumps({"joints": list(H36M_JOINTS), "units": "m",
                                                      "frame": "camera, root-relative",
                                                      "poses": poses.round(5).tolist()}))
    if not 0 <= args.frame < len(poses):
        raise UserError(f"--frame {args.frame}: the file holds {len(poses)} poses")
    png = draw_skeleton(poses[args.frame], args.out / "skeleton.png", kps[args.frame].numpy())
    print(f"lifted {len(poses)} poses -> {args.out / 'poses3d.npy'}, {args.out / 'poses3d.json'}, {png}")


if __name__ == "__main__":
    main()
