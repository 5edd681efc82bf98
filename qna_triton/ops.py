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
from ._cache import KeyedCache, settings, tensor_key
from ._validation import check_core_inputs
from .layout import (
    compute_dtype,
    empty_query_minor,
    is_query_minor,
    output_size,
    query_minor,
    split_packed,
    split_packed_strided,
)
from .tuning.selection import forced_algorithm

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


def _forward_impl(logits, values, rpb, scale, kernel_size, stride, padding):
    """``(out, lse)``."""
    ks, st, pd = tuple(kernel_size), tuple(stride), tuple(padding)
    if _backend(logits) == "triton":
        from .kernels import qna_forward

        return qna_forward(logits, values, rpb, scale, ks, st, pd)
    out, lse = reference.paper_qna_attention(logits, values, rpb, scale, ks, st, pd)
    return out.contiguous(), query_minor(lse)


def _backward_impl(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding, packed):
    """``(dlogits, dvalues, drpb, dscale)``, or ``(dqv, drpb, dscale)`` when ``packed``; ``dscale``
    is empty when ``scale`` is None (custom ops cannot return None)."""
    ks, st, pd = tuple(kernel_size), tuple(stride), tuple(padding)
    if _backend(logits) == "triton":
        from .kernels import qna_backward

        grads = qna_backward(grad_out, logits, values, rpb, scale, lse, ks, st, pd, packed_grad=packed)
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
    return tensors[0] is not None and tensors[0].device.type in ("cpu", "cuda")


class EagerCall:
    """A plain eager call of one key (:func:`eager_call`): its inputs' checks passed, its backend found
    and, on the Triton path, its launch plans (``qna_triton.kernels.launch``) kept, so that a call
    does no more than allocate and launch. ``packed``: the call is :func:`attention_packed`'s (``first``
    the packed ``qv``, ``values`` None), else :func:`attention`'s (``first`` the logits)."""

    __slots__ = ("packed", "geometry", "rpb_shape", "launch", "fwd_key", "bwd_key", "fwd_plan", "bwd_plan")

    def __init__(self, packed: bool, first, values, rpb, scale, ks: Tuple[int, int], st, pd) -> None:
        if rpb is None:  # the functional API's missing rpb: zeros, made at each call
            self.rpb_shape = (ks[0] * ks[1], *first.shape[3:])
            rpb = first.new_zeros(self.rpb_shape)
        else:
            self.rpb_shape = None
        logits, values = split_packed(first, rpb) if packed else (first, values)
        check_core_inputs(logits, values, rpb, scale, ks, st, pd)
        self.packed, self.geometry = packed, (ks, st, pd)
        # the Triton path's launchers (a module: imported once here, not at every call), or None
        self.launch = self.fwd_plan = self.bwd_plan = self.fwd_key = self.bwd_key = None
        if _backend(logits) == "triton":
            from .kernels import launch

            metas = tuple(map(tensor_key, (logits, values, rpb, scale)))
            self.launch = launch
            self.fwd_key = launch.plan_key("fwd", metas, ks, st, pd)
            self.bwd_key = launch.plan_key(("bwd", packed), metas, ks, st, pd)

    def __call__(self, first, values, rpb, scale) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``, through autograd where a gradient is needed."""
        if rpb is None:
            rpb = first.new_zeros(self.rpb_shape)
        if torch.is_grad_enabled() and (
            first.requires_grad
            or rpb.requires_grad
            or (values is not None and values.requires_grad)
            or (scale is not None and scale.requires_grad)
        ):
            return _EagerAttention.apply(self, first, values, rpb, scale)
        return self.forward(first, values, rpb, scale, None)

    def tables(self, rpb: torch.Tensor, scale: Optional[torch.Tensor]):
        """The Triton path's ``rpb`` and ``scale`` tables (``kernels.launch.kernel_tables``), else None."""
        return None if self.launch is None else self.launch.kernel_tables(rpb, scale)

    def forward(self, first, values, rpb, scale, tables) -> Tuple[torch.Tensor, torch.Tensor]:
        """The op's forward; ``tables`` (:meth:`tables`) where the caller made them."""
        logits, values = split_packed_strided(first, rpb) if self.packed else (first, values)
        launch = self.launch
        if launch is None:
            return _forward_impl(logits, values, rpb, scale, *self.geometry)
        if tables is None:
            tables = launch.kernel_tables(rpb, scale)
        plan = self.fwd_plan
        if plan is not None:
            return plan.run(logits, values, *tables)
        out_lse = launch.qna_forward(logits, values, rpb, scale, *self.geometry, tables=tables, key=self.fwd_key)
        self.fwd_plan = launch.forward_plan(self.fwd_key)  # described by that call (None where it could not be)
        return out_lse

    def backward(self, grad_out, first, values, rpb, scale, lse, tables) -> Tuple[Optional[torch.Tensor], ...]:
        """The op's backward: the gradients of ``first``, ``values`` (None when packed), ``rpb`` and
        ``scale`` (None without one). On the Triton path ``drpb`` and ``dscale`` are two halves of one
        tensor (:func:`~qna_triton.kernels.launch.qna_backward`'s ``shared``)."""
        logits, values = split_packed_strided(first, rpb) if self.packed else (first, values)
        launch = self.launch
        if launch is None:
            g = grad_out.contiguous()
            grads = _backward_impl(g, logits, values, rpb, scale, lse, *self.geometry, self.packed)
        elif self.bwd_plan is not None:
            grads = self.bwd_plan.run(grad_out, logits, values, rpb, scale, lse, tables, self.packed, True)
        else:
            grads = launch.qna_backward(
                grad_out, logits, values, rpb, scale, lse, *self.geometry,
                packed_grad=self.packed, tables=tables, key=self.bwd_key, shared=True,
            )  # fmt: skip
            self.bwd_plan = launch.backward_plan(self.bwd_key)
        if self.packed:
            dqv, dr, da = grads
            return dqv, None, dr, None if scale is None else da
        dl, dv, dr, da = grads
        return dl, dv, dr, None if scale is None else da


