"""Human3.6M and MPI-INF-3DHP readers for lifting (spec sections d and f).

Human3.6M, two accepted layouts under ``<root>``:

1. the official GridConv layout ``<root>/<input>/{train,test}_custom_{2d,3d}_unnorm.pth.tar``: dicts keyed
   by ``(subject, action, "<sequence>.<camera id>")``; 2D values (N, 34) pixels, 3D values dicts with
   ``joint_3d`` (N, 51) camera-frame millimetres, root-relative;
2. the VideoPose3D files ``<root>/data_3d_h36m.npz`` with ``data_2d_h36m_<input>.npz`` (``gt``, or ``cpn``
   for ``data_2d_h36m_cpn_ft_h36m_dbb.npz``) or, for ``hrnet``, EvoSkeleton's ``twoDPose_HRN_{train,test}.npy``,
   converted on the fly (32 -> 17 joints, world -> camera with the standard Human3.6M extrinsics, metres
   -> millimetres, minus the pelvis).

Both are read without unrestricted unpickling. Samples are normalised as the official reader does:
2D ``(u - 500) / 500``, 3D millimetres / 1000. Exclusions: S11 ``Directions`` always; the 12 drifting S9
files at test time for detected (non-GT) inputs.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data import DatasetError

from .h36m_cameras import CAMERA_IDS, world_to_camera

TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")
ACTIONS = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Photo", "Posing", "Purchases",
           "Sitting", "SittingDown", "Smoking", "Waiting", "WalkDog", "Walking", "WalkTogether")
# Original Human3.6M file names of two actions (some S1 files) -> the 15 protocol action names.
ACTION_ALIASES = {"TakingPhoto": "Photo", "WalkingDog": "WalkDog"}
# S9 files with known ground-truth drift, dropped from testing with detected 2D inputs.
S9_DRIFT_FILES = frozenset(f"{seq}.{cam}" for seq in ("Waiting 1", "Greeting", "SittingDown 1")
                           for cam in CAMERA_IDS)
OFFICIAL_FILES = ("{split}_custom_2d_unnorm.pth.tar", "{split}_custom_3d_unnorm.pth.tar")
VIDEOPOSE3D_2D = {"gt": "data_2d_h36m_gt.npz", "cpn": "data_2d_h36m_cpn_ft_h36m_dbb.npz"}
VIDEOPOSE3D_JOINTS = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)  # 32 -> 17
LAYOUT_HELP = ("expected <root>/<input>/{train,test}_custom_{2d,3d}_unnorm.pth.tar (official GridConv "
               "layout) or <root>/data_3d_h36m.npz + data_2d_h36m_<input>.npz (VideoPose3D); "
               "see spec section f")


@dataclass
class PoseSet:
    """Normalised lifting samples: ``pose2d`` (N, 17, 2), ``pose3d`` (N, 17, 3) metres, root-relative,
    with the action (first word of the sequence name), subject and file of every sample."""

    pose2d: torch.Tensor
    pose3d: torch.Tensor
    actions: list[str]
    subjects: list[str]
    files: list[str]

    def __len__(self) -> int:
        return self.pose2d.shape[0]

    def subset(self, mask: torch.Tensor) -> PoseSet:
        idx = mask.nonzero().flatten().tolist()
        return PoseSet(self.pose2d[mask], self.pose3d[mask], [self.actions[i] for i in idx],
                       [self.subjects[i] for i in idx], [self.files[i] for i in idx])


def normalise_2d(pixels: torch.Tensor, centre: float = 500.0, scale: float = 500.0) -> torch.Tensor:
    """Official 2D normalisation, ``(u - 500) / 500`` on both axes (Human3.6M frames are ~1000 px)."""
    return (pixels - centre) / scale


def normalise_in_the_wild(pixels: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """The authors' rule for other images (GitHub issue #2): ``(u - L/2) / (L/2)``, ``L = max(W, H)``."""
    half = max(width, height) / 2.0
    return (pixels - half) / half


