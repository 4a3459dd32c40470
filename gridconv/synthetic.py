"""Synthetic Human3.6M in the official GridConv on-disk layout (spec section f), for tests and smoke runs.

A kinematic 17-joint skeleton with Human3.6M-like bone lengths, per-action joint-angle distributions
(sitting bends hips and knees, walking swings legs and arms, phoning raises a hand, ...), a random
global yaw, and a pinhole camera (fx ~ fy ~ 1145, cx ~ cy ~ 512) 4-6 m away, four cameras per sequence.
Writes ``<root>/gt/`` (exact projections) and ``<root>/hrnet/`` (the same with Gaussian pixel noise, a
stand-in for detections), each with ``{train,test}_custom_{2d,3d}_unnorm.pth.tar``.

    python -m gridconv.synthetic <root> [--train-frames 34 --test-frames 13]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from common.data.base import write_marker

from .data import ACTIONS, TEST_SUBJECTS, TRAIN_SUBJECTS
from .h36m_cameras import CAMERA_IDS

BONES_MM = {"hip": 135.0, "thigh": 450.0, "shin": 440.0, "spine": 230.0, "thorax": 260.0, "neck": 100.0,
            "head": 115.0, "shoulder": 150.0, "upper_arm": 280.0, "forearm": 250.0}
CAMERA_AZIMUTH_DEG = (70.0, -70.0, 110.0, -110.0)
# Per action, mean joint angles in degrees (std 12 deg around them):
# hip flexion, knee flexion, torso lean, left/right arm flexion, arm abduction, left/right elbow
# flexion, leg swing (walking: opposite legs / arms move in opposite directions).
ACTION_ANGLES = {
    "Directions": (0, 5, 5, 20, 60, 15, 30, 20, 0),
    "Discussion": (0, 5, 5, 30, 30, 15, 60, 60, 0),
    "Eating": (85, 90, 15, 30, 30, 10, 110, 110, 0),
    "Greeting": (0, 5, 5, 10, 140, 15, 10, 40, 0),
    "Phoning": (40, 45, 10, 10, 40, 10, 10, 150, 0),
    "Photo": (0, 10, 10, 70, 70, 10, 110, 110, 0),
    "Posing": (0, 5, -5, 10, 10, 60, 20, 20, 0),
    "Purchases": (10, 15, 25, 40, 40, 10, 30, 30, 0),
    "Sitting": (90, 95, 5, 20, 20, 10, 60, 60, 0),
    "SittingDown": (70, 100, 35, 30, 30, 15, 40, 40, 0),
    "Smoking": (20, 25, 5, 10, 40, 10, 10, 130, 0),
    "Waiting": (0, 5, 0, 0, 0, 10, 10, 10, 0),
    "WalkDog": (5, 30, 15, 40, 10, 15, 40, 20, 25),
    "Walking": (0, 20, 5, 0, 0, 10, 15, 15, 30),
    "WalkTogether": (0, 20, 5, 10, 0, 10, 30, 15, 25),
}
ANGLE_STD_DEG = 12.0


def _direction(flex: torch.Tensor, abd: torch.Tensor) -> torch.Tensor:
    """Unit vector hanging down, swung forward by ``flex`` and sideways (+x) by ``abd`` (radians)."""
    return torch.stack([torch.sin(abd), -torch.cos(abd) * torch.cos(flex), torch.cos(abd) * torch.sin(flex)],
                       -1)


def sample_poses(actions: list[str], generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Root-centred 3D poses (N, 17, 3) in millimetres, body frame: x = subject's left, y up, z forward."""
    mean = torch.tensor([ACTION_ANGLES[a] for a in actions], dtype=torch.float64)
    noise = ANGLE_STD_DEG * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    ang = torch.deg2rad(mean + noise)
    hip, knee, lean, arm_l, arm_r, abd, elbow_l, elbow_r, swing = ang.unbind(-1)
    phase = torch.where(torch.rand(len(actions), generator=generator) < 0.5, 1.0, -1.0).double()
    b = {k: v * scale for k, v in BONES_MM.items()}
    n = len(actions)
    zero = torch.zeros(n, dtype=torch.float64)
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    j = torch.zeros(n, 17, 3, dtype=torch.float64)
    for (h, k, f), sgn, legswing in (((1, 2, 3), -1.0, swing * phase), ((4, 5, 6), 1.0, -swing * phase)):
        j[:, h] = sgn * b["hip"] * x
        thigh = _direction(hip + legswing, sgn * torch.deg2rad(torch.full_like(zero, 4.0)))
        j[:, k] = j[:, h] + b["thigh"] * thigh
        j[:, f] = j[:, k] + b["shin"] * _direction(hip + legswing - knee, zero)
    up = torch.stack([zero, torch.cos(lean), torch.sin(lean)], -1)
    j[:, 7] = b["spine"] * up
    j[:, 8] = j[:, 7] + b["thorax"] * up
    j[:, 9] = j[:, 8] + b["neck"] * up + torch.tensor([0.0, 0.0, 40.0 * scale], dtype=torch.float64)
    j[:, 10] = j[:, 9] + b["head"] * up
    for (s, e, w), sgn, arm, elbow, armswing in (((11, 12, 13), 1.0, arm_l, elbow_l, swing * phase),
                                                ((14, 15, 16), -1.0, arm_r, elbow_r, -swing * phase)):
        j[:, s] = j[:, 8] + sgn * b["shoulder"] * x
        j[:, e] = j[:, s] + b["upper_arm"] * _direction(arm + armswing, sgn * abd)
        j[:, w] = j[:, e] + b["forearm"] * _direction(arm + armswing + elbow, sgn * abd)
    return j


