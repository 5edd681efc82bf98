"""Timing and peak memory of one callable.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, median and the
20th/80th percentiles). CPU (smoke runs only): ``time.perf_counter`` around each call, same quantiles;
no memory figures.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["TimingConfig", "QUANTILES", "time_fn", "measure_peak", "is_oom", "sync"]

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class TimingConfig:
    """``warmup_ms``/``rep_ms``: do_bench's budgets; ``min_reps``: the repetition budget grows (up to
    ``max_rep_ms``) so that at least this many timed calls make the quantiles; ``cpu_reps``: timed calls
    on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_rep_ms: float = 3000.0
    cpu_warmup: int = 1
    cpu_reps: int = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def _quantiles(times_ms: List[float]) -> Tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    cuts = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles: 20 % is cuts[1]
    return statistics.median(times_ms), cuts[1], cuts[7]


def time_fn(
    fn: Callable[..., None],
    device: torch.device,
    cfg: TimingConfig,
    grad_to_none: Optional[Sequence[torch.Tensor]] = None,
    estimate_ms: Optional[float] = None,
    setup: Optional[Callable[[], object]] = None,
) -> Tuple[float, float, float]:
    """``(p50, p20, p80)`` in milliseconds. ``fn`` must already be warm (compiled, autotuned).

    With ``setup``, each repetition calls ``fn(setup())`` and only ``fn`` is timed (a backward after
    its own forward: no retained graph, which compiled backwards with donated buffers refuse).
    """
    if device.type == "cuda" and setup is None:
        from triton.testing import do_bench

        rep = cfg.rep_ms
        if estimate_ms is not None:
            rep = min(max(rep, cfg.min_reps * estimate_ms), cfg.max_rep_ms)
        p50, p20, p80 = do_bench(
            fn, warmup=cfg.warmup_ms, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return float(p50), float(p20), float(p80)
    if device.type == "cuda":
        return _time_with_setup_cuda(fn, setup, device, cfg, grad_to_none, estimate_ms)
    call = (lambda: fn(setup())) if setup is not None else fn
    for _ in range(cfg.cpu_warmup):
        _clear_grads(grad_to_none)
        call()
    times = []
    for _ in range(max(1, cfg.cpu_reps)):
        _clear_grads(grad_to_none)
        state = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(state) if setup is not None else fn()
        times.append((time.perf_counter() - t0) * 1e3)
        del state
    return _quantiles(times)


L2_FLUSH_BYTES = 256 << 20  # as do_bench: larger than any L2 of these GPUs


def _time_with_setup_cuda(fn, setup, device, cfg, grad_to_none, estimate_ms) -> Tuple[float, float, float]:
    """do_bench's method (L2 flushed before each repetition, CUDA events) with an untimed ``setup``
    enqueued before the start event of every repetition."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    est = estimate_ms if estimate_ms else 1.0
    n_warm = max(1, int(cfg.warmup_ms / est))
    n_rep = max(cfg.min_reps, int(cfg.rep_ms / est))
    n_rep = max(1, min(n_rep, int(cfg.max_rep_ms / est)))
    for _ in range(n_warm):
        _clear_grads(grad_to_none)
        fn(setup())
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _clear_grads(grad_to_none)
        state = setup()
        flush.zero_()
        starts[i].record()
        fn(state)
        ends[i].record()
        del state
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure_peak(setup: Callable[[], object], run: Callable[[object], None], device: torch.device) -> Tuple[int, int]:
    """``(peak_total, extra)`` bytes of ``run(setup())``: the allocator's peak during ``run`` and that
    peak less what was allocated before ``setup`` (the inputs' own memory). What ``setup`` keeps alive
    (a forward's saved tensors, for a backward) counts in ``extra``; its own transient peak does not."""
    gc.collect()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    state = setup()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(state)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del state
    return int(peak), int(peak - base)


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, also when a compiler or a library wrapped the error."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemory" in text
