"""Kernel launch configurations: a heuristic default (tuned per-GPU tables are looked up first)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import torch
import triton

__all__ = ["KernelConfig", "heuristic_config", "get_config", "KERNELS"]

KERNELS = ("fwd", "bwd_delta", "bwd")

# float32 elements of the largest per-program tile (pixels x heads x head-dim) at 4 warps: keeps every
# kernel under ~128-240 registers without spills on sm_80/sm_90 (python -m qna_triton.kernels.aot)
_TILE_BUDGET = {"fwd": 1024, "bwd_delta": 1024, "bwd": 512}
# most channels (heads x head-dim) of one pixel in a program
_CHANNEL_BUDGET = {"fwd": 128, "bwd_delta": 128, "bwd": 32}


@dataclass(frozen=True)
class KernelConfig:
    """Tile and launch parameters of one kernel: ``block_p`` pixels x ``block_h`` heads per program."""

    block_p: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def heuristic_config(kernel: str, heads: int, head_dim: int) -> KernelConfig:
    """A safe default: all heads of a pixel in one program when they fit, pixels fill the rest."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    budget = _TILE_BUDGET[kernel]
    bd = triton.next_power_of_2(head_dim)
    bh = max(1, min(triton.next_power_of_2(heads), _CHANNEL_BUDGET[kernel] // bd))
    bp = max(8, min(128, budget // (bh * bd)))
    return KernelConfig(block_p=bp, block_h=bh, num_warps=4, num_stages=1)


def get_config(
    kernel: str, logits: torch.Tensor, values: torch.Tensor, ks: Tuple[int, int], st: Tuple[int, int]
) -> KernelConfig:
    """The configuration to launch ``kernel`` with for this problem."""
    return heuristic_config(kernel, logits.shape[4], values.shape[4])
