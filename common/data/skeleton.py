"""pyskl skeleton annotation pickles: a validating reader and a synthetic writer of the same format.

Format (pyskl `tools/data/README.md`; spec ske2grid §f): one pickle per dataset holding a dict with
`split` (split name -> list of `frame_dir` ids) and `annotations` (one dict per video: `frame_dir`, `label`,
`total_frames`, `keypoint` float `M×T×V×C`, and for 2-D data `keypoint_score` `M×T×V`, `img_shape`,
`original_shape`). 2-D HRNet pickles use the 17 COCO joints with C = 2 (pixels); 3-D NTU pickles the 25 Kinect
joints with C = 3. The pickle is read with a restricted unpickler (builtins and numpy arrays only), and every
selected annotation is checked at load, so a wrong file fails at start-up with one line naming it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.base import DatasetError

__all__ = ["SKELETON_DATASETS", "SYNTHETIC_ACTIONS", "SkeletonSpec", "load_skeleton_annotations",
           "read_skeleton_pickle", "write_synthetic_skeleton_pickle"]

_SPEC = "spec ske2grid §f"


@dataclass(frozen=True)
class SkeletonSpec:
    """What a pyskl pickle must hold: classes, joints per person, coordinate dims, and its split names."""

    num_classes: int
    num_joints: int
    dims: int
    splits: tuple[str, ...]


_NTU60 = ("xsub_train", "xsub_val", "xview_train", "xview_val")
_NTU120 = ("xsub_train", "xsub_val", "xset_train", "xset_val")
_UCF = ("train1", "test1", "train2", "test2", "train3", "test3")
SKELETON_DATASETS: dict[str, SkeletonSpec] = {
    "ntu60_hrnet": SkeletonSpec(60, 17, 2, _NTU60),
    "ntu60_3danno": SkeletonSpec(60, 25, 3, _NTU60),
    "ntu120_hrnet": SkeletonSpec(120, 17, 2, _NTU120),
    "ntu120_3danno": SkeletonSpec(120, 25, 3, _NTU120),
    "gym_hrnet": SkeletonSpec(99, 17, 2, ("train", "val")),
    "ucf101_hrnet": SkeletonSpec(101, 17, 2, _UCF),
    "hmdb51_hrnet": SkeletonSpec(51, 17, 2, _UCF),
    "synthetic": SkeletonSpec(8, 17, 2, ("xsub_train", "xsub_val")),
}

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtins and numpy arrays/scalars only; anything else stops the load (no code from the file runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "numpy" and name.endswith("DType")) or (
                module.startswith("numpy.dtypes")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_skeleton_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The raw `{'split': ..., 'annotations': ...}` dict of a pyskl pickle, checked for those two keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"skeleton pickle {path} not found; give the pyskl annotation pickle (e.g. "
                           f"ntu60_hrnet.pkl: a dict with 'split' and 'annotations', {_SPEC}) via data.root/ann_file")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            MemoryError) as err:
        raise DatasetError(f"skeleton pickle {path} is corrupt or not a pyskl annotation pickle "
                           f"({type(err).__name__}: {str(err)[:80]}); re-create it ({_SPEC})") from None
    if not isinstance(data, dict) or "split" not in data or "annotations" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"skeleton pickle {path} must be a dict with 'split' and 'annotations' ({_SPEC}); "
                           f"found {found}")
    if not isinstance(data["split"], dict) or not isinstance(data["annotations"], list):
        raise DatasetError(f"skeleton pickle {path}: 'split' must be a dict of id lists and 'annotations' a list "
                           f"({_SPEC})")
    return data


def _check_annotation(path: Path, ann: Any, num_joints: int, dims: int, num_classes: int | None) -> None:
    """One annotation's fields and shapes (`M×T×V×C` keypoints, `M×T×V` scores for 2-D, label in [0, K))."""
    if not isinstance(ann, dict):
        raise DatasetError(f"{path}: an annotation is a {type(ann).__name__}, not a dict ({_SPEC})")
    vid = ann.get("frame_dir", "?")
    for key in ("frame_dir", "label", "keypoint"):
        if key not in ann:
            raise DatasetError(f"{path}: annotation {vid!r} has no {key!r} ({_SPEC})")
    kp = ann["keypoint"]
    if not isinstance(kp, np.ndarray) or kp.ndim != 4:
        raise DatasetError(f"{path}: annotation {vid!r} keypoint must be an M×T×V×C array, got "
                           f"{getattr(kp, 'shape', type(kp).__name__)} ({_SPEC})")
    m, t, v, c = kp.shape
    if v != num_joints or c != dims:
        raise DatasetError(f"{path}: annotation {vid!r} has keypoints with V={v}, C={c}, but this dataset needs "
                           f"V={num_joints} joints and C={dims} coordinates ({_SPEC}; 2-D: 17 COCO joints, "
                           f"3-D: 25 NTU joints)")
    if dims == 2:
        score = ann.get("keypoint_score")
        if score is None:
            raise DatasetError(f"{path}: 2-D annotation {vid!r} has no 'keypoint_score' (M×T×V) ({_SPEC})")
        if np.shape(score) != (m, t, v):
            raise DatasetError(f"{path}: annotation {vid!r} keypoint_score has shape {np.shape(score)}, expected "
                               f"{(m, t, v)} ({_SPEC})")
    total = ann.get("total_frames", t)
    if int(total) != t or t < 1:
        raise DatasetError(f"{path}: annotation {vid!r} total_frames={total} but keypoint holds {t} frames ({_SPEC})")
    label = ann["label"]
    if not isinstance(label, (int, np.integer)) or label < 0 or (num_classes is not None and label >= num_classes):
        raise DatasetError(f"{path}: annotation {vid!r} label {label!r} is outside [0, {num_classes}) ({_SPEC})")