# ----------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [np.ndarray, np.dtype, core._reconstruct, core.scalar]
    allowed += [type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "u1", "?")]
    allowed += [(core._reconstruct, "numpy.core.multiarray._reconstruct"),
                (core.scalar, "numpy.core.multiarray.scalar")]
    return allowed


def load_pose_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with numpy array reconstruction allow-listed, nothing more."""
    if not path.is_file():
        raise DatasetError(f"Human3.6M file {path} not found; {LAYOUT_HELP}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt or foreign file
        raise DatasetError(f"{path} is not a readable pose file ({type(err).__name__}); "
                           f"re-create it ({LAYOUT_HELP})") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the object arrays inside VideoPose3D ``.npz`` files: dicts, lists and numpy arrays only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "dict"), ("builtins", "list"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_npy(fp: io.BytesIO) -> Any:
    version = np.lib.format.read_magic(fp)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    _, _, dtype = read_header(fp)
    if dtype.hasobject:
        arr = _NumpyOnlyUnpickler(fp, encoding="latin1").load()
    else:
        fp.seek(0)
        arr = np.lib.format.read_array(fp, allow_pickle=False)
    arr = np.asarray(arr)
    return arr.item() if arr.shape == () and arr.dtype.hasobject else arr


def load_npz_object(path: Path, key: str) -> Any:
    """The object stored as ``key`` in an ``.npz`` file, read with a numpy-only unpickler."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; {LAYOUT_HELP}")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as raw:
            return _read_npy(io.BytesIO(raw.read()))
    except (KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path}: cannot read entry {key!r} ({err}); expected a VideoPose3D .npz") \
            from None


