"""Checkpoint files that lose nothing.

A checkpoint is written to a temporary file in the destination's folder, flushed and fsynced, then
renamed over the destination (``os.replace`` is atomic on POSIX) and the folder entry fsynced: a crash
at any moment leaves either the previous file or the new one, never a torn one. Only plain containers,
numbers, strings and tensors go in, so every checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import os
import random
import tempfile
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 1
LAST, BEST = "last.pth", "best.pth"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically (see the module docstring)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Loads a checkpoint file (``path``, or ``path/last.pth`` for a run folder) with ``weights_only``."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def resolve_checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/last.pth`` when ``path`` is a run folder."""
    return os.path.join(path, LAST) if os.path.isdir(path) else path


def rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores :func:`rng_state` (CUDA states only when the device count matches)."""
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@torch.no_grad()
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def plain(value: Any) -> Any:
    """``value`` with paths, tuples and other objects turned into weights-only-safe plain types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def truncate_csv(path: str, keep: Callable[[Dict[str, str]], bool]) -> Optional[int]:
    """Rewrites a CSV log (atomically) keeping the rows for which ``keep(row)`` is true; returns the
    number of rows dropped, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = list(reader)
    if not fields:
        return 0
    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows):
        return 0

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)

    atomic_write(path, write, mode="w")
    return len(rows) - len(kept)