def load_skeleton_annotations(path: str | os.PathLike, split: str, num_joints: int, dims: int,
                              num_classes: int | None = None) -> list[dict[str, Any]]:
    """The annotations of `split` in a pyskl pickle, each validated (shapes, scores, label range).

    Raises a one-line `DatasetError` naming the file for a missing/corrupt pickle, a missing split key (listing
    the present ones), joints that do not match the layout, a missing `keypoint_score`, or a label outside [0, K).
    """
    path = Path(path).expanduser()
    data = read_skeleton_pickle(path)
    if split not in data["split"]:
        raise DatasetError(f"skeleton pickle {path} has no split {split!r}; present splits: "
                           f"{', '.join(sorted(map(str, data['split'])))} ({_SPEC})")
    wanted = set(data["split"][split])
    anns = [a for a in data["annotations"] if isinstance(a, dict) and a.get("frame_dir") in wanted]
    if not anns:
        raise DatasetError(f"skeleton pickle {path}: split {split!r} selects no annotation (its ids match no "
                           f"'frame_dir') ({_SPEC})")
    for ann in anns:
        _check_annotation(path, ann, num_joints, dims, num_classes)
    return anns


# --------------------------------------------------------------------------------------------------------------
# Synthetic COCO-17 actions (spec ske2grid §i)
# --------------------------------------------------------------------------------------------------------------
SYNTHETIC_ACTIONS = ("wave_left_hand", "wave_right_hand", "raise_both_arms", "kick", "squat", "jump", "clap", "bow")

# Standing COCO-17 template in pixels relative to the hip centre, y down; body height ~360 px.
_TEMPLATE = np.array([
    [0, -175], [6, -182], [-6, -182], [14, -178], [-14, -178],      # nose, eyes, ears
    [40, -135], [-40, -135], [50, -75], [-50, -75], [55, -20], [-55, -20],  # shoulders, elbows, wrists
    [22, 0], [-22, 0], [24, 90], [-24, 90], [25, 180], [-25, 180],  # hips, knees, ankles
], dtype=np.float64)
_HEAD, _ARMS_L, _ARMS_R = [0, 1, 2, 3, 4], [7, 9], [8, 10]
_UPPER = list(range(11))


