"""``torch.fx`` glue: the shape-dependent helpers and the QnA layer stay single graph nodes under symbolic
tracing (timm's leaf lists; :func:`fx_tracer_kwargs` and :func:`symbolic_trace` for plain
``torch.fx`` and torchvision)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn
from timm.layers import register_notrace_function, register_notrace_module

from qna_triton import QnA


def _notrace(fn: Callable) -> Callable:
    """Marks a shape-dependent helper as a leaf for ``torch.fx`` symbolic tracing (timm's list, and
    :func:`fx_tracer_kwargs` for plain ``torch.fx`` / torchvision tracers): under tracing its
    inputs' shapes are proxies, so its Python arithmetic on them cannot be traced through. The name
    must not start with ``_``: fx only wraps public module-level names."""
    register_notrace_function(fn)
    _FX_LEAF_FUNCTIONS.append(fn)
    return fn


_FX_LEAF_FUNCTIONS: List[Callable] = []


def fx_tracer_kwargs() -> Dict[str, Any]:
    """``tracer_kwargs`` for torchvision's ``create_feature_extractor`` / ``get_graph_node_names`` tracing
    a QnA-ViT without timm's lists: the QnA layer (a custom op behind input checks) and the
    shape-dependent helpers stay single graph nodes."""
    return {"leaf_modules": [QnA], "autowrap_functions": list(_FX_LEAF_FUNCTIONS)}


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QnA) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` for a QnA-ViT (or any module holding QnA layers), with the leaves of
    :func:`fx_tracer_kwargs`."""
    tracer = _Tracer(autowrap_functions=tuple(_FX_LEAF_FUNCTIONS))
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


register_notrace_module(QnA)  # as timm leafs its own custom-op layers
