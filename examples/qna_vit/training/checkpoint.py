"""Checkpoint files that lose nothing.

A checkpoint is written to a temporary file in the destination's folder, flushed and fsynced, then
renamed over the destination (``os.replace`` is atomic on POSIX) and the folder entry fsynced: a crash
at any moment leaves either the previous file or the new one, never a torn one. Only plain containers,
numbers, strings and tensors go in, so every checkpoint loads with ``torch.load(weights_only=True)``.

A run folder keeps its newest checkpoint as ``last.pth`` and the few before it as
``checkpoint-<step>.pth`` (:func:`save_rotating`): a file damaged after it was written (a full disk, a
killed copy, a bad sync) costs the steps since the one before it, not the run. :func:`load_newest`
takes the newest readable one and names those it skipped.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

CHECKPOINT_VERSION = 1
LAST, BEST = "last.pth", "best.pth"
HISTORY = "checkpoint-{step:08d}.pth"  # an older checkpoint of a run folder, by its step
_HISTORY_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(Exception):
    """No usable checkpoint where one was asked for; the message is one line naming the file(s)."""


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


def history(folder: str) -> List[Tuple[int, str]]:
    """The folder's ``checkpoint-<step>.pth`` files as (step, path), newest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := _HISTORY_RE.match(n))]
    return sorted(found, reverse=True)


def candidates(folder: str) -> List[str]:
    """A run folder's checkpoints, newest first: ``last.pth``, then ``checkpoint-<step>.pth`` by step."""
    last = os.path.join(folder, LAST)
    return ([last] if os.path.isfile(last) else []) + [p for _, p in history(folder)]


def _reason(e: BaseException) -> str:
    """An exception as one short line (torch's zip errors span several)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_newest(
    path: str, required: Sequence[str] = ("model",), map_location: Any = "cpu"
) -> Tuple[Dict[str, Any], str, List[Tuple[str, str]]]:
    """Loads the checkpoint ``path`` names: the file itself, or a run folder's newest readable one.

    Returns (checkpoint, its path, [(skipped path, reason)]). A file is unusable when it does not load
    (truncated, not a checkpoint) or lacks a key of ``required``.

    Raises:
        CheckpointError: ``path`` is a file that is unusable, or a folder without a usable checkpoint.
    """
    folder = os.path.isdir(path)
    files = candidates(path) if folder else [path]
    skipped: List[Tuple[str, str]] = []
    for file in files:
        try:
            ckpt = load_checkpoint(file, map_location)
            missing = [k for k in required if k not in ckpt]
            if missing:
                raise ValueError(f"not a training checkpoint (no {', '.join(missing)})")
        except Exception as e:  # any failure to read it makes it unusable; the next one may do
            if not folder:
                raise CheckpointError(f"cannot use checkpoint {file}: {_reason(e)}") from None
            skipped.append((file, _reason(e)))
            continue
        return ckpt, file, skipped
    if not skipped:
        raise CheckpointError(f"no checkpoint ({LAST} or checkpoint-<step>.pth) in {path}")
    raise CheckpointError(
        f"no usable checkpoint in {path}: " + "; ".join(f"{os.path.basename(f)} ({r})" for f, r in skipped)
    )


def _keep_copy(src: str, dst: str) -> None:
    """``dst`` becomes the file ``src`` is now: a hard link (no data copied), else an atomic copy."""
    tmp = f"{dst}.link.tmp"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:  # a filesystem without hard links
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def save_rotating(state: Any, folder: str, step: int, keep: int, previous_step: Optional[int]) -> None:
    """Writes ``state`` to ``folder/last.pth`` atomically, keeping ``keep`` checkpoints in all.

    The ``last.pth`` being replaced (written at ``previous_step``; None when unknown, e.g. not this
    run's) stays as ``checkpoint-<previous_step>.pth``; then all but the newest ``keep - 1`` of those go,
    and any of a step at or past ``step`` (left by an abandoned continuation of an earlier checkpoint).
    """
    last = os.path.join(folder, LAST)
    if keep > 1 and previous_step is not None and previous_step < step and os.path.isfile(last):
        _keep_copy(last, os.path.join(folder, HISTORY.format(step=previous_step)))
    atomic_save(state, last)
    older = [(s, p) for s, p in history(folder) if s < step]
    doomed = [p for s, p in history(folder) if s >= step] + [p for _, p in older[max(keep - 1, 0) :]]
    for p in doomed:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    if doomed:
        _fsync_dir(folder)


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
