"""Measuring candidates on the GPU: random inputs per shape, one kernel per timing, a check that each
candidate computes what the heuristic config computes.

``Bench.open(shape)`` gives a :class:`Session` with ``check(kernel, config)`` (None when the result
matches the heuristic config's within float rounding, else the reason) and ``time(kernel, config)``
(median, 20th and 80th percentile in ms, by ``triton.testing.do_bench`` with warm-up; the L2 cache is
flushed before every call). The tuner only uses this interface, so tests inject a fake one.

Everything runs through the library's launchers (``qna_forward``, and ``backward_launches``, the
launches ``qna_backward`` runs, with explicit ``config`` / ``delta_config``), so what is checked and
timed is what the library runs. ``bwd_delta`` and ``bwd`` are timed alone: the one launch of the
backward's pair is repeated (``bwd`` with its partial-sum rows zeroed by the launch and reduced after,
as the launcher does), so the other backward kernel does not dilute the difference between candidates.
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.testing

from qna_triton.env import capture_environment
from qna_triton.kernels import BackwardLaunches, backward_launches, qna_forward
from qna_triton.layout import split_packed
from qna_triton.reference import RESULT_TOLERANCE
from qna_triton.tuning import KernelConfig, heuristic_config

from .plan import REP_MS, WARMUP_MS, Shape

Timing = Tuple[float, float, float]  # median, p20, p80 in ms

# Largest |a - b| / max|b| between two configs' results. Results stored in a 16-bit input dtype may
# differ by its rounding (RESULT_TOLERANCE). Float32 results (lse, drpb, dscale; every result of float32
# inputs) differ by reordering, here over whole tensors and a batch of partial-sum rows, and those of
# 16-bit inputs also by the banded kernels' operand precision (tf32 denominators in the bfloat16
# forward, ~2^-16 split products in the delta), still far below what a wrong result gives.
FP32_TOLERANCE = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-3}


def _compare(
    got: Sequence[Optional[torch.Tensor]],
    ref: Sequence[Optional[torch.Tensor]],
    dtype: str,
    names: Sequence[str],
    chunk: int = 1 << 24,
) -> Optional[str]:
    """None when every ``got`` matches ``ref`` (same non-finite values, and a largest difference within
    the tolerance relative to ``ref``'s largest finite magnitude), else what differs. Works through
    ``chunk`` elements at a time, so checking a large problem needs little extra device memory."""
    for name, a, b in zip(names, got, ref):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return f"{name}: shape {None if a is None else tuple(a.shape)} vs {None if b is None else tuple(b.shape)}"
        fa, fb = a.reshape(-1), b.reshape(-1)
        diff, scale = 0.0, 0.0
        for i in range(0, fb.numel(), chunk):
            x, y = fa[i : i + chunk].double(), fb[i : i + chunk].double()
            fin = torch.isfinite(y)
            if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin], y[~fin]):
                return f"{name}: non-finite values differ"
            if fin.any():
                diff = max(diff, (x[fin] - y[fin]).abs().max().item())
                scale = max(scale, y[fin].abs().max().item())
        err = diff / max(scale, 1e-30)
        tol = FP32_TOLERANCE[dtype] if a.dtype == torch.float32 else RESULT_TOLERANCE[a.dtype]
        if not err <= tol:
            return f"{name}: relative error {err:.3g} > {tol:g}"
    return None


class Session:
    """Random inputs of one shape on a device, the heuristic configs' results, and the launchers."""

    def __init__(
        self, shape: Shape, device: str = "cuda", seed: int = 0, warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS
    ) -> None:
        self.shape, self.device = shape, torch.device(device)
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        s = shape
        dtype = getattr(torch, s.dtype)
        g = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*size: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
            # drawn on the device: a large problem's inputs would take seconds on the host
            return (scale * torch.randn(*size, generator=g, device=self.device)).to(dt)

        N, h, d = s.n_queries, s.heads, s.head_dim
        K = s.kh * s.kw
        # logits and values as views of one projection output, exactly as the QnA layer passes them
        qv = randn(s.batch, s.height, s.width, N * h + h * d)
        qv[..., : N * h] *= 2.0
        qv = qv.to(dtype)
        self.logits, self.values = split_packed(qv, torch.empty(K, N, h, device="meta"))
        self.rpb = randn(K, N, h, scale=0.5)
        self.scale = randn(K, N, h, scale=0.5)
        self.geometry = ((s.kh, s.kw), (s.sh, s.sw), (s.ph, s.pw))
        ho, wo = s.out_hw
        self.grad_out = randn(s.batch, ho, wo, h, d, dt=dtype)
        self.heuristic = {k: heuristic_config(k, h, d) for k in ("fwd", "bwd_delta", "bwd")}
        self.ref_fwd = qna_forward(
            self.logits, self.values, self.rpb, self.scale, *self.geometry, config=self.heuristic["fwd"]
        )
        self.lse = self.ref_fwd[1]
        self.ref_bwd = self._backward(self.heuristic["bwd"], self.heuristic["bwd_delta"])
        # the replay of the candidate checked last (one at a time: each holds its launch's buffers)
        self._last: Optional[Tuple[Tuple[str, KernelConfig], Callable[[], object]]] = None

    # ------------------------------------------------------------------------------ launches
    def _backward_launches(self, cfg: KernelConfig, dcfg: KernelConfig) -> BackwardLaunches:
        return backward_launches(
            self.grad_out,
            self.logits,
            self.values,
            self.rpb,
            self.scale,
            self.lse,
            *self.geometry,
            config=cfg,
            delta_config=dcfg,
        )

    def _backward(self, cfg: KernelConfig, dcfg: KernelConfig):
        return self._backward_launches(cfg, dcfg).run()

    def _prepare(self, kernel: str, cfg: KernelConfig) -> Tuple[Callable[[], object], Tuple]:
        """Runs ``kernel`` with ``cfg`` through the library's launchers; returns a function that repeats
        just that kernel's launch (what is timed) and the launcher's results (what is checked)."""
        if kernel == "fwd":

            def fn():
                return qna_forward(self.logits, self.values, self.rpb, self.scale, *self.geometry, config=cfg)

            return fn, fn()
        if kernel == "bwd_delta":
            launches = self._backward_launches(self.heuristic["bwd"], cfg)
            return launches.delta, launches.run()
        launches = self._backward_launches(cfg, self.heuristic["bwd_delta"])

        def main() -> None:
            launches.main()
            launches.reduce()

        return main, launches.run()

    def check(self, kernel: str, cfg: KernelConfig) -> Optional[str]:
        """None when ``cfg`` gives the heuristic config's results within float rounding."""
        self._last = None  # frees the previous candidate's buffers first
        fn, got = self._prepare(kernel, cfg)
        self._last = ((kernel, cfg), fn)
        if kernel == "fwd":
            return _compare(got, self.ref_fwd, self.shape.dtype, ("out", "lse"))
        return _compare(got, self.ref_bwd, self.shape.dtype, ("dlogits", "dvalues", "drpb", "dscale"))

    def launch(self, kernel: str, cfg: KernelConfig) -> None:
        """One launch of the single kernel ``kernel`` with ``cfg`` (what :meth:`time` times)."""
        if self._last is None or self._last[0] != (kernel, cfg):
            self._last = None
            self._last = ((kernel, cfg), self._prepare(kernel, cfg)[0])
        self._last[1]()

    def time(self, kernel: str, cfg: KernelConfig) -> Timing:
        """Median, 20th and 80th percentile of one launch, in ms."""
        q = triton.testing.do_bench(
            lambda: self.launch(kernel, cfg), warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return float(q[0]), float(q[1]), float(q[2])

    def close(self) -> None:
        self._last = None
        for name in ("logits", "values", "rpb", "scale", "grad_out", "ref_fwd", "lse", "ref_bwd"):
            self.__dict__.pop(name, None)


class Bench:
    """Sessions on the current CUDA device."""

    def __init__(
        self, device: str = "cuda", warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS, memory_fraction: float = 0.6
    ) -> None:
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.memory_fraction = memory_fraction

    def device_info(self) -> Dict[str, object]:
        env = capture_environment(self.device)
        return {
            "gpu_name": env.device_name,
            "compute_capability": env.capability,
            "multiprocessors": env.multiprocessors,
            "memory_gib": round(env.memory_bytes / 2**30, 1),
            "cuda_version": env.cuda,
        }

    def open(self, shape: Shape) -> Session:
        """A session for ``shape``; MemoryError when its tensors would not fit comfortably."""
        free, _ = torch.cuda.mem_get_info(self.device)
        need = shape.input_bytes()
        if need > self.memory_fraction * free:
            raise MemoryError(f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return Session(shape, self.device, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)

    def release(self, session: Optional[Session]) -> None:
        if session is not None:
            session.close()
        gc.collect()
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a broken context: the tuner reports the original error
            pass
