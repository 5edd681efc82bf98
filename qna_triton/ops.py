"""The QnA core op as ``torch.library`` custom ops: ``qna::attention`` and ``qna::attention_backward``.

Both are opaque to ``torch.compile`` (fake kernels give their shapes), so a compiled model traces
through them with no graph break, and the work inside them (backend choice, config lookup, kernel
launches) happens at run time, outside any traced graph.

Device dispatch, chosen at run time by ``QNA_TRITON_BACKEND``:

* ``auto`` (default): CUDA tensors run the fused Triton kernels, CPU tensors the PyTorch reference
  (the paper's convolution form forward, the analytic backward).
* ``triton``: the Triton kernels for every tensor; on CPU through the Triton interpreter, which
  needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported.
* ``reference``: the PyTorch reference on every device.

float64 tensors always take the reference (the kernels accumulate in float32).

In plain eager execution the public entry points (:func:`qna_triton.qna_attention`, the QnA layer) call
the ops' implementation directly, through :func:`eager_route`, skipping torch's dispatcher and its
custom-op autograd (most of a small call's host time); anything that must see the op as one node
(``torch.compile``, ``torch.export``, the ONNX exporter, ``make_fx``, a ``TorchDispatchMode``, a
functorch transform, a tensor subclass) gets the custom op, whose results are the same.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch

from . import reference
from ._cache import settings
from .layout import compute_dtype, empty_query_minor, is_query_minor, output_size, query_minor, split_packed

BACKENDS = ("auto", "triton", "reference")


def resolve_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs for tensors on ``device`` under the current ``QNA_TRITON_BACKEND``."""
    choice = os.environ.get("QNA_TRITON_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"QNA_TRITON_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if dtype == torch.float64:
        return "reference"
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "QNA_TRITON_BACKEND=triton on CPU tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return choice


@functools.lru_cache(maxsize=256)
def _backend_under(env: tuple, device: torch.device, dtype: torch.dtype) -> str:
    return resolve_backend(device, dtype)


def _backend(t: torch.Tensor) -> str:
    """:func:`resolve_backend` for ``t``'s device and dtype, cached under the environment's settings
    (an error is not cached: a bad ``QNA_TRITON_BACKEND`` raises at every call)."""
    return _backend_under(settings(), t.device, t.dtype)


def _forward_impl(logits, values, rpb, scale, kernel_size, stride, padding, tables=None):
    """``(out, lse)``; ``tables``: the Triton path's converted ``rpb`` and ``scale`` where the caller made
    them (:func:`_kernel_tables`)."""
    ks, st, pd = tuple(kernel_size), tuple(stride), tuple(padding)
    if _backend(logits) == "triton":
        from .kernels import qna_forward

        return qna_forward(logits, values, rpb, scale, ks, st, pd, tables=tables)
    out, lse = reference.paper_qna_attention(logits, values, rpb, scale, ks, st, pd)
    return out.contiguous(), query_minor(lse)


def _backward_impl(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding, packed, tables=None):
    """``(dlogits, dvalues, drpb, dscale)``, or ``(dqv, drpb, dscale)`` when ``packed``; ``dscale``
    is empty when ``scale`` is None (custom ops cannot return None). ``tables``: as for
    :func:`_forward_impl` (the forward's, kept)."""
    ks, st, pd = tuple(kernel_size), tuple(stride), tuple(padding)
    if _backend(logits) == "triton":
        from .kernels import qna_backward

        grads = qna_backward(grad_out, logits, values, rpb, scale, lse, ks, st, pd, packed_grad=packed, tables=tables)
    else:
        dl, dv, dr, da = reference.direct_qna_attention_backward(grad_out, logits, values, rpb, scale, lse, ks, st, pd)
        grads = (
            (torch.cat([dl.transpose(-1, -2).flatten(-2), dv.flatten(-2)], dim=-1), dr, da)
            if packed
            else (dl, dv, dr, da)
        )
    first, *rest, da = grads
    if da is None:
        da = rpb.new_empty((0,))
    # dlogits keeps a query-minor input's layout (no copy); everything else is contiguous
    first = first.contiguous() if packed else _like_logits(first, logits)
    return (first, *(t.contiguous() for t in (*rest, da)))


def _like_logits(dl: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The layout of ``dlogits``, one rule for the real op and its fake: query-minor for a
    query-minor ``logits``, contiguous otherwise."""
    return query_minor(dl) if is_query_minor(logits) else dl.contiguous()


# ---------------------------------------------------------------- logits and values as two tensors
@torch.library.custom_op("qna::attention", mutates_args=())
def attention(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Core op forward; returns ``(out [B,Ho,Wo,h,d], lse [B,Ho,Wo,N,h])`` (``lse`` stored query-minor).
    Inputs are pre-validated."""
    return _forward_impl(logits, values, rpb, scale, kernel_size, stride, padding)


@attention.register_fake
def _attention_fake(logits, values, rpb, scale, kernel_size, stride, padding):
    resolve_backend(logits.device, logits.dtype)  # a bad QNA_TRITON_BACKEND fails at trace time too
    B, H, W, N, h = logits.shape
    Ho = output_size(H, kernel_size[0], stride[0], padding[0])
    Wo = output_size(W, kernel_size[1], stride[1], padding[1])
    out = values.new_empty((B, Ho, Wo, h, values.shape[-1]))
    lse = empty_query_minor((B, Ho, Wo, N, h), device=logits.device, dtype=compute_dtype(logits.dtype))
    return out, lse


@torch.library.custom_op("qna::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    lse: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core op backward: ``(dlogits, dvalues, drpb, dscale)``; ``dscale`` is empty when ``scale`` is None."""
    return _backward_impl(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding, False)


def _grad_fake(t):
    """The real op returns contiguous gradients, whatever the input's strides (but for a query-minor
    logits input, whose gradient is query-minor too)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _scale_grad_fake(rpb, scale):
    return rpb.new_empty((0,)) if scale is None else _grad_fake(scale)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding):
    return (
        _like_logits(torch.empty_like(logits), logits),
        _grad_fake(values),
        _grad_fake(rpb),
        _scale_grad_fake(rpb, scale),
    )


def _setup_context(ctx, inputs, output):
    *tensors, kernel_size, stride, padding = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.geometry = (kernel_size, stride, padding)


def _backward(ctx, grad_out, _grad_lse):
    logits, values, rpb, scale, lse = ctx.saved_tensors
    dl, dv, dr, da = attention_backward(grad_out.contiguous(), logits, values, rpb, scale, lse, *ctx.geometry)
    return dl, dv, dr, (None if scale is None else da), None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------- logits and values packed in one tensor (the QnA layer's path)
@torch.library.custom_op("qna::attention_packed", mutates_args=())
def attention_packed(
    qv: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` on ``qv [B, H, W, N*h + h*d]``, the output of one fused projection (``N, h`` from
    ``rpb``). Its backward writes the projection's gradient as one tensor instead of two to concatenate."""
    return _forward_impl(*split_packed(qv, rpb), rpb, scale, kernel_size, stride, padding)


@attention_packed.register_fake
def _attention_packed_fake(qv, rpb, scale, kernel_size, stride, padding):
    return _attention_fake(*split_packed(qv, rpb), rpb, scale, kernel_size, stride, padding)


@torch.library.custom_op("qna::attention_packed_backward", mutates_args=())
def attention_packed_backward(
    grad_out: torch.Tensor,
    qv: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    lse: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`attention_packed`: ``(dqv, drpb, dscale)``."""
    logits, values = split_packed(qv, rpb)
    return _backward_impl(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding, True)


@attention_packed_backward.register_fake
def _attention_packed_backward_fake(grad_out, qv, rpb, scale, lse, kernel_size, stride, padding):
    return _grad_fake(qv), _grad_fake(rpb), _scale_grad_fake(rpb, scale)


def _packed_backward(ctx, grad_out, _grad_lse):
    qv, rpb, scale, lse = ctx.saved_tensors
    dqv, dr, da = attention_packed_backward(grad_out.contiguous(), qv, rpb, scale, lse, *ctx.geometry)
    return dqv, dr, (None if scale is None else da), None, None, None


attention_packed.register_autograd(_packed_backward, setup_context=_setup_context)


# ----------------------------------------------------- plain eager calls: the same work, no dispatcher
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` may run the ops' implementation directly: eager execution of plain
    CPU or CUDA tensors, with nothing that must see the op as one node. Not while ``torch.compile`` or
    ``torch.export`` trace (the ONNX exporter's too), not under jit tracing, a ``TorchDispatchMode``
    (``FakeTensorMode``, ``make_fx``, ``FlopCounterMode``, ...) or a functorch transform (``vmap``,
    ``grad``), and not for tensor subclasses."""
    if torch.compiler.is_compiling():  # first: under dynamo the rest is never traced
        return False
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._C._get_tracing_state() is not None
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TYPES:
            return False
    return tensors[0].device.type in ("cpu", "cuda")


class _EagerAttention(torch.autograd.Function):
    """:func:`attention` (``packed`` False: ``first`` the logits) or :func:`attention_packed` (``packed``
    True: ``first`` the packed ``qv``, ``values`` None) as a plain autograd function: the forward and
    backward implementations of the custom ops, called without the dispatcher. Like the custom ops'
    backward, its backward is not differentiable."""

    @staticmethod
    def forward(ctx, packed, first, values, rpb, scale, kernel_size, stride, padding):
        logits, values = split_packed(first, rpb) if packed else (first, values)
        tables = _kernel_tables(logits, rpb, scale)
        out, lse = _forward_impl(logits, values, rpb, scale, kernel_size, stride, padding, tables)
        ctx.save_for_backward(first, values if not packed else None, rpb, scale, lse)
        # the tables as the kernels read them, made once for both passes (the saved rpb and scale are
        # checked unmodified by autograd, so they still hold what the tables were made of)
        ctx.packed, ctx.geometry, ctx.tables = packed, (kernel_size, stride, padding), tables
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output's gradient is undefined (grads are not materialised): zero
            return (None,) * 8
        first, values, rpb, scale, lse = ctx.saved_tensors
        if ctx.packed:
            logits, values = split_packed(first, rpb)
        else:
            logits = first
        grads = _backward_impl(
            grad_out.contiguous(), logits, values, rpb, scale, lse, *ctx.geometry, ctx.packed, ctx.tables
        )
        *inputs, dr, da = grads
        if ctx.packed:
            inputs.append(None)
        return (None, *inputs, dr, None if scale is None else da, None, None, None)


def _kernel_tables(logits: torch.Tensor, rpb: torch.Tensor, scale: Optional[torch.Tensor]):
    """The Triton path's ``rpb`` and ``scale`` tables (``kernels.launch.kernel_tables``) where that path
    runs for ``logits``, else None."""
    if _backend(logits) != "triton":
        return None
    from .kernels.launch import kernel_tables

    return kernel_tables(rpb, scale)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention_eager(logits, values, rpb, scale, kernel_size, stride, padding):
    """:func:`attention` for a plain eager call (see :func:`plain_eager`)."""
    if _needs_grad(logits, values, rpb, scale):
        return _EagerAttention.apply(False, logits, values, rpb, scale, kernel_size, stride, padding)
    return _forward_impl(logits, values, rpb, scale, kernel_size, stride, padding)


def attention_packed_eager(qv, rpb, scale, kernel_size, stride, padding):
    """:func:`attention_packed` for a plain eager call (see :func:`plain_eager`)."""
    if _needs_grad(qv, rpb, scale):
        return _EagerAttention.apply(True, qv, None, rpb, scale, kernel_size, stride, padding)
    return _forward_impl(*split_packed(qv, rpb), rpb, scale, kernel_size, stride, padding)