def load_npy_object(path: Path) -> Any:
    """The object stored in an ``.npy`` file (e.g. EvoSkeleton's detection dicts), numpy-only unpickling."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; {LAYOUT_HELP}")
    try:
        return _read_npy(io.BytesIO(path.read_bytes()))
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise DatasetError(f"{path}: cannot read it ({err}); expected EvoSkeleton's twoDPose_HRN_*.npy") \
            from None


def evoskeleton_detections(path: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """EvoSkeleton's HRNet detections: a dict keyed by (subject number, action, "<sequence>.<camera>...")
    with (N, 64) pixels of the 32 Human3.6M joints -> {(subject, sequence, camera id): (N, 17, 2)}."""
    raw = load_npy_object(path)
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{path}: expected a dict of detections keyed by (subject, action, file)")
    out = {}
    for (subject, _, fname), value in raw.items():
        sequence, camera = str(fname).split(".")[:2]
        kps = np.asarray(value, dtype=np.float64).reshape(-1, 32, 2)[:, list(VIDEOPOSE3D_JOINTS)]
        out[(f"S{subject}" if not str(subject).startswith("S") else str(subject), sequence, camera)] = kps
    return out


# ----------------------------------------------------------------------------------------------------
# Human3.6M
# ----------------------------------------------------------------------------------------------------
def _as_tensor(x: Any) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))


def official_records(root: Path, split: str) -> tuple[dict, dict]:
    """The two official dicts of a split: 2D pixels and 3D entries, keyed by (subject, action, file)."""
    names = [root / n.format(split=split) for n in OFFICIAL_FILES]
    data_2d, data_3d = (load_pose_file(p) for p in names)
    if not isinstance(data_2d, Mapping) or not isinstance(data_3d, Mapping):
        raise DatasetError(f"{root}: the {split} files must hold dicts keyed by (subject, action, file)")
    return data_2d, data_3d


def videopose3d_records(root: Path, input_2d: str, subjects: Sequence[str], split: str) -> tuple[dict, dict]:
    """VideoPose3D ``.npz`` files in the official layout (pixels; camera-frame mm, root-relative).

    2D: ``data_2d_h36m_<gt|cpn...>.npz``, or for ``hrnet`` EvoSkeleton's ``twoDPose_HRN_<split>.npy``.
    """
    if input_2d not in VIDEOPOSE3D_2D and input_2d != "hrnet":
        raise DatasetError(f"data.input={input_2d}: with VideoPose3D files use one of "
                           f"{sorted(VIDEOPOSE3D_2D) + ['hrnet']}")
    pos3d = load_npz_object(root / "data_3d_h36m.npz", "positions_3d")
    if input_2d == "hrnet":
        detections = evoskeleton_detections(root / f"twoDPose_HRN_{split}.npy")
    else:
        pos2d = load_npz_object(root / VIDEOPOSE3D_2D[input_2d], "positions_2d")
    data_2d: dict = {}
    data_3d: dict = {}
    for subject in subjects:
        for sequence, world in sorted(pos3d.get(subject, {}).items()):
            world = torch.from_numpy(np.asarray(world, dtype=np.float64))[:, list(VIDEOPOSE3D_JOINTS)]
            for cam_index, cam_id in enumerate(CAMERA_IDS):
                cam = world_to_camera(world, subject, cam_index) * 1000.0  # metres -> mm
                if input_2d == "hrnet":
                    if (subject, sequence, cam_id) not in detections:
                        continue  # no detections for this view
                    kps = torch.from_numpy(detections[(subject, sequence, cam_id)])
                else:
                    kps = torch.from_numpy(np.asarray(pos2d[subject][sequence][cam_index], dtype=np.float64))
                n = min(len(kps), cam.shape[0])  # 2D may be longer than 3D: truncate
                kps, cam = kps[:n], cam[:n]
                key = (subject, sequence.split(" ")[0], f"{sequence}.{cam_id}")
                data_2d[key] = kps.reshape(-1, 34)
                data_3d[key] = {"joint_3d": (cam - cam[:, :1]).reshape(-1, 51), "pelvis": cam[:, 0]}
    return data_2d, data_3d


def read_h36m(root: str | Path, split: str, input_2d: str = "gt",
              exclude_drift: bool | None = None) -> PoseSet:
    """Normalised Human3.6M samples of ``split`` (train: S1 S5 S6 S7 S8, test: S9 S11).

    ``exclude_drift`` (default: only for detected inputs at test time) drops the drifting S9 files.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    subjects = TRAIN_SUBJECTS if split == "train" else TEST_SUBJECTS
    if (root / input_2d / OFFICIAL_FILES[0].format(split=split)).is_file():
        data_2d, data_3d = official_records(root / input_2d, split)
    elif (root / "data_3d_h36m.npz").is_file():
        data_2d, data_3d = videopose3d_records(root, input_2d, subjects, split)
    else:
        raise DatasetError(f"no Human3.6M data for input '{input_2d}' under {root}; {LAYOUT_HELP}")
    if exclude_drift is None:
        exclude_drift = split == "test" and input_2d != "gt"
    p2d, p3d, actions, subs, files = [], [], [], [], []
    for key in sorted(data_2d):
        subject, _, fname = key
        sequence = fname.split(".")[0]
        if subject not in subjects or (subject == "S11" and sequence == "Directions"):
            continue
        if exclude_drift and subject == "S9" and fname in S9_DRIFT_FILES:
            continue
        if key not in data_3d or "joint_3d" not in data_3d[key]:
            raise DatasetError(f"{root}: 3D entry {key} (key 'joint_3d') missing; {LAYOUT_HELP}")
        kp2d, kp3d = _as_tensor(data_2d[key]), _as_tensor(data_3d[key]["joint_3d"])
        if kp2d.shape[-1] != 34 or kp3d.shape[-1] != 51 or kp2d.shape[0] != kp3d.shape[0]:
            raise DatasetError(f"{root}: {key} has 2D {tuple(kp2d.shape)} / 3D {tuple(kp3d.shape)}, "
                               "expected (N, 34) pixels and (N, 51) millimetres")
        p2d.append(kp2d.reshape(-1, 17, 2))
        p3d.append(kp3d.reshape(-1, 17, 3))
        n = kp2d.shape[0]
        action = sequence.split(" ")[0]
        actions += [ACTION_ALIASES.get(action, action)] * n
        subs += [subject] * n
        files += [fname] * n
    if not p2d:
        raise DatasetError(f"{root}: no {split} sequences of subjects {list(subjects)}; {LAYOUT_HELP}")
    pose2d, pose3d = normalise_2d(torch.cat(p2d)).float(), (torch.cat(p3d) / 1000.0).float()
    return PoseSet(pose2d, pose3d, actions, subs, files)


