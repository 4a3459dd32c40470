"""Checkpoints: atomic writes, exact resume, safe loading of ours and of official checkpoints.

One story for every paper:

* Our files (run checkpoints, `convert` outputs) hold only tensors, numbers, strings and containers and
  are always read with `torch.load(..., weights_only=True)` (`load_checkpoint`, `read_checkpoint`).
* Official files are read by `load_official_checkpoint`: first `weights_only=True` inside
  `torch.serialization.safe_globals(OFFICIAL_SAFE_GLOBALS)`, an explicit allow-list of the inert types
  released checkpoints pickle (numpy scalars and arrays, `argparse.Namespace`); only when the file holds
  something the allow-list cannot express (an optimizer object, a whole module) the restricted unpickler
  (`load_foreign`) reads it, replacing every unknown class by an inert placeholder. No code from a file
  ever runs.
* A paper's `convert` turns an official file into ours with `save_converted`, which records the origin
  (`"origin": "official"`), so an evaluation of the converted file is still reported as official weights.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from common.errors import UserError

# --------------------------------------------------------------------------------------------------
# Atomic writes and safe loading of our own checkpoints
# --------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` with torch.save to a temporary file, fsync it, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; teammates on a cluster need to read it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints with `weights_only=True`; a bad file is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass an existing file (checkpoint=...)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        import re

        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint (unpickling failed); "
                            "re-download or re-save it") from None
        raise UserError(
            f"checkpoint {path} holds objects other than tensors ({found.group(1)}); if it is an official "
            "checkpoint, load it through the paper's convert.py"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile) as err:
        raise UserError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}); "
            "re-download or re-save it"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


# --------------------------------------------------------------------------------------------------
# Restricted loading of foreign (official) checkpoints
# --------------------------------------------------------------------------------------------------

# Constructors that only build tensors, storages, numpy arrays or containers.
_SAFE_GLOBALS: set[tuple[str, str]] = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("torch.nn.parameter", "Parameter"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_STORAGE_NAMES = {
    name for name in dir(torch) if name.endswith("Storage") and isinstance(getattr(torch, name, None), type)
}
_NUMPY_DTYPE_CLASSES = {"Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                        "Int16DType", "Int8DType", "UInt8DType", "BoolDType"}


class OpaqueObject:
    """Inert placeholder for a class the restricted unpickler refuses to import.

    It records the qualified name, the constructor arguments and the pickled state, so tensors
    inside it (an optimizer's state, say) stay reachable, but none of the original code runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.mapping: dict[Any, Any] = {}  # what a dict subclass (EasyDict, CfgNode ...) held
        self.sequence: list[Any] = []  # what a list subclass held

    def __getattr__(self, name: str) -> Any:
        # pickle may build the object with __new__ alone (NEWOBJ), skipping __init__
        defaults: dict[str, Any] = {"args": (), "kwargs": {}, "state": None, "mapping": {}, "sequence": []}
        if name not in defaults:
            raise AttributeError(name)
        value = defaults[name]
        object.__setattr__(self, name, value)
        return value

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def append(self, value: Any) -> None:
        self.sequence.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.sequence.extend(values)

    def __repr__(self) -> str:
        return f"<opaque {getattr(self, 'qualname', '?')}>"


def _opaque_class(module: str, name: str) -> type:
    return type(name, (OpaqueObject,), {"qualname": f"{module}.{name}"})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and name in _STORAGE_NAMES:
            return getattr(torch, name)
        if module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"):
            return getattr(torch, name)
        if module in ("numpy.dtypes",) and name in _NUMPY_DTYPE_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque_class(module, name)


class _RestrictedPickleModule:
    """A `pickle_module` for torch.load whose Unpickler imports only the safe constructors above."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    UnpicklingError = pickle.UnpicklingError
    __name__ = "osvai_restricted_pickle"


def load_foreign(path: str | os.PathLike, encoding: str | None = None) -> Any:
    """Unpickle an official checkpoint without running its code (see module docstring).

    `encoding="latin1"` reads Python-2-era pickles that hold numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of the downloaded file")
    try:
        extra = {"encoding": encoding} if encoding else {}
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule,
                          **extra)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, ImportError, struct.error, zipfile.BadZipFile) as err:
        raise UserError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:100] if str(err) else ''}); re-download it"
        ) from None


def _numpy_safe_globals() -> list[Any]:
    """numpy's scalar/array reconstructors and dtype classes, under the names numpy 1 and 2 pickle them."""
    out: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    out += [getattr(dtypes, n) for n in sorted(_NUMPY_DTYPE_CLASSES) if dtypes is not None and hasattr(dtypes, n)]
    return out