_EAGER_CALLS = KeyedCache("eager calls")


def eager_call(packed: bool, first, values, rpb, scale, ks, st, pd) -> EagerCall:
    """The :class:`EagerCall` of these arguments, made (and the inputs checked, raising by name) at the
    first call of their key: the tensors' :func:`tensor_key`, the geometry and the environment's
    settings (a forced algorithm too)."""
    # one flat tuple (nested ones cost an allocation each): what tensor_key gives of each tensor
    key = (
        packed,
        first.shape,
        first.stride(),
        first.dtype,
        first.device,
        tensor_key(values),
        tensor_key(rpb),
        tensor_key(scale),
        ks,
        st,
        pd,
        settings(),
        forced_algorithm(),
    )
    call = _EAGER_CALLS.get(key)
    if call is None:
        call = _EAGER_CALLS.put(key, EagerCall(packed, first, values, rpb, scale, ks, st, pd))
    return call


class _EagerAttention(torch.autograd.Function):
    """An :class:`EagerCall` as a plain autograd function: the forward and backward implementations of
    the custom ops, called without the dispatcher. Like the custom ops' backward, its backward is not
    differentiable."""

    @staticmethod
    def forward(ctx, call: EagerCall, first, values, rpb, scale):
        # the tables as the kernels read them, made once for both passes (the saved rpb and scale are
        # checked unmodified by autograd, so they still hold what the tables were made of)
        tables = call.tables(rpb, scale)
        out, lse = call.forward(first, values, rpb, scale, tables)
        ctx.save_for_backward(first, values, rpb, scale, lse)
        ctx.call, ctx.tables = call, tables
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        if torch.is_grad_enabled():  # a graph of the backward is asked for (create_graph): refused
            return _backward_once(ctx, grad_out, _grad_lse)
        if grad_out is None:  # the output's gradient is undefined (grads are not materialised): zero
            return (None,) * 5
        return (None, *ctx.call.backward(grad_out, *ctx.saved_tensors, ctx.tables))


@torch.autograd.function.once_differentiable
def _backward_once(ctx, grad_out, _grad_lse):
    """:meth:`_EagerAttention.backward` where a graph of it is asked for: computed, and its result raises
    when differentiated (``once_differentiable`` around every backward would cost a grad-mode context
    per call)."""
    if grad_out is None:
        return (None,) * 5
    return (None, *ctx.call.backward(grad_out, *ctx.saved_tensors, ctx.tables))


def _as_tuple(v) -> tuple:
    return v if type(v) is tuple else tuple(v)


def attention_eager(logits, values, rpb, scale, kernel_size, stride, padding):
    """:func:`attention` for a plain eager call (see :func:`plain_eager`)."""
    geometry = _as_tuple(kernel_size), _as_tuple(stride), _as_tuple(padding)
    return eager_call(False, logits, values, rpb, scale, *geometry)(logits, values, rpb, scale)


def attention_packed_eager(qv, rpb, scale, kernel_size, stride, padding):
    """:func:`attention_packed` for a plain eager call (see :func:`plain_eager`)."""
    geometry = _as_tuple(kernel_size), _as_tuple(stride), _as_tuple(padding)
    return eager_call(True, qv, None, rpb, scale, *geometry)(qv, None, rpb, scale)