def hold_out(poses: PoseSet, fraction: float, seed: int = 0) -> tuple[PoseSet, PoseSet]:
    """Split training data into (train, held-out) by whole sequences (all cameras of a sequence go
    together), so that checkpoint selection never sees the test subjects."""
    sequences = sorted({(s, f.split(".")[0]) for s, f in zip(poses.subjects, poses.files)})
    if fraction <= 0 or len(sequences) < 2:
        return poses, poses.subset(torch.zeros(len(poses), dtype=torch.bool))
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, math.floor(fraction * len(sequences) + 0.5))
    held = {sequences[i] for i in order[:count]}
    mask = torch.tensor([(s, f.split(".")[0]) in held for s, f in zip(poses.subjects, poses.files)])
    return poses.subset(~mask), poses.subset(mask)


# ----------------------------------------------------------------------------------------------------
# MPI-INF-3DHP (test set, cross-dataset evaluation; spec section d)
# ----------------------------------------------------------------------------------------------------
# SPIN's 24-joint order -> Human3.6M's 17 (pelvis, legs, spine, neck as thorax, head, head top, arms).
SPIN24_TO_H36M17 = (14, 2, 1, 0, 3, 4, 5, 16, 12, 18, 13, 9, 10, 11, 8, 7, 6)
MPI3DHP_SCENES = {"TS1": "GS", "TS2": "GS", "TS3": "noGS", "TS4": "noGS", "TS5": "Outdoor", "TS6": "Outdoor"}
MPI3DHP_IMAGE_SIZE = {"TS1": (2048, 2048), "TS2": (2048, 2048), "TS3": (2048, 2048), "TS4": (2048, 2048),
                      "TS5": (1920, 1080), "TS6": (1920, 1080)}


def read_mpi3dhp(path: str | Path) -> PoseSet:
    """The MPI-INF-3DHP test frames of a SPIN-style ``mpi_inf_3dhp_valid.npz`` (``imgname``, ``part``
    (N, 24, 3) pixels + visibility, ``S`` (N, 24, 4) metres + visibility), in Human3.6M joint order.

    2D is normalised with the in-the-wild rule (image size per sequence), 3D is root-relative metres.
    ``actions`` holds the scene (GS / noGS / Outdoor) so that the action-wise code splits by scene.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"MPI-INF-3DHP file {path} not found; expected SPIN's mpi_inf_3dhp_valid.npz "
                           "(imgname, part, S), see spec section f")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"imgname", "part", "S"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path}: entries {sorted(missing)} missing; expected imgname, part, S")
        names = [str(n) for n in npz["imgname"]]
        part, joints = torch.from_numpy(npz["part"]).double(), torch.from_numpy(npz["S"]).double()
    idx = list(SPIN24_TO_H36M17)
    seqs = [next((p for p in Path(n).parts if p in MPI3DHP_SCENES), "") for n in names]
    if "" in seqs:
        raise DatasetError(f"{path}: image names must contain the test sequence (TS1..TS6)")
    size = torch.tensor([MPI3DHP_IMAGE_SIZE[s] for s in seqs], dtype=torch.float64)
    half = size.max(1).values[:, None, None] / 2
    pose2d = (part[:, idx, :2] - half) / half
    pose3d = joints[:, idx, :3] - joints[:, idx[:1], :3]
    return PoseSet(pose2d.float(), pose3d.float(), [MPI3DHP_SCENES[s] for s in seqs], seqs, names)
