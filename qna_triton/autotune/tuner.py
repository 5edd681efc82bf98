"""The tuning loop: for every entry of a plan, check and time each candidate, keep the fastest, write
the results file after every entry (so an interrupted run loses at most one entry and a re-run
continues where it stopped).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from qna_triton.env import utc_now
from qna_triton.tuning import (
    ConfigFileError,
    KernelConfig,
    read_config_file,
    sanitize_gpu_name,
    write_config_file,
)

from .plan import Plan, Shape, default_config

# A candidate must beat the heuristic's median by this fraction to replace it: smaller differences
# are within the spread of repeated timings, and the heuristic is the better-tested config.
MIN_GAIN = 0.02

Timing = Tuple[float, float, float]


class SessionLike(Protocol):
    def check(self, kernel: str, cfg: KernelConfig) -> Optional[str]: ...

    def time(self, kernel: str, cfg: KernelConfig) -> Timing: ...


class BenchLike(Protocol):
    def device_info(self) -> Dict[str, object]: ...

    def open(self, shape: Shape) -> SessionLike: ...

    def release(self, session: Optional[SessionLike]) -> None: ...


class DeviceError(RuntimeError):
    """The device is in an error state no later launch recovers from: the run stops (resumably)."""


# CUDA errors that poison the context: every later launch in this process would fail too
_STICKY = (
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert",
    "CUDA error: an illegal",
    "hardware stack error",
    "uncorrectable ECC",
)


def _is_sticky(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in _STICKY)


def config_label(cfg: KernelConfig) -> str:
    """``64x4/w4/s1``: block_p x block_h, warps, stages; ``banded16x16/w4/s1``: a banded kernel (forward
    or delta) of block_r x block_w output pixels."""
    if cfg.algo == "banded":
        return f"banded{cfg.block_r}x{cfg.block_w}/w{cfg.num_warps}/s{cfg.num_stages}"
    return f"{cfg.block_p}x{cfg.block_h}/w{cfg.num_warps}/s{cfg.num_stages}"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


# ------------------------------------------------------------------------------------ store
class ResultStore:
    """The results file of one GPU: entries done so far, entries given up on, and metadata."""

    def __init__(
        self, path: Path, metadata: Dict[str, Any], fresh: bool = False, log: Callable[[str], None] = print
    ) -> None:
        self.path, self.metadata = Path(path), dict(metadata)
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.skipped: Dict[str, Any] = {}
        if self.path.exists() and not fresh:
            try:
                table = read_config_file(self.path)
            except ConfigFileError as e:
                aside = self.path.with_name(self.path.name + f".corrupt-{int(time.time())}")
                os.replace(self.path, aside)
                log(f"[autotune] {self.path} {e}; moved it to {aside} and starting afresh")
                return
            old_gpu = table.metadata.get("gpu_name")
            new_gpu = metadata.get("gpu_name")
            if old_gpu and new_gpu and sanitize_gpu_name(str(old_gpu)) != sanitize_gpu_name(str(new_gpu)):
                raise SystemExit(
                    f"{self.path} holds results for {old_gpu!r}, not {new_gpu!r}: use another --out-dir or --fresh"
                )
            for name in ("torch_version", "triton_version"):
                if table.metadata.get(name) not in (None, metadata.get(name)):
                    log(
                        f"[autotune] note: {self.path} was tuned with {name} {table.metadata.get(name)}, "
                        f"now {metadata.get(name)}; its entries are kept (use --fresh to re-tune them)"
                    )
            self.entries = dict(table.raw_entries)
            self.skipped = dict(table.skipped)
            if "date" in table.metadata:  # when tuning started; "updated" says when it last wrote
                self.metadata["date"] = table.metadata["date"]
            if table.invalid:
                log(f"[autotune] {len(table.invalid)} invalid entries in {self.path} will be re-tuned")

    def done(self, retry_skipped: bool = False) -> set:
        return set(self.entries) | (set() if retry_skipped else set(self.skipped))

    def add(self, key: str, value: Dict[str, Any]) -> None:
        self.entries[key] = value
        self.skipped.pop(key, None)
        self.save()

    def skip(self, key: str, reason: str) -> None:
        self.skipped[key] = {"reason": reason}
        self.save()

    def save(self) -> None:
        self.metadata["updated"] = utc_now()
        write_config_file(self.path, self.metadata, self.entries, self.skipped)


# --------------------------------------------------------------------------------- progress
class SimpleProgress:
    """A printed progress line (used without tqdm): at most one line every ``every_s`` seconds."""

    def __init__(self, total: int, initial: int = 0, every_s: float = 5.0, stream=None) -> None:
        self.total, self.n, self.every_s = total, initial, every_s
        self.start, self.last, self.stream = time.monotonic(), 0.0, stream or sys.stdout
        self.first = initial

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            spent = now - self.start
            rate = (self.n - self.first) / spent if spent > 0 else 0.0
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            pct = 100.0 * self.n / max(1, self.total)
            print(
                f"[autotune] {self.n}/{self.total} ({pct:.0f}%) {spent:.0f}s elapsed, ~{eta:.0f}s left  {note}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="autotune", unit="entry", dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int, initial: int = 0, use_tqdm: bool = True):
    """tqdm's bar when tqdm is installed (and wanted), else :class:`SimpleProgress`."""
    if use_tqdm:
        try:
            return _TqdmProgress(total, initial)
        except ImportError:
            pass
    return SimpleProgress(total, initial)


