"""MNIST in its IDX files (raw or gzip), read with a validating IDX reader.

IDX header: two zero bytes, a type byte, a dimension-count byte, then one big-endian uint32 per dimension,
then the values in row-major order, big-endian. MNIST images are type 0x08 (ubyte) with 3 dimensions
(magic 2051 = 0x00000803), labels type 0x08 with 1 dimension (magic 2049 = 0x00000801).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data.base import DatasetError

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # gzip by content, not by name: a decompressed file may keep its .gz name and vice versa
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError as err:
        raise DatasetError(f"missing IDX file {path}; point the dataset root at the MNIST files") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(
            f"cannot decompress {path} ({err}); the gzip file is corrupt, fetch it again"
        ) from err


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian numpy array of the header's shape.

    Args:
        path: the file.
        expect_magic: if given, the 4-byte magic the file must have (e.g. `IMAGES_MAGIC`).
    Raises:
        DatasetError: missing file, bad magic, unknown type code, or a size that does not match the header.
    """
    path = Path(path).expanduser()
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DatasetError(f"{path} is too short ({len(buf)} bytes) to be an IDX file")
    magic = int.from_bytes(buf[:4], "big")
    zero, type_code, ndim = buf[:2], buf[2], buf[3]
    if zero != b"\x00\x00" or type_code not in IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"bad IDX magic 0x{magic:08x} in {path}: expected 0x0000TTDD (type byte TT in "
            f"{', '.join(f'0x{t:02x}' for t in IDX_DTYPES)}, DD dimensions); is this an uncorrupted IDX file?"
        )
    if expect_magic is not None and magic != expect_magic:
        raise DatasetError(
            f"IDX magic 0x{magic:08x} in {path}, expected 0x{expect_magic:08x}; images and labels swapped?"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetError(f"{path} is truncated inside its IDX header ({len(buf)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise DatasetError(
            f"{path}: the IDX header says shape {shape} ({expected} data bytes) but the file holds "
            f"{len(buf) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file (gzip when `compress`, default: when the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (
            c
            for c, dt in IDX_DTYPES.items()
            if (dt.kind, dt.itemsize) == (array.dtype.kind, array.dtype.itemsize)
        ),
        None,
    )
    if code is None:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    big = array.astype(IDX_DTYPES[code], copy=False)
    payload = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + big.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)


def find_mnist_files(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split under `root`, with or without a .gz suffix."""
    if split not in SPLIT_ALIASES:
        raise DatasetError(f"unknown MNIST split '{split}'; use one of {sorted(SPLIT_ALIASES)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"MNIST root {root} does not exist; expected the four IDX files in it")
    found = []
    for stem in FILE_NAMES[SPLIT_ALIASES[split]]:
        cands = [root / (stem + ext) for ext in (".gz", "")]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise DatasetError(f"MNIST {split} file {stem}[.gz] not found in {root}")
        found.append(hit)
    return found[0], found[1]


def split_indices(n: int, n_train: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random partition of range(n) into n_train and n - n_train indices (each sorted)."""
    if not 0 <= n_train <= n:
        raise ValueError(f"n_train={n_train} must lie in [0, {n}]")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


class MNIST(Dataset):
    """MNIST from a pair of IDX files, optionally restricted to `indices`; items: `(transform(img), label)`.

    `img` is a 28x28 grayscale PIL image. For the 8,000 / 2,000 split of the t10k files:
        tr, te = split_indices(10_000, 8_000, seed=0)
        train = MNIST(images, labels, indices=tr); held_out = MNIST(images, labels, indices=te)
    """

    def __init__(
        self,
        images: str | os.PathLike,
        labels: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        indices: np.ndarray | None = None,
    ) -> None:
        data = read_idx(images, IMAGES_MAGIC)
        targets = read_idx(labels, LABELS_MAGIC).astype(np.int64)
        if data.dtype != np.uint8 or len(data) != len(targets):
            raise DatasetError(
                f"{images} ({data.dtype}, {len(data)} images) and {labels} ({len(targets)} labels) "
                "do not form a pair; check the file names"
            )
        if indices is not None:
            data, targets = data[indices], targets[indices]
        self.data, self.targets = np.ascontiguousarray(data), targets
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        indices: np.ndarray | None = None,
    ) -> MNIST:
        """The standard file names (`train-*` / `t10k-*`, raw or .gz) under `root`."""
        return cls(*find_mnist_files(root, split), transform=transform, indices=indices)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])  # 2-D uint8 -> mode "L"
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])
