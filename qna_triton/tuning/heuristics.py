"""The default configurations (no tuned entry), and the thresholds they rest on.

Every threshold below comes from the compiler report of ``python -m qna_triton.kernels.aot --loops``
(registers, spills and machine instructions per window offset of each kernel, compiled for the targets
of ``targets.py`` without a GPU; its plan, ``kernels.aot.default_plan``, compiles the configurations
named here),
not from timings: each is named and explained once, here, with the report's numbers it was read from.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton

from .config import BANDED_KERNELS, KERNELS, KernelConfig, has_banded_form
from .targets import GPUArch

# ------------------------------------------------------------------ direct kernels (CUDA cores)
# float32 elements of the largest per-program tile (pixels x heads x head-dim) at 4 warps: keeps every
# kernel under ~128-240 registers without spills on sm_80/sm_90.
TILE_BUDGET = {"fwd": 1024, "bwd_delta": 1024, "bwd": 512}
# most channels (heads x head-dim) of one pixel in a program
CHANNEL_BUDGET = {"fwd": 128, "bwd_delta": 128, "bwd": 32}
# The main backward kernel on one warp: its per-offset sums over the tile's pixels (drpb, dscale) then
# stay inside the warp, and its [pixels, queries, heads] tiles are not spread over idle threads. By the
# report (sm_90, bf16, 2 queries) 1.3x to 2.8x fewer instructions per (pixel, offset, head) than on 4
# warps at every head shape of docs/kernels.md (16 x 8: DIRECT_BWD_INSTRUCTIONS against 244), with no
# spills; the backward's grid is sized to the programs the SM holds at once, so fewer warps per program
# do not leave a second, partial wave. Not yet timed; the autotuner times 2 and 4 warps next to it.
HEURISTIC_WARPS = {"fwd": 4, "bwd_delta": 4, "bwd": 1}
DIRECT_BWD_INSTRUCTIONS = 135
# Most fp32 elements per thread of tile_footprint() among the autotuner's candidates. ptxas (sm_90,
# bfloat16, head_dim 8/32/64, 1-8 warps): fwd and bwd_delta spilled hundreds of bytes from 40 elements
# per thread on, bwd from 20 on; below, at most a few dozen bytes.
MAX_ELEMS_PER_THREAD = {"fwd": 36.0, "bwd_delta": 36.0, "bwd": 16.0}

# ---------------------------------------------------------------- banded kernels (tensor cores)
# The banded kernels from these window areas up (where the direct algorithm is bound by CUDA-core
# arithmetic, docs/kernels.md), on the targets whose table entry names them (targets.py).
# Forward: 7 x 7 for bfloat16; 11 x 11 for float16/float32, whose float32 operands cost more per product.
# Delta: its products are split into three (float32-accurate sums, see kernels.banded_blocks), so it
# costs about twice the forward per window row and only pays from 11 x 11 (bfloat16) / 15 x 15.
# Main backward kernel (stride 1): by window width instead (banded_bwd_pays), for bfloat16 and float16
# (both take split bfloat16 products) and head dims up to BANDED_BWD_MAX_HEAD_DIM (beyond, and for
# float32's tf32x3 operands, its default tile spills; the autotuner still times it there).
BANDED_MIN_AREA = {
    "fwd": {torch.bfloat16: 49, torch.float16: 121, torch.float32: 121},
    "bwd_delta": {torch.bfloat16: 121, torch.float16: 225, torch.float32: 225},
    "bwd": {torch.bfloat16: 1, torch.float16: 1},  # by window width instead: banded_bwd_pays
}
BANDED_BWD_MAX_HEAD_DIM = 16
# Forcing the banded kernels needs bf16/tf32 tensor cores; which targets the heuristic takes each banded
# kernel on (and from which Triton release) is the target table's (targets.GPUArch.banded).
BANDED_MIN_CAPABILITY = (8, 0)
# The banded main backward kernel's instructions (sm_90, bf16, head dim 8, 16-column tile): per halo
# chunk and window row, per query, and the extra cost from a second chunk on; it must issue at least
# BANDED_BWD_MIN_GAIN times fewer per (pixel, offset, head) than DIRECT_BWD_INSTRUCTIONS to be chosen.
BANDED_BWD_CHUNK_INSTRUCTIONS = 700
BANDED_BWD_EXTRA_CHUNK_INSTRUCTIONS = 50
BANDED_BWD_MIN_GAIN = 1.25
REPORT_QUERIES = 2  # the queries of the report these instruction counts were read from


@functools.lru_cache(maxsize=1024)
def heuristic_config(kernel: str, heads: int, head_dim: int) -> KernelConfig:
    """The direct algorithm's safe default: all heads of a pixel in one program when they fit, pixels
    fill the rest."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    bd = triton.next_power_of_2(head_dim)
    bh = max(1, min(triton.next_power_of_2(heads), CHANNEL_BUDGET[kernel] // bd))
    bp = max(8, min(128, TILE_BUDGET[kernel] // (bh * bd)))
    return KernelConfig(block_p=bp, block_h=bh, num_warps=HEURISTIC_WARPS[kernel], num_stages=1)


def halo_chunk(halo: int) -> int:
    """Columns per chunk of the banded main backward kernel's halo (``block_w + k_w - 1`` output
    columns): 32 (16 for a halo of 16). Not 16 to pad less: by the report a 16-column chunk costs ~80 %
    of a 32-column one (its ``[16, W]`` products leave most of 8 warps idle), so three of them (46
    columns at k = 31) cost more than two of 32; two 32-column chunks unrolled together spill."""
    return 32 if halo > 16 else 16


def banded_bwd_pays(kw: int) -> bool:
    """Whether the banded main backward kernel (its default 16-column tile) issues at least
    ``BANDED_BWD_MIN_GAIN`` times fewer instructions per (pixel, offset, head) than the direct one over
    a window row of ``kw`` offsets: a tie at 11 columns, 1.3x fewer at 13, 1.4x at 15, but less than
    1.25x from 18 to 26 columns, where a second 32-column chunk is mostly padding; so 13 to 17 columns
    and from 27 on (the count does not depend on the window's height)."""
    halo = 16 + kw - 1
    chunks = triton.cdiv(halo, halo_chunk(halo))
    per_row = BANDED_BWD_CHUNK_INSTRUCTIONS * chunks + BANDED_BWD_EXTRA_CHUNK_INSTRUCTIONS * (chunks > 1)
    return REPORT_QUERIES * per_row / kw * BANDED_BWD_MIN_GAIN <= DIRECT_BWD_INSTRUCTIONS


def banded_config(
    window: Tuple[int, int],
    head_dim: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    stride: Tuple[int, int] = (1, 1),
    kernel: str = "fwd",
) -> KernelConfig:
    """The banded kernels' default: 16 x 16 pixels (output pixels; source pixels for the main backward
    kernel) of one head per program, on 4 warps; on 8 once the operands grow (a halo row beyond 32
    pixels, float32 operands for float16/float32 inputs, head dims beyond 32 in the forward and beyond 8
    in the delta, whose split products hold twice the operands; always for the main backward kernel,
    which holds twice the delta's operands), by the report's registers and spills."""
    if not has_banded_form(kernel, stride):
        raise ValueError(
            f"kernel must be one of {BANDED_KERNELS} (those with a banded form; bwd at stride 1 "
            f"only), got {kernel!r} at stride {tuple(stride)}"
        )
    halo = triton.next_power_of_2(15 * int(stride[1]) + int(window[1]))  # (block_w - 1) * s + k
    small = halo <= 32 and head_dim <= {"fwd": 32, "bwd_delta": 8}.get(kernel, 0) and dtype == torch.bfloat16
    return KernelConfig(
        block_p=1, block_h=1, num_warps=4 if small else 8, num_stages=1, algo="banded", block_w=16, block_r=16
    )


def banded_pays(kernel: str, head_dim: int, ks: Tuple[int, int], st: Tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether ``kernel``'s banded form is the default on a GPU with the tensor cores for it: from
    ``BANDED_MIN_AREA`` up (the main backward kernel: where :func:`banded_bwd_pays`, head dims to
    ``BANDED_BWD_MAX_HEAD_DIM``)."""
    return (
        has_banded_form(kernel, st)
        and ks[0] * ks[1] >= BANDED_MIN_AREA[kernel].get(dtype, 1 << 30)
        and (kernel != "bwd" or (head_dim <= BANDED_BWD_MAX_HEAD_DIM and banded_bwd_pays(ks[1])))
    )


def default_config(
    kernel: str,
    heads: int,
    head_dim: int,
    ks: Tuple[int, int],
    st: Tuple[int, int],
    dtype: torch.dtype,
    target: Optional[GPUArch],
) -> KernelConfig:
    """The config used without a tuned entry: :func:`banded_config` where :func:`banded_pays` on a
    ``target`` whose table entry allows ``kernel``'s banded form under the installed Triton
    (:meth:`GPUArch.banded_allowed`; ``target`` None: a GPU outside the table or the interpreter), else
    :func:`heuristic_config`."""
    if (
        target is not None
        and target.banded_allowed(kernel, dtype=dtype)
        and banded_pays(kernel, head_dim, ks, st, dtype)
    ):
        return banded_config(ks, head_dim, dtype, st, kernel)
    return heuristic_config(kernel, heads, head_dim)