def _motion(action: int, s: np.ndarray, w: np.ndarray, amp: float) -> np.ndarray:
    """Displacement (T, 17, 2) of `action`: `s` = (1 − cos θ)/2 ∈ [0, 1] (a rise-and-return), `w` = sin θ."""
    d = np.zeros((len(s), 17, 2))
    a = amp
    if action in (0, 1):  # wave one hand: arm raised, wrist swinging sideways
        elb, wri, sign = (7, 9, 1.0) if action == 0 else (8, 10, -1.0)
        d[:, elb] = [sign * 25, -90]
        d[:, wri, 0] = sign * (30 + 45 * a * w)
        d[:, wri, 1] = -200
    elif action == 2:  # raise both arms
        d[:, _ARMS_L + _ARMS_R, 1] = (-170 * a * s)[:, None]
    elif action == 3:  # kick with the right leg
        d[:, 14] = np.stack([-40 * a * s, -70 * a * s], -1)
        d[:, 16] = np.stack([-90 * a * s, -140 * a * s], -1)
    elif action == 4:  # squat: everything above the knees goes down, knees go out
        d[:, list(range(13)), 1] = (90 * a * s)[:, None]
        d[:, 13, 0], d[:, 14, 0] = 25 * a * s, -25 * a * s
        d[:, [13, 14], 1] = (30 * a * s)[:, None]
    elif action == 5:  # jump: the whole body up
        d[:, :, 1] = (-110 * a * s)[:, None]
    elif action == 6:  # clap: wrists meet in front of the chest
        d[:, 9] = np.stack([-50 * a * s, -90 * a * s], -1)
        d[:, 10] = np.stack([50 * a * s, -90 * a * s], -1)
        d[:, [7, 8], 1] = (-30 * a * s)[:, None]
    elif action == 7:  # bow: head and shoulders go down towards the hips
        d[:, _HEAD, 1] = (120 * a * s)[:, None]
        d[:, [5, 6, 7, 8, 9, 10], 1] = (80 * a * s)[:, None]
    return d


def _synthetic_video(rng: np.random.Generator, action: int, frames: tuple[int, int],
                     img_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    t = int(rng.integers(frames[0], frames[1] + 1))
    cycles, phase, amp = rng.uniform(1.0, 2.0), rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.3)
    theta = 2 * np.pi * cycles * np.arange(t) / t + phase
    pose = _TEMPLATE[None] + _motion(action, (1 - np.cos(theta)) / 2, np.sin(theta), amp)
    scale = rng.uniform(0.8, 1.2)
    h, w = img_shape
    centre = np.array([rng.uniform(0.35 * w, 0.65 * w), rng.uniform(0.45 * h, 0.65 * h)])
    pose = pose * scale + centre
    pose += rng.normal(0.0, 0.035 * 360 * scale, size=pose.shape)  # joint jitter, 3.5% of body height
    score = rng.uniform(0.5, 1.0, size=(1, t, 17))
    return pose[None].astype(np.float32), score.astype(np.float32)


def write_synthetic_skeleton_pickle(path: str | os.PathLike, train_per_class: int = 60, val_per_class: int = 60,
                                    num_classes: int = 8, frames: Sequence[int] = (24, 32), seed: int = 0,
                                    img_shape: Sequence[int] = (1080, 1920)) -> Path:
    """Write a pyskl-format 2-D COCO-17 pickle of §i's periodic actions (deterministic under `seed`).

    One person per video (FormatGCNInput zero-pads the second); random frequency, phase, amplitude, scale,
    translation, joint jitter and keypoint scores U[0.5, 1]; balanced classes; splits `xsub_train`/`xsub_val`.
    The file is written atomically.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_ACTIONS):
        raise DatasetError(f"num_classes must be in [1, {len(SYNTHETIC_ACTIONS)}] (the synthetic actions), "
                           f"got {num_classes}")
    rng = np.random.default_rng(seed)
    annotations, split = [], {"xsub_train": [], "xsub_val": []}
    shape = (int(img_shape[0]), int(img_shape[1]))
    for name, per_class in (("xsub_train", train_per_class), ("xsub_val", val_per_class)):
        for i in range(per_class * num_classes):
            label = i % num_classes
            kp, score = _synthetic_video(rng, label, (int(frames[0]), int(frames[1])), shape)
            vid = f"{name}_{i:05d}_{SYNTHETIC_ACTIONS[label]}"
            split[name].append(vid)
            annotations.append(dict(frame_dir=vid, label=label, total_frames=kp.shape[1], img_shape=shape,
                                    original_shape=shape, keypoint=kp, keypoint_score=score))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"split": split, "annotations": annotations}, f, protocol=4)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
