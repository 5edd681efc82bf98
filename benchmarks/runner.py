"""Runs one workload (a provider on one shape): warm-up, peak memory, then timing, per pass.

Every failure is recorded, never hidden: out of memory as ``OOM``, a provider that cannot run a case
as ``unsupported: <why>``, anything else as ``error: <type>: <message>``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo

from .timing import TimingConfig, is_oom, measure_peak, sync, time_fn

__all__ = ["PASSES", "Unsupported", "Workload", "run_workload", "failure_status", "Deadline"]

PASSES = ("fwd", "bwd", "fwd+bwd")
MAX_INPUT_SETS = 4


class Unsupported(Exception):
    """A provider cannot run this case; the message says why and goes into the results."""


class Deadline:
    """A wall-clock budget for a whole run: once spent, the remaining measurements are skipped."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


@dataclass
class Workload:
    """What one provider runs on one shape.

    ``make_inputs`` draws a fresh set of random leaf tensors (those that receive gradients have
    ``requires_grad``); ``forward(*inputs)`` returns the one output tensor. ``params`` are tensors shared
    by every input set that also receive gradients (module parameters). ``memory_forward`` replaces
    ``forward`` for the memory run (a compiled twin without CUDA graphs, whose pool would hide the peak).
    ``mark_step`` marks a new iteration for CUDA-graph trees before every forward; ``compiled`` asks for
    a second warm-up call (the first one compiles); ``rotate`` off keeps one input set; ``fallback``
    builds the workload to use instead when this one fails its warm-up (other than out of memory).
    """

    make_inputs: Callable[[], List[torch.Tensor]]
    forward: Callable[..., torch.Tensor]
    params: Sequence[torch.Tensor] = ()
    passes: Tuple[str, ...] = PASSES
    memory_forward: Optional[Callable[..., torch.Tensor]] = None
    measure_memory: bool = True
    mark_step: bool = False
    compiled: bool = False
    rotate: bool = True
    fallback: Optional[Callable[[], Workload]] = None
    notes: List[str] = field(default_factory=list)
    context: Optional[Callable[[], ContextManager]] = None  # entered around all of its runs


def failure_status(exc: BaseException) -> str:
    """The status recorded for a failed measurement."""
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    if is_oom(exc):
        return "OOM"
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"error: {type(exc).__name__}: {msg}"


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_workload(
    build: Callable[[], Workload],
    device: torch.device,
    cfg: TimingConfig,
    deadline: Deadline,
    l2_bytes: Optional[int] = None,
) -> Tuple[Dict[str, dict], List[str]]:
    """Measures every pass of the workload ``build()`` makes; returns ``({pass: result}, notes)``.

    A result holds ``status`` and, where measured, ``p50_ms``, ``p20_ms``, ``p80_ms``, ``peak_mb``,
    ``extra_mb``. Memory is measured in its own runs, before the timing runs.
    """
    try:
        wl = build()
    except Exception as e:  # Unsupported, or the provider's constructor failed
        return {p: {"status": failure_status(e)} for p in PASSES}, []
    with wl.context() if wl.context is not None else contextlib.nullcontext():
        return _measure(wl, device, cfg, deadline, l2_bytes)