# The explicit allow-list for official files: inert value types only (no optimizer, no module, no callable).
OFFICIAL_SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_safe_globals()]


def load_official_checkpoint(path: str | os.PathLike, encoding: str | None = None,
                             map_location: str | torch.device = "cpu") -> Any:
    """Read an official (foreign) checkpoint without running its code (see the module docstring).

    `weights_only=True` with the `OFFICIAL_SAFE_GLOBALS` allow-list first; the restricted unpickler only
    for a file that pickles other objects (e.g. the optimizer). `encoding="latin1"` reads Python-2 pickles.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of the downloaded file")
    extra = {"encoding": encoding} if encoding else {}
    try:
        with torch.serialization.safe_globals(OFFICIAL_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, **extra)
    except pickle.UnpicklingError:
        pass  # an object outside the allow-list (or not a torch file): the restricted unpickler decides
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile):
        pass
    return load_foreign(path, encoding)


Origin = Literal["ours", "official"]


# Entries only our run checkpoints have beside "model": common.engine's last.pt ("trainer", "global_step") and
# best.pt ("metrics"), gridconv's ("recipe"). Official files also use "model" (RepDistiller, timm-style scripts).
_OUR_RUN_KEYS = ("trainer", "global_step", "metrics", "recipe")


def checkpoint_origin(obj: Any) -> Origin:
    """Who made the weights of a loaded checkpoint: an explicit `"origin"` entry (our `convert` outputs, and
    any file that states it) wins; else `ours` for a run checkpoint our training wrote (`"model"` beside one
    of `_OUR_RUN_KEYS`); anything else is `official` (a released file)."""
    if isinstance(obj, Mapping):
        if obj.get("origin") in ("ours", "official"):
            return obj["origin"]
        if isinstance(obj.get("model"), Mapping) and any(k in obj for k in _OUR_RUN_KEYS):
            return "ours"
    return "official"


def read_checkpoint(path: str | os.PathLike, encoding: str | None = None) -> tuple[Any, Origin]:
    """Read any checkpoint an entry point is given: ours with `weights_only=True`; a file that holds more
    than tensors goes through `load_official_checkpoint`. Returns (object, origin)."""
    try:
        obj = load_checkpoint(path)
    except UserError as err:
        if "holds objects other than tensors" not in str(err):
            raise
        return load_official_checkpoint(path, encoding), "official"
    return obj, checkpoint_origin(obj)


def save_converted(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, paper: str,
                   source: str | os.PathLike, origin: Origin = "official", **meta: Any) -> Path:
    """Write a `convert` output atomically: our key names, `weights_only`-loadable, with the weights' origin
    (official unless the source was one of our runs), so an evaluation of it is reported truthfully."""
    return atomic_save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "origin": origin,
                        "paper": paper, "source": str(source), **meta}, path)


_STATE_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "module", "params",
               "student", "network")


def _module_tensors(obj: OpaqueObject, prefix: str = "") -> OrderedDict[str, torch.Tensor] | None:
    """The state_dict of a whole pickled `nn.Module` (`torch.save(model)`), rebuilt from its attributes."""
    st = obj.state
    if not (isinstance(st, Mapping) and "_parameters" in st and "_modules" in st):
        return None
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, p in (st.get("_parameters") or {}).items():
        if isinstance(p, torch.Tensor):
            out[prefix + name] = p.detach()
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for name, b in (st.get("_buffers") or {}).items():
        if isinstance(b, torch.Tensor) and name not in skip:
            out[prefix + name] = b
    for name, child in (st.get("_modules") or {}).items():
        if isinstance(child, OpaqueObject):
            out.update(_module_tensors(child, f"{prefix}{name}.") or {})
    return out


def _unwrap(obj: Any) -> Any:
    """A placeholder as the mapping it stands for: a module's tensors, a dict subclass's items, or its state."""
    if not isinstance(obj, OpaqueObject):
        return obj
    tensors = _module_tensors(obj)
    if tensors is not None:
        return tensors
    if obj.mapping:
        return obj.mapping
    return obj.state


def _tensorise(obj: Any) -> Any:
    """numpy arrays in a mapping become tensors (some official checkpoints store weights as numpy)."""
    if isinstance(obj, Mapping):
        return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
    return obj


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, key: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Find the model's tensors in a loaded checkpoint (a bare state_dict, or under a usual key).

    `key` names the entry to use (e.g. "state_dict" or "ema"); by default the usual names are tried
    in order. A leading `module.` (DataParallel / DDP) is stripped.
    """
    obj = _tensorise(_unwrap(obj))
    found: Any = None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"checkpoint has no entry {key!r}; its top-level entries are {keys}")
        found = _tensorise(_unwrap(obj[key]))
        if not isinstance(found, Mapping):
            raise UserError(f"checkpoint entry {key!r} holds a {type(found).__name__}, not a state_dict")
    elif _is_state_dict(obj):
        found = obj
    elif isinstance(obj, Mapping):
        for k in _STATE_KEYS:
            if k in obj:
                inner = _unwrap(obj[k])
                if isinstance(inner, Mapping):
                    try:
                        return extract_state_dict(inner)
                    except UserError:
                        continue
    if found is None and not isinstance(obj, Mapping):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    if found is None:
        raise UserError(
            f"no state_dict found in checkpoint; top-level entries are {list(obj.keys())[:10]}; "
            "name the right one with its key"
        )
    if isinstance(found, Mapping) and not _is_state_dict(found):
        found = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in found.items():
        out[k[7:] if k.startswith("module.") else k] = v
    if not out:
        raise UserError("the checkpoint entry holds no tensors")
    return out


