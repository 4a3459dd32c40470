"""The released per-sample skeleton pipeline (spec §d, §f), on annotations from `common.data.skeleton`.

2-D: `PreNormalize2D` -> append `keypoint_score` as channel 3 (`GenSkeFeat`, joints) -> `UniformSample` ->
decode the sampled frames -> `FormatGCNInput(num_person=2)` -> float32 `(num_clips, 2, clip_len, V, C)`.
3-D: `PreNormalize3D` instead, no score channel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.skeleton import SKELETON_DATASETS, SkeletonSpec, load_skeleton_annotations

__all__ = ["PreNormalize2D", "PreNormalize3D", "SkeletonClips", "SkeletonPipeline", "UniformSample",
           "format_gcn_input"]


class PreNormalize2D:
    """Pixels -> [-1, 1] with the sample's `img_shape` (default 1080×1920), as released (spec §f).

    The release keeps low-confidence joints; newer pyskl zeroes x, y where `score <= threshold` (0.01): that is
    `mask_low_score=True`.
    """

    def __init__(self, img_shape: Sequence[int] = (1080, 1920), mask_low_score: bool = False,
                 threshold: float = 0.01) -> None:
        self.img_shape, self.mask_low_score, self.threshold = tuple(img_shape), mask_low_score, threshold

    def __call__(self, ann: dict[str, Any]) -> dict[str, Any]:
        h, w = ann.get("img_shape", self.img_shape)
        kp = ann["keypoint"].astype(np.float32, copy=True)
        kp[..., 0] = (kp[..., 0] - w / 2) / (w / 2)
        kp[..., 1] = (kp[..., 1] - h / 2) / (h / 2)
        if self.mask_low_score and "keypoint_score" in ann:
            kp[ann["keypoint_score"] <= self.threshold] = 0
        return {**ann, "keypoint": kp}


def _rotation(axis: np.ndarray, theta: float) -> np.ndarray:
    """Counter-clockwise rotation about `axis` by `theta` (Euler-Rodrigues, as in 2s-AGCN / pyskl)."""
    if np.abs(axis).sum() < 1e-6 or abs(theta) < 1e-6:
        return np.eye(3)
    axis = axis / np.sqrt(axis @ axis)
    a = np.cos(theta / 2.0)
    b, c, d = -axis * np.sin(theta / 2.0)
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c + a * d), 2 * (b * d - a * c)],
                     [2 * (b * c - a * d), a * a + c * c - b * b - d * d, 2 * (c * d + a * b)],
                     [2 * (b * d + a * c), 2 * (c * d - a * b), a * a + d * d - b * b - c * c]])


def _angle(v1: np.ndarray, v2: np.ndarray) -> float:
    if np.abs(v1).sum() < 1e-6 or np.abs(v2).sum() < 1e-6:
        return 0.0
    u1, u2 = v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)
    return float(np.arccos(np.clip(u1 @ u2, -1.0, 1.0)))


class PreNormalize3D:
    """pyskl's NTU 3-D pre-normalisation (spec §f): keep the frames where the main person is present, centre on
    joint 1 (spine middle) of its first frame, rotate joint 0→1 onto +z and joint 8→4 onto +x."""

    def __init__(self, zaxis: Sequence[int] = (0, 1), xaxis: Sequence[int] = (8, 4)) -> None:
        self.zaxis, self.xaxis = tuple(zaxis), tuple(xaxis)

    def __call__(self, ann: dict[str, Any]) -> dict[str, Any]:
        sk = ann["keypoint"].astype(np.float64)
        m = sk.shape[0]
        if m not in (1, 2):
            raise ValueError(f"PreNormalize3D takes 1 or 2 persons, annotation {ann.get('frame_dir')!r} has {m}")
        if sk.sum() == 0:
            return ann
        present = ~np.isclose(sk, 0).all(axis=(2, 3))  # (M, T)
        if m == 2 and present[0].sum() < present[1].sum():
            sk = sk[[1, 0]][:, present[1]]
        else:
            sk = sk[:, present[0]]
        centre = sk[0, 0, 1].copy() if sk.shape[2] == 25 else sk[0, 0, -1].copy()
        sk = (sk - centre) * (sk != 0).any(-1, keepdims=True)
        bottom, top = sk[0, 0, self.zaxis[0]], sk[0, 0, self.zaxis[1]]
        rz = _rotation(np.cross(top - bottom, [0, 0, 1]), _angle(top - bottom, np.array([0, 0, 1.0])))
        sk = sk @ rz.T
        right, left = sk[0, 0, self.xaxis[0]], sk[0, 0, self.xaxis[1]]
        rx = _rotation(np.cross(right - left, [1, 0, 0]), _angle(right - left, np.array([1.0, 0, 0])))
        sk = sk @ rx.T
        return {**ann, "keypoint": sk.astype(np.float32), "total_frames": sk.shape[1]}


class UniformSample:
    """`UniformSampleFrames` (spec §d): `clip_len` indices per clip in three regimes, for a video of L frames.

    L < clip_len: consecutive from a start, wrapped modulo L; clip_len ≤ L < 2·clip_len: 0..clip_len−1 plus
    +1 offsets at L−clip_len random positions; otherwise one random frame per equal segment. Test mode reseeds
    numpy's legacy generator with `seed` (255) for every video and draws exactly as the release does, so the
    clips match pyskl's; training draws from the given generator.
    """

    def __init__(self, clip_len: int, num_clips: int = 1, test_mode: bool = False, seed: int = 255) -> None:
        if clip_len < 1 or num_clips < 1:
            raise ValueError(f"clip_len and num_clips must be >= 1, got {clip_len}, {num_clips}")
        self.clip_len, self.num_clips, self.test_mode, self.seed = clip_len, num_clips, test_mode, seed

    def _regular(self, rs: Any, length: int) -> np.ndarray:
        n = self.clip_len
        if n <= length < 2 * n:
            offset = np.zeros(n + 1, dtype=np.int64)
            offset[rs.choice(n + 1, length - n, replace=False)] = 1
            return np.arange(n) + np.cumsum(offset)[:-1]
        bids = np.arange(n + 1) * length // n
        return bids[:-1] + rs.randint(np.diff(bids))

    def __call__(self, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Frame indices `(num_clips·clip_len,)` into a video of `length` frames."""
        if length < 1:
            raise ValueError("cannot sample from a video with no frames")
        clips = []
        if self.test_mode:
            rs = np.random.RandomState(self.seed)
            for i in range(self.num_clips):
                rs.rand(), rs.randint(1)  # the release's p_interval draws (interval 1: no crop)
                if length < self.clip_len:
                    start = i if length < self.num_clips else i * length // self.num_clips
                    clips.append(np.arange(start, start + self.clip_len))
                else:
                    clips.append(self._regular(rs, length))
        else:
            rng = rng if rng is not None else np.random.default_rng()
            rs = np.random.RandomState(rng.integers(2**32, dtype=np.uint64).item() % 2**32)
            for _ in range(self.num_clips):
                if length < self.clip_len:
                    start = rs.randint(0, length)
                    clips.append(np.arange(start, start + self.clip_len))
                else:
                    clips.append(self._regular(rs, length))
        return np.mod(np.concatenate(clips), length)


