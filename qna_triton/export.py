"""Taking a QnA model out of PyTorch: ``torch.export``, ONNX and AOTInductor.

The core op (``torch.ops.qna.attention`` and ``attention_packed``, :mod:`qna_triton.ops`) is a custom
op: ``torch.export`` keeps it as one node, whose implementation is this library's Python code. Where
the graph must leave Python, the op is replaced by its decomposition into standard PyTorch operators:
the paper's two depthwise convolutions (:func:`qna_triton.reference.paper_qna_attention`, a few dozen
nodes that run like a convolution), stabilised by the maximum logit per (image, query, head). That
shared maximum is exact unless a window's logits lie far below it (a range wider than ~60 in float32);
a window max-pool detects such inputs and a ``torch.cond`` (ONNX ``If``) then runs the streaming form
of :func:`qna_triton.reference.direct_qna_attention` instead (a maximum per window, stable for any
finite logits). Only the chosen branch runs, so the usual input pays for the convolutions alone.
:func:`decompose` (an exported program's route, e.g. to AOTInductor) still uses the streaming form alone
(see :func:`_streaming`).

* ``torch.onnx.export(model, (x,), dynamo=True)`` needs nothing: while the exporter traces the model,
  the layer calls the decomposition instead of the op (:func:`route`).
* An :class:`torch.export.ExportedProgram` that holds the op (``torch.export.export(model, ...)``) is
  rewritten by :func:`decompose`, e.g. before ``torch._inductor.aoti_compile_and_package``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from . import ops, reference
from .layout import split_packed

__all__ = ["LEAN_ONNX", "decompose", "decompositions", "route"]


def _branches(split: Callable, scale, kernel_size, stride, padding):
    """The two forms of the op as ``torch.cond`` branches of the operands ``split`` unpacks. The outputs
    are cloned: a branch of ``torch.cond`` may not return a view of its inputs."""

    def paper(*operands):
        logits, values, rpb = split(*operands)
        out, lse = reference.paper_qna_attention(
            logits, values, rpb, scale, kernel_size, stride, padding, exact_fallback=False
        )
        return out.clone(), lse.clone()

    def direct(*operands):
        logits, values, rpb = split(*operands)
        out, lse = reference.direct_qna_attention(logits, values, rpb, scale, kernel_size, stride, padding)
        return out.clone(), lse.clone()

    return paper, direct


def _lean(split: Callable, operands, scale, kernel_size, stride, padding):
    """The paper form, or the streaming form where its shared maximum would underflow a window."""
    kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
    logits, _, rpb = split(*operands)
    at_risk = reference.shared_max_at_risk(logits, rpb, kernel_size, stride, padding)
    paper, direct = _branches(split, scale, kernel_size, stride, padding)
    out, lse = torch.cond(at_risk, direct, paper, operands)
    # lse in the op's query-minor layout, by out-of-place ops only (decompositions run functionalised)
    return out, lse.transpose(-1, -2).contiguous().transpose(-1, -2)


def _unpacked(logits, values, rpb):
    return logits, values, rpb


def _attention(logits, values, rpb, scale, kernel_size, stride, padding):
    """``qna::attention`` in standard operators: ``(out, lse)`` as the op returns them."""
    return _lean(_unpacked, (logits, values, rpb), scale, kernel_size, stride, padding)


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
    """``qna::attention_packed`` in standard operators (the packed tensor is the branches' operand: the
    logits and values views of it would alias, which ``torch.cond`` refuses)."""

    def split(qv, rpb):
        return (*split_packed(qv, rpb), rpb)

    return _lean(split, (qv, rpb), scale, kernel_size, stride, padding)


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


def _router(op: Callable, eager: Callable, decomposition: Callable, n_tensors: int) -> Callable:
    def call(*args):
        if ops.plain_eager(*args[:n_tensors]):
            return eager(*args)
        return decomposition(*args) if torch.onnx.is_in_onnx_export() else op(*args)

    return call


_ROUTES: Dict[Callable, Callable] = {
    ops.attention: _router(ops.attention, ops.attention_eager, _DECOMPOSITIONS[ops.attention], 4),
    ops.attention_packed: _router(
        ops.attention_packed, ops.attention_packed_eager, _DECOMPOSITIONS[ops.attention_packed], 3
    ),
}


def route(op: Callable) -> Callable:
    """How the public entry points call ``op`` (:func:`qna_triton.ops.attention` or
    ``attention_packed``): in plain eager execution its implementation directly
    (:func:`qna_triton.ops.plain_eager`: no dispatcher); while ``torch.onnx.export`` traces the model its
    decomposition (ONNX has no QnA operator); otherwise (compiling, exporting, under a dispatch mode)
    the custom op itself."""
    return _ROUTES[op]