def _measure(
    wl: Workload, device: torch.device, cfg: TimingConfig, deadline: Deadline, l2_bytes: Optional[int]
) -> Tuple[Dict[str, dict], List[str]]:
    notes: List[str] = list(wl.notes)
    results: Dict[str, dict] = {p: {} for p in wl.passes}
    if deadline.spent():
        return {p: {"status": "skipped: time budget spent"} for p in wl.passes}, notes
    needs_grad = any(p != "fwd" for p in wl.passes)
    sets: List[List[torch.Tensor]] = []
    grad_out: Optional[torch.Tensor] = None
    mark = torch.compiler.cudagraph_mark_step_begin if wl.mark_step else (lambda: None)

    def call(fwd: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        mark()
        if needs_grad:
            return fwd(*inputs)
        with torch.no_grad():
            return fwd(*inputs)

    failed: Dict[str, str] = {}  # passes that cannot run (e.g. the backward is out of memory)
    try:
        sets.append(wl.make_inputs())
        # Warm-up: compilation, autotuning, allocator growth (CUDA-graph trees record on a later call);
        # the last call is the time estimate.
        for _ in range(3 if wl.mark_step else 2 if device.type == "cuda" or wl.compiled else 1):
            t0 = time.perf_counter()
            out = call(wl.forward, sets[0])
            if needs_grad and not failed:
                if grad_out is None:
                    grad_out = torch.randn_like(out)
                try:
                    out.backward(grad_out)
                except Exception as e:  # the forward alone may still fit
                    status = failure_status(e)
                    failed.update({p: status for p in wl.passes if p != "fwd"})
            del out
            sync(device)
            estimate_ms = (time.perf_counter() - t0) * 1e3
    except Exception as e:
        status = failure_status(e)
        sets.clear()
        _cleanup(device)
        if wl.fallback is not None and not is_oom(e):
            torch._dynamo.reset()
            results, more = run_workload(wl.fallback, device, cfg, deadline, l2_bytes)
            return results, [f"fell back after: {status}"] + more
        return {p: {"status": status} for p in wl.passes}, notes
    for p, status in failed.items():
        results[p]["status"] = status
    todo = [p for p in wl.passes if p not in failed]
    params = [p for p in wl.params if p.requires_grad]
    leaves = [t for t in sets[0] if t.requires_grad] + params

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    clear_grads()
    _cleanup(device)

    # ---- peak memory (its own runs, before the timing, with one input set alive)
    if device.type == "cuda" and wl.measure_memory:
        mem_fwd = wl.memory_forward or wl.forward
        runs = {
            "fwd": (lambda: None, lambda _: call(mem_fwd, sets[0])),
            "bwd": (lambda: call(mem_fwd, sets[0]), lambda out: out.backward(grad_out)),
            "fwd+bwd": (lambda: None, lambda _: call(mem_fwd, sets[0]).backward(grad_out)),
        }
        try:
            if wl.memory_forward is not None:  # warm the twin so its compilation stays out of the peak
                out = call(mem_fwd, sets[0])
                if needs_grad and "fwd+bwd" in todo:
                    out.backward(grad_out)
                del out
        except Exception as e:
            for p in todo:
                results[p]["mem_status"] = f"memory {failure_status(e)}"
        for p in todo:
            if "mem_status" in results[p]:
                continue
            clear_grads()
            try:
                peak, extra = measure_peak(*runs[p], device)
                results[p].update(peak_mb=peak / 2**20, extra_mb=extra / 2**20)
            except Exception as e:
                results[p]["mem_status"] = f"memory {failure_status(e)}"
            clear_grads()
            _cleanup(device)
    elif wl.measure_memory:
        notes.append("memory: n/a on CPU")

    # ---- more input sets for the timing
    if device.type == "cuda" and l2_bytes and wl.rotate:
        # Rotate input sets whose total exceeds twice the L2, so no repetition reads cached inputs
        # (do_bench also flushes the L2 before each repetition).
        n_sets = min(MAX_INPUT_SETS, max(1, math.ceil(2 * l2_bytes / max(1, _nbytes(sets[0])))))
        try:
            sets.extend(wl.make_inputs() for _ in range(n_sets - 1))
        except Exception as e:  # no room for more: time on what there is
            notes.append(f"extra input sets not allocated ({failure_status(e)})")
        if len(sets) > 1:
            notes.append(f"{len(sets)} input sets rotated")
    leaves = [t for s_ in sets for t in s_ if t.requires_grad] + params

    # ---- timing
    counter = [0]

    def next_set() -> Sequence[torch.Tensor]:
        counter[0] = (counter[0] + 1) % len(sets)
        return sets[counter[0]]

    for p in todo:
        if deadline.spent():
            results[p]["status"] = "skipped: time budget spent"
            continue
        try:
            clear_grads()
            setup = None
            if p == "fwd":
                fn = lambda: call(wl.forward, next_set())  # noqa: E731
            elif p == "bwd":  # each repetition's own forward is enqueued untimed, before the start event
                setup = lambda: call(wl.forward, next_set())  # noqa: E731
                fn = lambda out: out.backward(grad_out)  # noqa: E731
            else:
                fn = lambda: call(wl.forward, next_set()).backward(grad_out)  # noqa: E731
            p50, p20, p80 = time_fn(
                fn, device, cfg, grad_to_none=leaves if needs_grad else None, estimate_ms=estimate_ms, setup=setup
            )
            results[p].update(status="ok", p50_ms=p50, p20_ms=p20, p80_ms=p80)
        except Exception as e:
            results[p]["status"] = failure_status(e)
        finally:
            setup = fn = None
            clear_grads()
    for r in results.values():
        mem = r.pop("mem_status", None)
        if mem:
            r["mem_note"] = mem
    sets.clear()
    grad_out = None
    _cleanup(device)
    return results, notes
