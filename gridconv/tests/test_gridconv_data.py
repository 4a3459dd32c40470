"""Human3.6M readers (official layout, VideoPose3D npz), exclusions, normalisation, synthetic writer,
MPI-INF-3DHP reader, and the messages a bad dataset gives."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import DatasetError
from gridconv.data import (
    S9_DRIFT_FILES,
    TEST_SUBJECTS,
    TRAIN_SUBJECTS,
    hold_out,
    load_npz_object,
    read_h36m,
    read_mpi3dhp,
)
from gridconv.h36m_cameras import CAMERA_IDS, EXTRINSICS, quaternion_rotate, world_to_camera
from gridconv.synthetic import write_synthetic_h36m


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_h36m(tmp_path_factory.mktemp("h36m"), train_frames=2, test_frames=2, seed=3)


def test_synthetic_layout_matches_official(synthetic_root: Path) -> None:
    from gridconv.data import load_pose_file

    d2 = load_pose_file(synthetic_root / "gt" / "train_custom_2d_unnorm.pth.tar")
    d3 = load_pose_file(synthetic_root / "gt" / "train_custom_3d_unnorm.pth.tar")
    assert len(d2) == 5 * 30 * 4 == len(d3)  # subjects x sequences x cameras, as in the authors' logs
    key = ("S1", "Waiting", "Waiting 1.60457274")
    assert isinstance(d2[key], np.ndarray) and d2[key].shape == (2, 34)
    entry = d3[key]
    assert entry["joint_3d"].shape == (2, 51) and entry["pelvis"].shape == (2, 3)
    assert np.all(entry["joint_3d"][:, :3] == 0)  # root-relative: the pelvis row is 0
    assert set(entry["camera"]) == {"fx", "fy", "cx", "cy"}
    px = d2[key].reshape(2, 17, 2)
    assert px.min() > 100 and px.max() < 900
    # 2D is the perspective projection of pelvis + joint_3d.
    cam = entry["camera"]
    absolute = entry["joint_3d"].reshape(2, 17, 3) + entry["pelvis"][:, None]
    u = cam["fx"] * absolute[..., 0] / absolute[..., 2] + cam["cx"]
    np.testing.assert_allclose(u, px[..., 0], atol=1e-6)


def test_reader_splits_exclusions_and_normalisation(synthetic_root: Path) -> None:
    train = read_h36m(synthetic_root, "train")
    assert set(train.subjects) == set(TRAIN_SUBJECTS) and len(train) == 5 * 30 * 4 * 2
    test_gt = read_h36m(synthetic_root, "test", "gt")
    test_det = read_h36m(synthetic_root, "test", "hrnet")
    assert set(test_gt.subjects) == set(TEST_SUBJECTS)
    pairs = list(zip(test_gt.subjects, test_gt.files))
    assert not any(s == "S11" and f.startswith("Directions.") for s, f in pairs)
    assert sum(s == "S9" and f in S9_DRIFT_FILES for s, f in zip(test_gt.subjects, test_gt.files)) == 24
    assert not any(s == "S9" and f in S9_DRIFT_FILES for s, f in zip(test_det.subjects, test_det.files))
    assert len(test_gt) - len(test_det) == 12 * 2
    assert set(test_gt.actions) == {"Directions", "Discussion", "Eating", "Greeting", "Phoning", "Photo",
                                    "Posing", "Purchases", "Sitting", "SittingDown", "Smoking", "Waiting",
                                    "WalkDog", "Walking", "WalkTogether"}
    from gridconv.data import load_pose_file

    raw = load_pose_file(synthetic_root / "gt" / "test_custom_2d_unnorm.pth.tar")
    first = sorted(k for k in raw if k[0] in TEST_SUBJECTS)[0]
    expected = (torch.from_numpy(raw[first][0]).reshape(17, 2) - 500) / 500
    torch.testing.assert_close(test_gt.pose2d[0], expected.float())
    assert test_gt.pose3d[:, 0].abs().max() == 0
    # Detected inputs differ from GT only by pixel noise; 3D is the same.
    assert 0 < (read_h36m(synthetic_root, "train", "hrnet").pose2d - train.pose2d).abs().mean() * 500 < 5


def test_hold_out_keeps_sequences_whole(synthetic_root: Path) -> None:
    train = read_h36m(synthetic_root, "train")
    kept, held = hold_out(train, 0.1, seed=0)
    assert len(kept) + len(held) == len(train) and len(held) > 0
    seq = lambda p: {(s, f.split(".")[0]) for s, f in zip(p.subjects, p.files)}  # noqa: E731
    assert not seq(kept) & seq(held)
    assert len(set(held.files)) % 4 == 0  # every camera of a held-out sequence


def test_bad_dataset_messages(tmp_path: Path, synthetic_root: Path) -> None:
    with pytest.raises(DatasetError, match="official GridConv"):
        read_h36m(tmp_path / "nowhere", "train")
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "train_custom_2d_unnorm.pth.tar").write_bytes(b"garbage")
    (tmp_path / "gt" / "train_custom_3d_unnorm.pth.tar").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable pose file"):
        read_h36m(tmp_path, "train")
    with pytest.raises(DatasetError, match="split"):
        read_h36m(synthetic_root, "val")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _write_npz(path: Path, **objects) -> None:
    np.savez(path, **{k: np.array(v, dtype=object) for k, v in objects.items()})


def test_videopose3d_npz_conversion(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    cam_pts = torch.randn(5, 17, 3, generator=gen, dtype=torch.float64) * 0.3
    cam_pts = cam_pts + torch.tensor([0, 0, 5.0], dtype=torch.float64)
    # Place the same camera-frame pose into the world for camera 1 of S9, then convert back.
    params = torch.tensor(EXTRINSICS["S9"][1], dtype=torch.float64)
    world17 = quaternion_rotate(params[:4], cam_pts) + params[4:] / 1000.0
    assert torch.allclose(world_to_camera(world17, "S9", 1), cam_pts, atol=1e-9)
    world32 = torch.zeros(5, 32, 3, dtype=torch.float64)
    world32[:, [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27]] = world17
    pix = [np.full((6, 17, 2), 500.0 + i) for i in range(4)]  # 2D longer than 3D: truncated
    _write_npz(tmp_path / "data_3d_h36m.npz", positions_3d={"S9": {"Walking 1": world32.numpy()}})
    _write_npz(tmp_path / "data_2d_h36m_gt.npz", positions_2d={"S9": {"Walking 1": pix}})
    test = read_h36m(tmp_path, "test")
    assert len(test) == 4 * 5 and set(test.files) == {f"Walking 1.{c}" for c in CAMERA_IDS}
    cam1 = [i for i, f in enumerate(test.files) if f.endswith(CAMERA_IDS[1])]
    expected = (cam_pts - cam_pts[:, :1]).float()
    torch.testing.assert_close(test.pose3d[cam1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(test.pose2d[cam1], torch.full((5, 17, 2), 1 / 500))


def test_npz_loader_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "data_3d_h36m.npz"
    _write_npz(path, positions_3d={"S9": _Exploit()})
    with pytest.raises(DatasetError, match="refusing"):
        load_npz_object(path, "positions_3d")
    assert pickle.dumps  # the exploit above is never executed


def test_mpi3dhp_reader(tmp_path: Path) -> None:
    n = 4
    names = np.array([f"mpi_inf_3dhp_test_set/TS{i}/imageSequence/img_{i:06d}.jpg" for i in (1, 3, 5, 6)])
    part = np.random.default_rng(0).uniform(0, 1000, (n, 24, 3))
    joints = np.random.default_rng(1).normal(0, 0.5, (n, 24, 4))
    np.savez(tmp_path / "mpi_inf_3dhp_valid.npz", imgname=names, part=part, S=joints)
    data = read_mpi3dhp(tmp_path / "mpi_inf_3dhp_valid.npz")
    assert data.actions == ["GS", "noGS", "Outdoor", "Outdoor"]
    assert data.pose3d.shape == (n, 17, 3) and data.pose3d[:, 0].abs().max() == 0
    torch.testing.assert_close(data.pose2d[0, 0], torch.tensor((part[0, 14, :2] - 1024) / 1024).float())
    torch.testing.assert_close(data.pose2d[2, 0], torch.tensor((part[2, 14, :2] - 960) / 960).float())
    with pytest.raises(DatasetError, match="not found"):
        read_mpi3dhp(tmp_path / "missing.npz")


def test_evoskeleton_hrnet_detections_with_videopose3d_3d(tmp_path: Path) -> None:
    world32 = np.random.default_rng(0).normal(0, 0.3, (5, 32, 3))
    _write_npz(tmp_path / "data_3d_h36m.npz", positions_3d={"S9": {"Walking 1": world32}})
    pixels32 = np.arange(6 * 64, dtype=np.float64).reshape(6, 64)  # one frame longer than the 3D
    np.save(tmp_path / "twoDPose_HRN_test.npy", {(9, "Walking", "Walking 1.55011271.h5"): pixels32})
    test = read_h36m(tmp_path, "test", "hrnet")
    assert len(test) == 5 and set(test.files) == {"Walking 1.55011271"} and set(test.actions) == {"Walking"}
    expected = pixels32[:5].reshape(5, 32, 2)[:, [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27]]
    torch.testing.assert_close(test.pose2d, torch.from_numpy((expected - 500) / 500).float())