def format_gcn_input(keypoint: np.ndarray, num_clips: int, num_person: int = 2) -> np.ndarray:
    """`FormatGCNInput`: zero-pad / truncate persons to `num_person`, `(M, nc·T, V, C)` -> `(nc, M, T, V, C)`."""
    m = keypoint.shape[0]
    if m < num_person:
        pad = np.zeros((num_person - m, *keypoint.shape[1:]), dtype=keypoint.dtype)
        keypoint = np.concatenate([keypoint, pad], 0)
    keypoint = keypoint[:num_person]
    m, t, v, c = keypoint.shape
    return np.ascontiguousarray(keypoint.reshape(m, num_clips, t // num_clips, v, c).transpose(1, 0, 2, 3, 4))


class SkeletonPipeline:
    """Annotation -> float32 `(num_clips, num_person, clip_len, V, C)` (spec §f order)."""

    def __init__(self, dims: int, clip_len: int = 100, num_clips: int = 1, test_mode: bool = False,
                 num_person: int = 2, mask_low_score: bool = False) -> None:
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 (HRNet keypoints + score) or 3 (NTU 3-D), got {dims}")
        self.dims, self.num_person = dims, num_person
        self.prenorm: Callable[[dict[str, Any]], dict[str, Any]] = (
            PreNormalize2D(mask_low_score=mask_low_score) if dims == 2 else PreNormalize3D())
        self.sample = UniformSample(clip_len, num_clips, test_mode)

    def __call__(self, ann: dict[str, Any], rng: np.random.Generator | None = None) -> np.ndarray:
        ann = self.prenorm(ann)
        kp = ann["keypoint"]
        if self.dims == 2:  # GenSkeFeat: (x, y, score)
            kp = np.concatenate([kp, ann["keypoint_score"][..., None].astype(np.float32)], -1)
        inds = self.sample(kp.shape[1], rng)
        return format_gcn_input(kp[:, inds].astype(np.float32), self.sample.num_clips, self.num_person)


class SkeletonClips(Dataset):
    """A split of a pyskl pickle through `SkeletonPipeline`: `(clips, label)`; with one clip the clip axis is
    dropped, giving `(M, T, V, C)` (the release's `keypoint[:, 0]` for training/validation)."""

    def __init__(self, ann_file: str | os.PathLike, split: str, pipeline: SkeletonPipeline,
                 spec: SkeletonSpec | str) -> None:
        spec = SKELETON_DATASETS[spec] if isinstance(spec, str) else spec
        if spec.dims != pipeline.dims:
            raise ValueError(f"pipeline dims {pipeline.dims} != dataset dims {spec.dims}")
        self.annotations = load_skeleton_annotations(ann_file, split, spec.num_joints, spec.dims, spec.num_classes)
        self.pipeline, self.spec = pipeline, spec

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ann = self.annotations[index]
        rng = np.random.default_rng(int(torch.randint(2**62, ())))  # follows torch's (per-worker) seeding
        clips = torch.from_numpy(self.pipeline(ann, rng))
        return (clips[0] if clips.shape[0] == 1 else clips), int(ann["label"])

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(a["label"]) for a in self.annotations])
