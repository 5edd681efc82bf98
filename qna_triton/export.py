"""Taking a QnA model out of PyTorch: ``torch.export``, ONNX and AOTInductor.

The core op (``torch.ops.qna.attention`` and ``attention_packed``, :mod:`qna_triton.ops`) is a custom
op: ``torch.export`` keeps it as one node, whose implementation is this library's Python code. Where
the graph must leave Python, the op is replaced by its decomposition into standard PyTorch operators.
From torch 2.15 on, ONNX gets the paper's two depthwise convolutions
(:func:`qna_triton.reference.paper_attention_channels_first`, computed channels-first so that every
step is a convolution-network operator: a few dozen nodes that run like a convolution), stabilised by
the maximum logit per (image, query, head). That shared maximum is exact unless a window's logits lie
far below it (a range wider than ~60 in float32); a window max-pool detects such inputs and a
``torch.cond`` (ONNX ``If``) then replaces the result by the streaming form of
:func:`qna_triton.reference.direct_qna_attention` (a maximum per window, stable for any finite logits).
The convolutions run in the main graph (inside an ``If`` branch onnxruntime ran them ~2x slower); the
``If`` finishes the paper form from them or, for inputs at risk only, runs the streaming form.
:func:`decompose` (an exported program's route, e.g. to AOTInductor) and ONNX before torch 2.15 use
the streaming form alone (see :func:`_streaming`).

* ``torch.onnx.export(model, (x,), dynamo=True)`` needs nothing: while the exporter traces the model,
  the layer calls the decomposition instead of the op (:func:`route`).
* An :class:`torch.export.ExportedProgram` that holds the op (``torch.export.export(model, ...)``) is
  rewritten by :func:`decompose`, e.g. before ``torch._inductor.aoti_compile_and_package``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import ops, reference
from .layout import compute_dtype, split_packed

__all__ = ["COMPILED_CPU_STREAMING", "LEAN_ONNX", "compiled_cpu_inference", "decompose", "decompositions", "route"]


def _lean(split: Callable, operands, rpb, scale, kernel_size, stride, padding):
    """The paper form, replaced by the streaming form where its shared maximum would underflow a window.

    ``split(*operands)`` gives the channels-first logits ``[B, h*N, H, W]`` and values ``[B, h*d, H, W]``
    (:func:`qna_triton.reference.paper_attention_channels_first`): the paper form runs on them as
    standard convolution-network operators, one transpose before and one after the whole op. Its two
    convolutions run unconditionally, outside any ``torch.cond``: inside a branch (an ONNX ``If``
    subgraph) onnxruntime ran them ~2x slower at batch 1. One ``cond`` per result then finishes the
    paper form from them, or computes the streaming form for the rare input at risk: ``out`` and ``lse``
    apart, so that a graph which does not use ``lse`` (a model's) drops its ``cond`` and everything
    only it needs. A branch returns new tensors (it may not return a view of its inputs).
    """
    kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
    K, N, h = rpb.shape
    l, v = split(*operands)
    num, den, shift = reference.paper_sums_channels_first(l, v, rpb, scale, kernel_size, stride, padding)
    at_risk = reference.shared_max_at_risk_channels_first(l, rpb, kernel_size, stride, padding)

    def direct(operands):
        l, v = split(*operands)
        B, _, H, W = l.shape
        logits = l.reshape(B, h, N, H, W).permute(0, 3, 4, 2, 1)
        values = v.reshape(B, h, -1, H, W).permute(0, 3, 4, 1, 2)
        return reference.direct_qna_attention(logits, values, rpb, scale, kernel_size, stride, padding)

    def direct_out(operands, num, den):
        out = direct(operands)[0]  # [B, Ho, Wo, h, d]
        return out.permute(0, 3, 4, 1, 2).reshape(out.shape[0], -1, *out.shape[1:3]).contiguous()

    def paper_out(operands, num, den):
        return reference.paper_out_channels_first(num, den, h).contiguous()

    def direct_lse(operands, lse):
        lse = direct(operands)[1]  # [B, Ho, Wo, N, h]
        return lse.permute(0, 4, 3, 1, 2).reshape(lse.shape[0], -1, *lse.shape[1:3]).contiguous()

    def paper_lse(operands, lse):
        return lse.clone()

    out = torch.cond(at_risk, direct_out, paper_out, (operands, num, den))
    # the paper form's lse outside the branch: a branch sees its operands' sizes as symbols, and
    # broadcasting shift's size-1 dimensions there fails when the shapes are static
    lse = reference.paper_lse_channels_first(den, shift)
    lse = torch.cond(at_risk, direct_lse, paper_lse, (operands, lse))
    B, _, Ho, Wo = out.shape
    out = out.permute(0, 2, 3, 1).reshape(B, Ho, Wo, h, -1)
    # lse in the op's query-minor layout, by out-of-place ops only (decompositions run functionalised)
    return out, lse.permute(0, 2, 3, 1).reshape(B, Ho, Wo, h, N).transpose(-1, -2)


def _attention(logits, values, rpb, scale, kernel_size, stride, padding):
    """``qna::attention`` in standard operators: ``(out, lse)`` as the op returns them."""
    dtype = compute_dtype(logits.dtype)
    # contiguous: query-minor logits would otherwise give a channels-last view, and both branches of a
    # cond must return the same strides
    l = reference.logits_channels_first(logits).to(dtype).contiguous()
    v = reference.values_channels_first(values).to(dtype).contiguous()
    out, lse = _lean(lambda l, v: (l, v), (l, v), rpb, scale, kernel_size, stride, padding)
    return out.to(values.dtype), lse


def _streaming(logits, values, rpb, scale, kernel_size, stride, padding):
    """``qna::attention`` as the streaming form alone, for :func:`decompose`: rewriting an exported
    program whose shapes are dynamic into a ``torch.cond`` fails in torch 2.15's placeholder naming of
    the branches (an ``int`` where a node is expected), so that route keeps the form without a branch."""
    out, lse = reference.direct_qna_attention(
        logits, values, rpb, scale, tuple(kernel_size), tuple(stride), tuple(padding)
    )
    return out, lse.transpose(-1, -2).contiguous().transpose(-1, -2)


def _streaming_packed(qv, rpb, scale, kernel_size, stride, padding):
    """``qna::attention_packed`` as the streaming form alone."""
    return _streaming(*split_packed(qv, rpb), rpb, scale, kernel_size, stride, padding)


def _attention_packed(qv, rpb, scale, kernel_size, stride, padding):
    """``qna::attention_packed`` in standard operators: the packed ``[B, H, W, h*N + h*d]`` tensor is
    already channel-ordered as the channels-first form wants it (logits channel ``j*N + n``), so one
    transpose makes both maps. It is the branches' one operand (logits and values as two views of it
    would alias, which ``torch.cond`` refuses)."""
    nh = rpb.shape[1] * rpb.shape[2]
    dtype = compute_dtype(qv.dtype)
    # contiguous: every map after it then is too, as both branches of a cond must return the same strides
    qc = qv.permute(0, 3, 1, 2).to(dtype).contiguous()
    out, lse = _lean(lambda qc: (qc[:, :nh], qc[:, nh:]), (qc,), rpb, scale, kernel_size, stride, padding)
    return out.to(qv.dtype), lse


# torch.cond becomes an ONNX ``If`` in torch 2.15's exporter (checked); torch 2.11's rejects the traced
# branches and retries a strict export that no longer takes this translation, so older releases keep
# the streaming form (exact, more nodes). torch 2.12-2.14 are unchecked: streaming there too.
LEAN_ONNX = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 15)

_DECOMPOSITIONS: Dict[Callable, Callable] = {
    ops.attention: _attention if LEAN_ONNX else _streaming,
    ops.attention_packed: _attention_packed if LEAN_ONNX else _streaming_packed,
}


def decompositions() -> Dict[Callable, Callable]:
    """The decomposition table of the forward ops (``torch.ops.qna.attention.default`` and
    ``attention_packed.default``), for :meth:`torch.export.ExportedProgram.run_decompositions`;
    merge it into a table of your own (e.g. ``torch.export.default_decompositions()``) to combine them."""
    return {torch.ops.qna.attention.default: _streaming, torch.ops.qna.attention_packed.default: _streaming_packed}


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every QnA op replaced by standard PyTorch operators (all other operators kept).

    The result runs without this library's Python code: compile it with AOTInductor
    (``torch._inductor.aoti_compile_and_package``), or hand it to ``torch.onnx.export``.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    return program.run_decompositions(decompositions())


# torch 2.11's Dynamo answers ``is_exporting()`` True while compiling too (checked), so it cannot tell
# ``torch.compile`` from ``torch.export``: there compiled CPU inference keeps the op. 2.12-2.14 unchecked.
COMPILED_CPU_STREAMING = LEAN_ONNX


def compiled_cpu_inference(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``torch.compile`` (not ``torch.export``) is tracing a call on CPU tensors that needs no
    gradient: there the op is replaced by its streaming form, which Inductor fuses into its own loops
    (the op itself would run the eager reference as an opaque call). Training keeps the op (its
    backward is the library's), and so does every export (the op stays one node)."""
    if not COMPILED_CPU_STREAMING or not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def _router(op: Callable, eager: Callable, decomposition: Callable, streaming: Callable, n_tensors: int) -> Callable:
    def call(*args):
        if ops.plain_eager(*args[:n_tensors]):
            return eager(*args)
        if torch.onnx.is_in_onnx_export():
            return decomposition(*args)
        if compiled_cpu_inference(*args[:n_tensors]):
            return streaming(*args)
        return op(*args)

    return call


_ROUTES: Dict[Callable, Callable] = {
    ops.attention: _router(ops.attention, ops.attention_eager, _DECOMPOSITIONS[ops.attention], _streaming, 4),
    ops.attention_packed: _router(
        ops.attention_packed,
        ops.attention_packed_eager,
        _DECOMPOSITIONS[ops.attention_packed],
        _streaming_packed,
        3,
    ),
}


def route(op: Callable) -> Callable:
    """How the public entry points call ``op`` (:func:`qna_triton.ops.attention` or
    ``attention_packed``): in plain eager execution its implementation directly
    (:func:`qna_triton.ops.plain_eager`: no dispatcher); while ``torch.onnx.export`` traces the model its
    decomposition (ONNX has no QnA operator); while ``torch.compile`` traces CPU inference the streaming
    form (:func:`compiled_cpu_inference`); otherwise (compiling for CUDA or for training, exporting,
    under a dispatch mode) the custom op itself."""
    return _ROUTES[op]