def _yaw(points: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    x, y, z = points.unbind(-1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)


def render_sequence(action: str, frames: int, generator: torch.Generator, scale: float,
                    noise_px: float = 0.0, noise_generator: torch.Generator | None = None) -> list[dict]:
    """One sequence seen by the four cameras: per camera 2D pixels (F, 34) and the 3D entry.

    Pixel noise is drawn from ``noise_generator`` so that noisy and clean renderings share poses and cameras.
    """
    body = sample_poses([action] * frames, generator, scale)
    yaw = torch.rand(frames, generator=generator, dtype=torch.float64) * 2 * math.pi
    views = []
    for azimuth in CAMERA_AZIMUTH_DEG:
        cam = _yaw(body, yaw + math.radians(azimuth)) * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
        depth = 4000.0 + 2000.0 * torch.rand(1, generator=generator, dtype=torch.float64)
        offset = torch.cat([(torch.rand(2, generator=generator, dtype=torch.float64) - 0.5) * 400.0, depth])
        fx, fy = 1145.0 + 5 * torch.randn(2, generator=generator, dtype=torch.float64)
        cx, cy = 512.0 + 5 * torch.randn(2, generator=generator, dtype=torch.float64)
        absolute = cam + offset
        u = fx * absolute[..., 0] / absolute[..., 2] + cx
        v = fy * absolute[..., 1] / absolute[..., 2] + cy
        pixels = torch.stack([u, v], -1)
        if noise_px > 0:
            noise = torch.randn(pixels.shape, generator=noise_generator, dtype=torch.float64)
            pixels = pixels + noise_px * noise
        views.append({
            "2d": pixels.reshape(frames, 34).numpy(),
            "3d": {"joint_3d": (absolute - absolute[:, :1]).reshape(frames, 51).numpy(),
                   "pelvis": absolute[:, 0].numpy(),
                   "camera": {"fx": float(fx), "fy": float(fy), "cx": float(cx), "cy": float(cy)}},
        })
    return views


def write_synthetic_h36m(root: str | Path, train_frames: int = 4, test_frames: int = 3, seed: int = 0,
                         noise_px: float = 3.0, inputs: tuple[str, ...] = ("gt", "hrnet")) -> Path:
    """Write the official layout for S1 S5 S6 S7 S8 (train) and S9 S11 (test): the 15 actions x 2
    sub-actions (``<Action>``, ``<Action> 1``) x 4 cameras, ``*_frames`` frames each. ``gt`` holds exact
    projections; every other input folder the same with ``noise_px`` Gaussian pixel noise."""
    root = Path(root)
    splits = (("train", TRAIN_SUBJECTS, train_frames), ("test", TEST_SUBJECTS, test_frames))
    for split_index, (split, subjects, frames) in enumerate(splits):
        records: dict[str, tuple[dict, dict]] = {name: ({}, {}) for name in inputs}
        for s_index, subject in enumerate(subjects):
            scale = 0.92 + 0.04 * (s_index % 5)
            for a_index, action in enumerate(ACTIONS):
                for sub_index, sub in enumerate(("", " 1")):
                    sequence = action + sub
                    for name in inputs:
                        # The same poses and cameras for every input: only the pixel noise differs.
                        key_seed = (((seed * 2 + split_index) * 8 + s_index) * 16 + a_index) * 2 + sub_index
                        gen = torch.Generator().manual_seed(key_seed)
                        noise_gen = torch.Generator().manual_seed(key_seed + 7919)
                        noise = 0.0 if name == "gt" else noise_px
                        views = render_sequence(action, frames, gen, scale, noise, noise_gen)
                        for cam_id, view in zip(CAMERA_IDS, views):
                            key = (subject, action, f"{sequence}.{cam_id}")
                            records[name][0][key] = view["2d"]
                            records[name][1][key] = view["3d"]
        for name, (data_2d, data_3d) in records.items():
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(data_2d, folder / f"{split}_custom_2d_unnorm.pth.tar")
            torch.save(data_3d, folder / f"{split}_custom_3d_unnorm.pth.tar")
    # the synthetic writers' marker: records of runs on this folder say data=synthetic (common.results)
    write_marker(root, {"format": "h36m", "train_frames": train_frames, "test_frames": test_frames, "seed": seed,
                        "noise_px": noise_px, "inputs": list(inputs)})
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--train-frames", type=int, default=34, help="frames per sequence (train subjects)")
    parser.add_argument("--test-frames", type=int, default=13, help="frames per sequence (test subjects)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-px", type=float, default=3.0)
    args = parser.parse_args(argv)
    write_synthetic_h36m(args.root, args.train_frames, args.test_frames, args.seed, args.noise_px)
    print(f"wrote synthetic Human3.6M layout under {args.root}")


if __name__ == "__main__":
    main()
