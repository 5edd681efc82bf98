"""Taking a QnA model out of PyTorch: ``torch.export``, ONNX and AOTInductor.

The core op (``torch.ops.qna.attention`` and ``attention_packed``, :mod:`qna_triton.ops`) is a custom
op: ``torch.export`` keeps it as one node, whose implementation is this library's Python code. Where
the graph must leave Python, the op is replaced by its decomposition into standard PyTorch operators,
the streaming form of :func:`qna_triton.reference.direct_qna_attention`: a maximum per window subtracted
before every exponential (stable for any finite logits), a fixed loop over the window offsets (no
data-dependent control flow), so the graph translates to ONNX or compiles ahead of time as it is.

* ``torch.onnx.export(model, (x,), dynamo=True)`` needs nothing: while the exporter traces the model,
  the layer calls the decomposition instead of the op (:func:`traced`).
* An :class:`torch.export.ExportedProgram` that holds the op (``torch.export.export(model, ...)``) is
  rewritten by :func:`decompose`, e.g. before ``torch._inductor.aoti_compile_and_package``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from . import ops, reference
from .layout import split_packed

__all__ = ["decompose", "decompositions", "traced"]


def _attention(logits, values, rpb, scale, kernel_size, stride, padding):
    """``qna::attention`` in standard operators: ``(out, lse)`` as the op returns them."""
    out, lse = reference.direct_qna_attention(logits, values, rpb, scale, tuple(kernel_size), tuple(stride),
                                              tuple(padding))
    # lse in the op's query-minor layout, by out-of-place ops only (decompositions run functionalised)
    return out, lse.transpose(-1, -2).contiguous().transpose(-1, -2)


def _attention_packed(qv, rpb, scale, kernel_size, stride, padding):
    """``qna::attention_packed`` in standard operators."""
    return _attention(*split_packed(qv, rpb), rpb, scale, kernel_size, stride, padding)


_DECOMPOSITIONS: Dict[Callable, Callable] = {
    ops.attention: _attention,
    ops.attention_packed: _attention_packed,
}


def decompositions() -> Dict[Callable, Callable]:
    """The decomposition table of the forward ops (``torch.ops.qna.attention.default`` and
    ``attention_packed.default``), for :meth:`torch.export.ExportedProgram.run_decompositions`;
    merge it into a table of your own (e.g. ``torch.export.default_decompositions()``) to combine them."""
    return {torch.ops.qna.attention.default: _attention, torch.ops.qna.attention_packed.default: _attention_packed}


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every QnA op replaced by standard PyTorch operators (all other operators kept).

    The result runs without this library's Python code: compile it with AOTInductor
    (``torch._inductor.aoti_compile_and_package``), or hand it to ``torch.onnx.export``.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    return program.run_decompositions(decompositions())


def traced(op: Callable) -> Callable:
    """``op`` (:func:`qna_triton.ops.attention` or ``attention_packed``), or its decomposition while
    ``torch.onnx.export`` traces the model (ONNX has no QnA operator)."""
    return _DECOMPOSITIONS[op] if torch.onnx.is_in_onnx_export() else op
