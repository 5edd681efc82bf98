"""The QnA problems a model runs: every ``qna_triton.QnA`` call of one forward pass, recorded without
running the attention (each QnA layer is swapped for a shape-only stand-in during the pass, which runs
on the ``meta`` device, so no memory or compute is spent)."""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from qna_triton import QnA

from .plan import Shape


@dataclass(frozen=True)
class LayerShape:
    """One QnA call: the layer's name and the problem it solved."""

    name: str
    batch: int
    height: int
    width: int
    heads: int
    head_dim: int
    n_queries: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]

    def shape(self, dtype: str, source: str) -> Shape:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return Shape(
            dtype,
            self.heads,
            self.head_dim,
            self.n_queries,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            self.batch,
            self.height,
            self.width,
            f"{source} {self.name}",
        )


def _shape_only_forward(layer: QnA, record: Callable[[LayerShape], None], name: str):
    def forward(self: QnA, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        record(
            LayerShape(
                name,
                int(B),
                int(H),
                int(W),
                self.heads,
                self.head_dim,
                self.n_queries,
                tuple(self.kernel_size),
                tuple(self.stride),
                tuple(self.padding),
            )
        )
        ho, wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        return x.new_zeros((B, ho, wo, self.out_features))

    return types.MethodType(forward, layer)


def collect_qna_shapes(model: nn.Module, example_input: torch.Tensor) -> List[LayerShape]:
    """Every QnA call of ``model(example_input)``, in call order (``example_input`` may be a meta
    tensor; the model is moved to its device for the pass and its QnA forwards restored after)."""
    found: List[LayerShape] = []
    layers = [(n or type(m).__name__, m) for n, m in model.named_modules() if isinstance(m, QnA)]
    saved = {id(m): m.__dict__.get("forward") for _, m in layers}
    for name, m in layers:
        m.forward = _shape_only_forward(m, found.append, name)
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for _, m in layers:
            if saved[id(m)] is None:
                del m.forward
            else:
                m.forward = saved[id(m)]
    return found


def shapes_of_model(
    make_model: Callable[[], nn.Module], batch: int, size: Optional[Sequence[int]] = None
) -> List[LayerShape]:
    """:func:`collect_qna_shapes` of ``make_model()`` on ``meta`` at ``batch`` samples of ``size`` (default:
    the model's :func:`input_size`). If some layer cannot run on ``meta``, on a fresh CPU model at
    batch 1 (sizes do not depend on the batch), with the batch put back."""
    model = make_model()
    shape = (batch, *(size if size is not None else input_size(model)))
    try:
        return collect_qna_shapes(model.to("meta"), torch.empty(*shape, device="meta"))
    except (NotImplementedError, RuntimeError):
        one = collect_qna_shapes(make_model().to("cpu"), torch.zeros(1, *shape[1:]))
        return [
            LayerShape(
                s.name, batch, s.height, s.width, s.heads, s.head_dim, s.n_queries, s.kernel_size, s.stride, s.padding
            )
            for s in one
        ]


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """``spec`` is a model name of :mod:`qna_vit` (``qna_vit_tiny``...) or ``module:function``
    (importable, returns a model)."""
    if ":" in spec:
        module_name, fn_name = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), fn_name)
    try:
        from qna_vit import create_model
    except ImportError as e:
        raise SystemExit(
            f"--model {spec}: cannot import the QnA-ViT models (qna_vit, installed with "
            f"qna-triton; {e}); pass module:function instead"
        ) from e
    return lambda: create_model(spec)


def input_size(model: nn.Module) -> Tuple[int, ...]:
    """The per-sample input size of a model: its ``input_size`` attribute, else timm's
    ``pretrained_cfg["input_size"]``."""
    size = getattr(model, "input_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size")
    if size is None:
        raise SystemExit(
            f"cannot tell the input size of {type(model).__name__}: give it an input_size attribute or pass --img-size"
        )
    return tuple(int(v) for v in size)
