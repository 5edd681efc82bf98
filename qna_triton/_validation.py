"""Argument checks shared by the functional API and the module: every bad input is rejected here,
with the argument's name, before any kernel is launched."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ._cache import KeyedCache, tensor_key
from .layout import output_size

IntOrPair = Union[int, Sequence[int]]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_pair(value: IntOrPair, name: str, minimum: int) -> Tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``; rejects non-integers and values below ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_window(
    size: Tuple[int, int], kernel_size: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int]
) -> Tuple[int, int]:
    """Checks that the window fits the padded image; returns the output size."""
    out = []
    for axis, n, k, s, p in zip(("height", "width"), size, kernel_size, stride, padding):
        if k > n + 2 * p:
            raise ValueError(f"kernel_size {k} is larger than the padded image {axis} {n} + 2*{p} = {n + 2 * p}")
        out.append(output_size(n, k, s, p))
    return out[0], out[1]


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


# Inputs found valid, keyed by all the checks read of them (which tensors are None, dims, dtypes, shapes,
# devices, the geometry; the strides too, as tensor_key gives them): a key found valid skips the checks,
# and any other input runs them all, so bad input raises as before. Errors are never cached.
_VALID = KeyedCache("valid inputs")


def _inputs_key(logits, values, rpb, scale, kernel_size, stride, padding) -> Optional[tuple]:
    """The cache key of these inputs, or None where the checks must run (an argument that is not a
    tensor; while torch.compile traces, whose symbolic sizes are not to be hashed or guarded on)."""
    for t in (logits, values, rpb, scale):
        if t is not None and not isinstance(t, torch.Tensor):
            return None
    if logits is None or values is None or torch.compiler.is_compiling():
        return None
    return (*map(tensor_key, (logits, values, rpb, scale)), kernel_size, stride, padding)


def check_core_inputs(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
) -> Tuple[int, int]:
    """Validates the core op's tensors against each other; returns the output size."""
    key = _inputs_key(logits, values, rpb, scale, kernel_size, stride, padding)
    out = _VALID.get(key)
    if out is None:
        out = _VALID.put(key, _check_core_inputs(logits, values, rpb, scale, kernel_size, stride, padding))
    return out


def _check_core_inputs(logits, values, rpb, scale, kernel_size, stride, padding) -> Tuple[int, int]:
    check_float(logits, "logits")
    check_float(values, "values")
    if logits.dim() != 5:
        raise ValueError(f"logits must have shape [B, H, W, n_queries, heads], got {tuple(logits.shape)}")
    if values.dim() != 5:
        raise ValueError(f"values must have shape [B, H, W, heads, head_dim], got {tuple(values.shape)}")
    if logits.dtype != values.dtype:
        raise TypeError(f"values dtype {values.dtype} differs from logits dtype {logits.dtype}")
    if values.device != logits.device:
        raise ValueError(f"values is on {values.device} but logits is on {logits.device}")
    B, H, W, N, h = logits.shape
    if tuple(values.shape[:4]) != (B, H, W, h):
        raise ValueError(
            f"values shape {tuple(values.shape)} does not match logits shape {tuple(logits.shape)}: "
            "expected [B, H, W, heads, head_dim] with B, H, W and heads as in logits"
        )
    if any(n < 1 for n in (B, H, W, N, h, values.shape[4])):  # not min(): it would order symbolic sizes
        raise ValueError(f"logits and values must not be empty, got {tuple(logits.shape)}, {tuple(values.shape)}")
    K = kernel_size[0] * kernel_size[1]
    for name, t in (("rpb", rpb), ("scale", scale)):
        if t is None:
            continue
        check_float(t, name)
        if tuple(t.shape) != (K, N, h):
            raise ValueError(f"{name} must have shape [k_h*k_w, n_queries, heads] = {(K, N, h)}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    return check_window((H, W), kernel_size, stride, padding)
