"""The ceilings, measured on the device: copy bandwidth, the float32 CUDA-core FMA rate and the bf16
matrix-product rate."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .timing import TimingConfig, time_fn

__all__ = ["fma_chain", "fma_flops", "measure_fp32_rate", "measure_copy_bandwidth", "measure_matmul_rate", "FMA_CHAINS"]

FMA_CHAINS = 8  # independent chains per element: enough instruction-level parallelism to fill the pipes


@triton.jit
def _fma_kernel(x_ptr, out_ptr, a, b, n_iter, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x0 = tl.load(x_ptr + offs)
    x1 = x0 + 1.0
    x2 = x0 + 2.0
    x3 = x0 + 3.0
    x4 = x0 + 4.0
    x5 = x0 + 5.0
    x6 = x0 + 6.0
    x7 = x0 + 7.0
    for _ in range(n_iter):
        x0 = tl.fma(x0, a, b)
        x1 = tl.fma(x1, a, b)
        x2 = tl.fma(x2, a, b)
        x3 = tl.fma(x3, a, b)
        x4 = tl.fma(x4, a, b)
        x5 = tl.fma(x5, a, b)
        x6 = tl.fma(x6, a, b)
        x7 = tl.fma(x7, a, b)
    tl.store(out_ptr + offs, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)))


def fma_chain(x: torch.Tensor, a: float, b: float, n_iter: int, block: int = 1024) -> torch.Tensor:
    """Per element: 8 chains ``x + c`` (c = 0..7) each iterated ``n_iter`` times through ``x*a + b``,
    summed. ``x`` is float32 with a multiple of ``block`` elements."""
    if x.dtype != torch.float32 or x.numel() % block:
        raise ValueError("x must be float32 with a multiple of `block` elements")
    out = torch.empty_like(x)
    _fma_kernel[(x.numel() // block,)](x, out, a, b, n_iter, BLOCK=block, num_warps=4)
    return out


def fma_flops(n_elements: int, n_iter: int) -> int:
    """Two FLOP per FMA, ``FMA_CHAINS`` FMAs per element and iteration."""
    return 2 * FMA_CHAINS * n_elements * n_iter


def measure_fp32_rate(device: torch.device, cfg: TimingConfig, n_iter: int = 4096) -> Tuple[float, float]:
    """``(FLOP/s, p50 ms)`` of the FMA chains over 16 programs per multiprocessor."""
    block = 1024
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    x = torch.rand(n_sm * 16 * block, device=device, dtype=torch.float32)
    fma_chain(x, 0.999, 0.001, n_iter, block)  # compile
    p50, _, _ = time_fn(lambda: fma_chain(x, 0.999, 0.001, n_iter, block), device, cfg)
    return fma_flops(x.numel(), n_iter) / (p50 * 1e-3), p50


def measure_copy_bandwidth(device: torch.device, cfg: TimingConfig, nbytes: int = 1 << 30) -> Tuple[float, float]:
    """``(bytes/s counting read + write, p50 ms)`` of a device-to-device copy of ``nbytes``."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), device, cfg)
    return 2 * nbytes / (p50 * 1e-3), p50


def measure_matmul_rate(
    device: torch.device, cfg: TimingConfig, n: int = 8192, dtype: torch.dtype = torch.bfloat16
) -> Tuple[float, float]:
    """``(FLOP/s, p50 ms)`` of an ``n x n`` by ``n x n`` matrix product (``2 n^3`` FLOP) on random data:
    the tensor-core rate the banded kernels' products are bounded by."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    p50, _, _ = time_fn(lambda: torch.mm(a, b, out=out), device, cfg)
    return 2 * n**3 / (p50 * 1e-3), p50