# ------------------------------------------------------------------------------------- loop
def tune_entry(
    session: SessionLike, shape: Shape, kernel: str, candidates: List[KernelConfig], min_gain: float = MIN_GAIN
) -> Tuple[Optional[Dict[str, Any]], str]:
    """Checks and times ``candidates`` (the library's default config for the problem,
    :func:`~qna_triton.autotune.plan.default_config`, is the reference and is always timed).

    Returns ``(entry, "")`` or ``(None, reason)`` when not even the heuristic config could be timed.
    """
    t0 = time.monotonic()
    heur = default_config(kernel, shape)
    ordered = [heur] + [c for c in candidates if c != heur]
    timings: Dict[KernelConfig, Timing] = {}
    failed: Dict[str, str] = {}
    for cfg in ordered:
        try:
            if cfg != heur:
                mismatch = session.check(kernel, cfg)
                if mismatch is not None:
                    failed[config_label(cfg)] = f"result differs from the heuristic config's: {mismatch}"
                    continue
            timings[cfg] = tuple(float(v) for v in session.time(kernel, cfg))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # compile errors, out of resources: the candidate is skipped
            if _is_sticky(e):
                raise DeviceError(f"{config_label(cfg)} on {shape.describe()}: {_short(e)}") from e
            failed[config_label(cfg)] = _short(e)
    if heur not in timings:
        return None, f"heuristic config {config_label(heur)} failed: {failed.get(config_label(heur), '?')}"
    best = min(timings, key=lambda c: (timings[c][0], c != heur))
    if timings[best][0] > timings[heur][0] * (1.0 - min_gain):
        best = heur
    entry = {
        "config": best.as_dict(),
        "heuristic": heur.as_dict(),
        "time_ms": timings[best][0],
        "time_p20_p80_ms": [timings[best][1], timings[best][2]],
        "heuristic_time_ms": timings[heur][0],
        "heuristic_p20_p80_ms": [timings[heur][1], timings[heur][2]],
        "speedup": timings[heur][0] / timings[best][0] if timings[best][0] > 0 else 1.0,
        "timed": len(timings),
        "failed": failed,
        "problem": shape.problem(),
        "elapsed_s": round(time.monotonic() - t0, 3),
    }
    return entry, ""


@dataclass
class RunSummary:
    tuned: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    already_done: int = 0
    stopped_early: bool = False
    complete: bool = False
    error: str = ""


def run_plan(
    plan: Plan,
    bench: BenchLike,
    store: ResultStore,
    *,
    min_gain: float = MIN_GAIN,
    time_limit_s: Optional[float] = None,
    retry_skipped: bool = False,
    use_tqdm: bool = True,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Tunes every entry of ``plan`` not yet in ``store``; saves after each entry."""
    summary = RunSummary()
    done = store.done(retry_skipped)
    entries = plan.entries()
    summary.already_done = sum(1 for s, k in entries if s.key(k).to_str() in done)
    if summary.already_done:
        log(f"[autotune] resuming: {summary.already_done}/{len(entries)} entries already in {store.path}")
    progress = make_progress(len(entries), summary.already_done, use_tqdm)
    start, opened = time.monotonic(), 0
    try:
        for shape in plan.shapes:
            pending = [k for k in plan.kernels if shape.key(k).to_str() not in done]
            if not pending:
                continue
            # checked after at least one shape, so that every run makes progress
            if time_limit_s is not None and opened and time.monotonic() - start > time_limit_s:
                summary.stopped_early = True
                log(f"[autotune] time limit of {time_limit_s:.0f}s reached; re-run the same command to continue")
                break
            session = None
            opened += 1
            try:
                session = bench.open(shape)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # out of memory, or inputs the kernels reject
                if _is_sticky(e):
                    raise DeviceError(f"setting up {shape.describe()}: {_short(e)}") from e
                for kernel in pending:
                    key = shape.key(kernel).to_str()
                    store.skip(key, f"inputs of {shape.describe()}: {_short(e)}")
                    summary.skipped.append(key)
                    progress.update(1, f"skipped {kernel} {shape.describe()}")
                bench.release(None)
                continue
            try:
                for kernel in pending:
                    key = shape.key(kernel).to_str()
                    entry, reason = tune_entry(session, shape, kernel, plan.candidates(shape, kernel), min_gain)
                    if entry is None:
                        store.skip(key, reason)
                        summary.skipped.append(key)
                    else:
                        entry["problem"]["plan"] = plan.name
                        store.add(key, entry)
                        summary.tuned.append(key)
                    progress.update(1, f"{kernel} {shape.describe()}")
            finally:
                bench.release(session)
    except KeyboardInterrupt:
        summary.stopped_early = True
        log(f"\n[autotune] interrupted; results so far are in {store.path}; re-run the same command to continue")
    except DeviceError as e:
        summary.stopped_early, summary.error = True, str(e)
        log(
            f"\n[autotune] the GPU reported an unrecoverable error ({e}); results so far are in {store.path}. "
            "Re-run the same command to continue (a fresh process gets a fresh CUDA context); if the same "
            "candidate fails again, exclude its shape (e.g. --windows) and report it."
        )
    finally:
        progress.close()
    done = store.done(retry_skipped=False)
    summary.complete = all(s.key(k).to_str() in done for s, k in entries)
    store.metadata["complete"] = summary.complete
    store.save()
    return summary
