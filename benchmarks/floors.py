"""The two floors of the QnA forward (derived in ``docs/backward.md``, "Floors"): bytes that must move and
arithmetic that must be done, and the rates they are divided by."""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = [
    "LSE_BYTES",
    "forward_bytes_per_pixel",
    "forward_bytes",
    "forward_flops_per_pixel",
    "forward_flops",
    "datasheet_fp32_rate",
]

LSE_BYTES = 4  # the saved log-sum-exp is float32 whatever the input dtype


def forward_bytes_per_pixel(n_queries: int, heads: int, channels: int, elem_bytes: int) -> int:
    """Bytes per pixel at stride 1: logits ``e·N·h`` + values ``e·C`` + output ``e·C`` + LSE ``4·N·h``.

    Each input read once and each output written once; bf16 (``e = 2``) gives the notes' formula.
    """
    return elem_bytes * n_queries * heads + 2 * elem_bytes * channels + LSE_BYTES * n_queries * heads


def forward_bytes(
    batch: int,
    in_hw: Tuple[int, int],
    out_hw: Tuple[int, int],
    n_queries: int,
    heads: int,
    channels: int,
    elem_bytes: int,
) -> int:
    """Bytes the forward must move: inputs per input pixel, output and LSE per output pixel."""
    in_px = batch * in_hw[0] * in_hw[1]
    out_px = batch * out_hw[0] * out_hw[1]
    per_in = elem_bytes * (n_queries * heads + channels)
    per_out = elem_bytes * channels + LSE_BYTES * n_queries * heads
    return in_px * per_in + out_px * per_out


def forward_flops_per_pixel(kh: int, kw: int, heads: int, n_queries: int, head_dim: int) -> int:
    """``k_h·k_w·h·N·(2d + 3)``: per (offset, query, head) an exp-add, a scale and ``d`` multiply-adds."""
    return kh * kw * heads * n_queries * (2 * head_dim + 3)


def forward_flops(
    batch: int, out_hw: Tuple[int, int], kh: int, kw: int, heads: int, n_queries: int, head_dim: int
) -> int:
    """Arithmetic of the direct algorithm over every output pixel."""
    return batch * out_hw[0] * out_hw[1] * forward_flops_per_pixel(kh, kw, heads, n_queries, head_dim)


# float32 CUDA-core rates from the vendors' datasheets (dense, boost clock), by a substring of the
# device name. H100 and H200 SXM share the GH100 chip and clocks.
_DATASHEET_FP32 = (
    ("H100 PCIe", 51.2e12, "NVIDIA H100 PCIe datasheet: 51 TFLOP/s FP32"),
    ("H100", 67.0e12, "NVIDIA H100 SXM datasheet: 67 TFLOP/s FP32"),
    ("H200", 67.0e12, "NVIDIA H200 SXM datasheet: 67 TFLOP/s FP32"),
)


def datasheet_fp32_rate(gpu_name: str) -> Optional[Tuple[float, str]]:
    """``(FLOP/s, source)`` of the float32 CUDA-core rate for a known GPU, else None."""
    for key, rate, source in _DATASHEET_FP32:
        if key.lower() in gpu_name.lower():
            return rate, source
    return None
