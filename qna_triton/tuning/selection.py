"""Which configuration and algorithm run: :func:`select_config`, the one place that decides.

The launchers ask :func:`get_config` (inside the opaque custom op, so never inside a traced graph),
which reads the facts off the tensors and calls :func:`select_config`; the autotuner asks
:func:`select_config` for the reference it measures every candidate against. The order of the
decision:

1. a forced algorithm (:func:`kernel_algorithm`, else ``QNA_TRITON_ALGO``) for kernels with a banded
   form: ``banded`` gives :func:`~.heuristics.banded_config` (on a GPU from sm_80; the interpreter
   too), ``direct`` turns a banded choice below into the direct :func:`~.heuristics.heuristic_config`;
2. the tuned entry for the GPU (:func:`~.lookup.tuned_config`), on devices whose kernels are
   compiled (CPU tensors run the interpreter, where speed is meaningless, so they never look);
3. else :func:`~.heuristics.default_config` (the banded form where it pays and the GPU's entry in
   the target table, :mod:`.targets`, allows it).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..layout import default_padding, output_size
from .config import ALGOS, KernelConfig, has_banded_form
from .heuristics import BANDED_MIN_CAPABILITY, banded_config, banded_pays, default_config, heuristic_config
from .lookup import tuned_config
from .targets import GPUArch, device_target, is_rocm, target_for_capability, target_named

ALGO_ENV = "QNA_TRITON_ALGO"
# Devices whose kernels are compiled: tuned tables apply.
_TUNED_DEVICE_TYPES = ("cuda",)
_TORCH_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

_algo_forced: Optional[str] = None


@contextlib.contextmanager
def kernel_algorithm(algo: str) -> Iterator[None]:
    """Within the block, every kernel with a banded form (``has_banded_form``: the forward, the
    backward's delta and, at stride 1, the main backward kernel) runs ``algo`` (``"direct"``,
    ``"banded"`` or ``"auto"``) whatever ``QNA_TRITON_ALGO`` says: e.g. to compare the two algorithms
    in one process."""
    global _algo_forced
    if algo not in ("auto",) + ALGOS:
        raise ValueError(f"algo must be one of auto, direct, banded; got {algo!r}")
    previous, _algo_forced = _algo_forced, algo
    try:
        yield
    finally:
        _algo_forced = previous


def forced_algorithm() -> Optional[str]:
    """The algorithm :func:`kernel_algorithm` forces now (None outside its block)."""
    return _algo_forced


def _algo_override() -> str:
    """:func:`kernel_algorithm` if active, else ``QNA_TRITON_ALGO``: ``auto`` (default: the tuned
    entry, else the heuristic), ``direct`` or ``banded`` (forces the algorithm of every kernel with a
    banded form, on any device; the interpreter included)."""
    if _algo_forced is not None:
        return _algo_forced
    value = os.environ.get(ALGO_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto",) + ALGOS:
        raise ValueError(f"{ALGO_ENV} must be one of auto, direct, banded; got {value!r}")
    return value


@dataclass(frozen=True)
class Target:
    """The device a kernel runs on, as far as the choice depends on it, read when first needed: the
    device whose GPU name finds its tuned file (``tuned_index``; None: no tuned file applies), and the
    GPU whose architecture (:mod:`.targets`) says which banded kernels the heuristic may take
    (``cuda_index``, or a ``known_arch`` such as ``"gfx942"``, or a ``known_capability``; none of them:
    none, e.g. the interpreter)."""

    tuned_index: Optional[int] = None
    cuda_index: Optional[int] = None
    known_capability: Optional[Tuple[int, int]] = None
    known_arch: Optional[str] = None

    def gpu_name(self) -> Optional[str]:
        return None if self.tuned_index is None else _gpu_name(self.tuned_index)

    def capability(self) -> Optional[Tuple[int, int]]:
        """The CUDA compute capability (None for an AMD target: a ROCm build's is not one)."""
        if self.known_arch is not None:
            return target_named(self.known_arch).capability
        if self.known_capability is not None:
            return tuple(self.known_capability)
        if self.cuda_index is None or is_rocm():
            return None
        return _capability(self.cuda_index)

    def arch(self) -> Optional[GPUArch]:
        """The table's entry for this device (None: outside the table, or no GPU)."""
        if self.known_arch is not None:
            return target_named(self.known_arch)
        if self.known_capability is None and self.cuda_index is not None and is_rocm():
            return device_target(self.cuda_index)
        cap = self.capability()
        return None if cap is None else target_for_capability(cap)

    def describe(self) -> str:
        """The target's name for messages: ``sm_90``, ``gfx942``, ``sm_75``, or ``cpu``."""
        arch = self.arch()
        if arch is not None and (arch.vendor == "amd" or arch.capability == self.capability()):
            return arch.name
        cap = self.capability()
        return f"sm_{cap[0]}{cap[1]}" if cap is not None else ("rocm" if self.cuda_index is not None else "cpu")


def select_config(
    kernel: str,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    n_queries: int,
    ks: Tuple[int, int],
    st: Tuple[int, int],
    pixels: int,
    target: Target,
    algo: Optional[str] = None,
) -> KernelConfig:
    """The configuration ``kernel`` runs with on ``target`` for this problem (``pixels`` output pixels
    ``B * H_out * W_out``), by the order of the module docstring; ``algo`` defaults to the forced one
    (:func:`kernel_algorithm` / ``QNA_TRITON_ALGO``). Only speed depends on the answer: every config
    computes the same result up to float rounding."""
    banded_form = has_banded_form(kernel, st)
    algo = (_algo_override() if algo is None else algo) if banded_form else "direct"
    if algo == "banded":
        cap = target.capability()
        if cap is not None and cap < BANDED_MIN_CAPABILITY:
            raise RuntimeError(
                f"the banded kernels ({ALGO_ENV} / kernel_algorithm) need bf16/tf32 tensor "
                f"cores (sm_80 or later); this GPU is sm_{cap[0]}{cap[1]}"
            )
        return banded_config(ks, head_dim, dtype, st, kernel)
    cfg = None
    if target.tuned_index is not None:
        cfg, _ = tuned_config(
            kernel, target.gpu_name(), _TORCH_DTYPE_NAMES.get(dtype, ""), heads, head_dim, n_queries, ks, st, pixels
        )
    if cfg is None:
        # the architecture (a CUDA query) is asked only where the banded form would pay
        arch = target.arch() if banded_pays(kernel, head_dim, ks, st, dtype) else None
        cfg = default_config(kernel, heads, head_dim, ks, st, dtype, arch)
    if algo == "direct" and cfg.algo == "banded":
        return heuristic_config(kernel, heads, head_dim)
    return cfg


def target_of(device: torch.device) -> Target:
    """The :class:`Target` of tensors on ``device``."""
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    return Target(index if device.type in _TUNED_DEVICE_TYPES else None, index if cuda else None)


def get_config(
    kernel: str,
    logits: torch.Tensor,
    values: torch.Tensor,
    ks: Tuple[int, int],
    st: Tuple[int, int],
    pd: Optional[Tuple[int, int]] = None,
) -> KernelConfig:
    """:func:`select_config` for ``kernel`` on this problem (``logits [B,H,W,N,h]``, ``values
    [B,H,W,h,d]``, on their device). ``pd`` is the padding; None takes the default one."""
    B, H, W, N, heads = logits.shape
    pd = default_padding(ks) if pd is None else pd
    pixels = B * output_size(H, ks[0], st[0], pd[0]) * output_size(W, ks[1], st[1], pd[1])
    return select_config(kernel, logits.dtype, heads, values.shape[4], N, ks, st, pixels, target_of(logits.device))


def _heuristic_for(
    kernel: str,
    heads: int,
    head_dim: int,
    ks: Tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    st: Tuple[int, int] = (1, 1),
) -> KernelConfig:
    """What :func:`select_config` gives on ``device`` without a tuned entry and without a forced
    algorithm."""
    target = Target(cuda_index=target_of(device).cuda_index)
    return select_config(kernel, dtype, heads, head_dim, 1, ks, st, 1, target, algo="auto")


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


CACHES = (_gpu_name, _capability, device_target)
