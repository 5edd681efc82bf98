"""Layout and geometry of the QnA core op, the ground floor every other module imports.

Shapes (``N`` queries, ``h`` heads, ``d`` head dim, row-major): ``logits`` ``[B, H, W, N, h]``,
``values`` ``[B, H, W, h, d]``, output ``[B, H_out, W_out, h, d]``. The fastest logits layout is
*query-minor*: each pixel's ``[N, h]`` block stored as ``h`` rows of ``N`` (:func:`query_minor`).
"""

from __future__ import annotations

from typing import Tuple

import torch

Pair = Tuple[int, int]

__all__ = [
    "Pair",
    "output_size",
    "default_padding",
    "compute_dtype",
    "empty_query_minor",
    "query_minor_strides",
    "query_minor",
    "is_query_minor",
    "split_packed",
    "split_packed_strided",
]


def output_size(size: int, k: int, s: int, p: int) -> int:
    """Output length of one spatial axis: ``floor((size + 2p - k) / s) + 1``."""
    return (size + 2 * p - k) // s + 1


def default_padding(ks: Pair) -> Pair:
    """The padding used when none is given: ``(k - 1) // 2`` per axis (an odd window at stride 1 keeps
    the map's size)."""
    return (ks[0] - 1) // 2, (ks[1] - 1) // 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the references, and the dtype of their ``lse``: float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_minor_strides(shape) -> Tuple[int, ...]:
    """The strides of a ``[..., N, h]`` tensor stored query-minor: those of a contiguous ``[..., h, N]``,
    transposed."""
    *lead, N, h = shape
    strides = [1, N]
    step = h * N
    for size in reversed(lead):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


def empty_query_minor(shape, **kwargs) -> torch.Tensor:
    """An uninitialised ``[..., N, h]`` tensor stored query-minor: each pixel holds ``h`` rows of
    ``N`` queries (the order the kernels keep their statistics and the logits gradient in). One
    allocation with the strides (``empty`` then ``transpose`` costs twice the host time)."""
    return torch.empty_strided(tuple(shape), query_minor_strides(shape), **kwargs)


def query_minor(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[..., N, h]``) with exactly the strides of :func:`empty_query_minor`; a copy only
    when it has other strides."""
    if t.stride() == query_minor_strides(t.shape):
        return t
    return empty_query_minor(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def is_query_minor(t: torch.Tensor) -> bool:
    """Whether each pixel's ``[N, h]`` block of ``t`` is stored as ``h`` rows of ``N`` (the layout of
    the QnA layer's packed logits, which the kernels read fastest). False when ``N`` or ``h`` is 1,
    where both orders coincide."""
    N, h = t.shape[-2], t.shape[-1]
    return N > 1 and h > 1 and t.stride(-2) == 1 and t.stride(-1) == N


def split_packed(qv: torch.Tensor, rpb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views of a packed ``[B, H, W, h*N + h*d]`` tensor as logits ``[B,H,W,N,h]`` and values ``[B,H,W,h,d]``.

    The logits channels are query-minor (channel ``j*N + n`` is query ``n`` of head ``j``), the
    order the kernels read fastest (:func:`query_minor`)."""
    _, N, h = rpb.shape
    nh = N * h
    return (
        qv[..., :nh].unflatten(-1, (h, N)).transpose(-1, -2),
        qv[..., nh:].unflatten(-1, (h, (qv.shape[-1] - nh) // h)),
    )


def split_packed_strided(qv: torch.Tensor, rpb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_packed`'s views made by two ``as_strided`` calls instead of five view operations: for
    the eager route, which is never traced (graphs keep :func:`split_packed`, which every exporter
    knows)."""
    _, N, h = rpb.shape
    B, H, W, C = qv.shape
    s0, s1, s2, s3 = qv.stride()
    off = qv.storage_offset()
    logits = qv.as_strided((B, H, W, N, h), (s0, s1, s2, s3, N * s3), off)
    values = qv.as_strided((B, H, W, h, (C - N * h) // h), (s0, s1, s2, (C - N * h) // h * s3, s3), off + N * h * s3)
    return logits, values