def load_foreign_state_dict(path: str | os.PathLike, key: str | None = None,
                            encoding: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Load an official checkpoint safely and return its model tensors (see `extract_state_dict`)."""
    return extract_state_dict(load_official_checkpoint(path, encoding), key)


def to_plain(obj: Any) -> Any:
    """Turn numpy scalars/arrays and placeholders from a foreign checkpoint into plain Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, OpaqueObject):
        return repr(obj)
    return obj


def load_state_dict_verbose(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """`model.load_state_dict` that names missing, unexpected and mis-shaped keys.

    With `strict`, any mismatch is a `UserError` whose single line lists the keys (first few of each).
    Returns (missing, unexpected).
    """
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items() if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected or mismatched):
        raise UserError(f"{source} does not fit the model: " + _describe(missing, unexpected, mismatched))
    usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return missing, unexpected


def _describe(missing: list[str], unexpected: list[str], mismatched: list[str], show: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Run checkpoints: save, find, resume; SIGTERM
# --------------------------------------------------------------------------------------------------

LAST = "last.pt"
FINISHED = "FINISHED"  # marker a run directory gets when its training ended normally
RESUMED_BY = "RESUMED_BY"  # marker: another run directory has continued this one


def claim_resumed(source: Path, by: Path) -> None:
    """Mark `source` as continued by `by`, so `resume=auto` never picks it up a second time."""
    (Path(source) / RESUMED_BY).write_text(f"{by}\n")


class Checkpointer:
    """Saves `last.pt` (and optional named copies) atomically in a run directory."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled

    def save(self, state: Mapping[str, Any], name: str = LAST) -> Path | None:
        if not self.enabled:
            return None
        return atomic_save(dict(state), self.run_dir / name)

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def mark_finished(self) -> None:
        if self.enabled:
            (self.run_dir / FINISHED).write_text("training ended normally\n")


def find_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """Resolve the `resume` setting to a checkpoint path, or None to start fresh.

    * `None`, "", "none", "false": start fresh.
    * "auto": this run directory's `last.pt`, else the newest `last.pt` among sibling runs of the
      same experiment (`<run_dir>/../*/last.pt`) that did not finish and was not resumed already
      (never across the jobs of a Hydra sweep), else start fresh. The trainer then refuses a
      checkpoint written with another global batch, length or seed.
    * anything else: a path that must exist.
    """
    if resume is None or str(resume).lower() in ("", "none", "false", "null"):
        return None
    run_dir = Path(run_dir)
    if str(resume).lower() == "auto":
        if (run_dir / LAST).is_file():
            return run_dir / LAST
        if run_dir.parent.name.startswith("multirun"):  # sweep jobs are siblings but different runs
            return None
        candidates = sorted(run_dir.parent.glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for cand in candidates:
            if not any((cand.parent / m).exists() for m in (FINISHED, RESUMED_BY, "result.json")):
                return cand
        return None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"resume={resume}: no such checkpoint; use resume=auto or an existing last.pt")
    return path


class StopSignal:
    """Turns SIGTERM (and SLURM's SIGUSR1) into a flag the training loop polls between steps.

    The loop then saves a checkpoint and exits; `resume=auto` continues from there.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._signals = tuple(signals)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signum = signum

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
