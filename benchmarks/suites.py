"""The named suites: which shapes, which providers. ``full`` sizes for a GPU, ``smoke`` sizes for CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .providers import DTYPES, CoreShape

__all__ = ["CPU_SUITES", "SUITES", "Suite", "WINDOWS", "resolve_suites", "vit_tiny_layers", "SPEC_VIT_TINY_LAYERS"]

WINDOWS = (3, 5, 7, 9, 11, 13, 15, 21, 31)
SMOKE_WINDOWS = (3, 5)

# qna_vit_tiny's QnA layers at 224x224 per docs/spec.md section 2: (H, W, features, heads, k, stride) with
# H, W the layer's input size. Used only when qna_vit cannot be imported.
SPEC_VIT_TINY_LAYERS: Tuple[Tuple[int, int, int, int, int, int], ...] = (
    (56, 56, 64, 8, 3, 1),
    (56, 56, 128, 16, 3, 2),
    (28, 28, 128, 16, 3, 1),
    (28, 28, 256, 32, 3, 2),
    (14, 14, 256, 32, 3, 1),
    (14, 14, 512, 64, 3, 2),
)


@dataclass(frozen=True)
class Suite:
    """``kind``: ``core`` (the op, :mod:`benchmarks.providers`), ``layer`` or ``model``."""

    name: str
    kind: str
    description: str


def _window_suite(dtype: str, head_dim: int) -> Suite:
    return Suite(
        f"window_{dtype}_d{head_dim}",
        "core",
        f"core op, window sweep {', '.join(map(str, WINDOWS))}: batch 32, 64x64, C=128, "
        f"{128 // head_dim} heads (d={head_dim}), 2 queries, {dtype}",
    )


SUITES: Dict[str, Suite] = {
    s.name: s
    for s in (
        _window_suite("bf16", 8),
        _window_suite("fp32", 8),
        _window_suite("bf16", 32),
        _window_suite("fp32", 32),
        Suite("vit_tiny", "core", "core op at the QnA layer shapes of qna_vit_tiny, batch 128, 224x224, bf16"),
        Suite(
            "layer_d16",
            "layer",
            "QnA layer vs neighbourhood-attention layer (FlexAttention), C=128, 8 heads "
            "(d=16), batch 32, 64x64, bf16, window sweep",
        ),
        Suite("layer_d32", "layer", "the same with 4 heads (d=32)"),
        Suite(
            "model",
            "model",
            "training step of qna_vit_tiny (bf16 autocast, torch.compile): our kernels vs the "
            "paper's formulation, and Swin-T (timm), batch 128, 224x224",
        ),
        Suite(
            "deploy",
            "deploy",
            "CPU inference, float32: qna_vit_tiny vs Swin-T and ConvNeXt-T (timm) in eager, torch.compile "
            "and onnxruntime, batch 1 and 8, 224x224, and the library's host overhead per call",
        ),
    )
}
CPU_SUITES = ("deploy",)  # run on the CPU, never part of the default (GPU) run
GROUPS = {"window": [n for n in SUITES if n.startswith("window_")], "layer": ["layer_d16", "layer_d32"]}


def resolve_suites(names: Sequence[str]) -> List[str]:
    """Suite names in the order given, groups (``window``, ``layer``) expanded; empty means all GPU suites."""
    if not names:
        return [n for n in SUITES if n not in CPU_SUITES]
    out: List[str] = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in SUITES:
                raise ValueError(f"unknown suite {m!r}; known: {', '.join(list(SUITES) + list(GROUPS))}")
            if m not in out:
                out.append(m)
    return out


def window_shapes(name: str, smoke: bool, windows: Sequence[int] = ()) -> List[CoreShape]:
    """The shapes of a ``window_<dtype>_d<head_dim>`` suite."""
    _, dt, hd = name.split("_")
    head_dim = int(hd[1:])
    if smoke:
        B, H, W, C = 1, 8, 8, 32
        ws = windows or SMOKE_WINDOWS
    else:
        B, H, W, C = 32, 64, 64, 128
        ws = windows or WINDOWS
    return [CoreShape(B, H, W, C, C // head_dim, k, DTYPES[dt]) for k in ws]


def layer_shapes(name: str, smoke: bool, windows: Sequence[int] = ()) -> List[CoreShape]:
    """``layer_d16`` / ``layer_d32``: the layer's width, heads, window (``CoreShape`` carries them)."""
    head_dim = int(name.split("_d")[1])
    if smoke:
        B, H, W, C, ws = 1, 8, 8, 32, windows or SMOKE_WINDOWS
    else:
        B, H, W, C, ws = 32, 64, 64, 128, windows or WINDOWS
    return [CoreShape(B, H, W, C, C // head_dim, k, torch.bfloat16) for k in ws]


def _import_qna_vit():
    import qna_vit  # noqa: F401  (installed with qna-triton)

    return qna_vit


SMOKE_VIT_OVERRIDES = dict(base_dim=16, lsa_window=(2, 2, 2, 1))  # 32x32 input: maps 8, 4, 2, 1
SMOKE_VIT_IMAGE = 32


def vit_tiny_layers(smoke: bool) -> Tuple[List[Tuple[int, int, int, int, int, int]], str]:
    """qna_vit_tiny's distinct QnA layer shapes ``(H, W, features, heads, k, stride)`` and their source.

    Read off the model in ``qna_vit`` (each stage's QnA layers see that stage's input
    size); docs/spec.md's table when the model is not there. Smoke runs take a narrow model at 32x32.
    """
    try:
        from qna_triton import QnA

        mod = _import_qna_vit()
        img = SMOKE_VIT_IMAGE if smoke else 224
        model = mod.create_model("qna_vit_tiny", **(SMOKE_VIT_OVERRIDES if smoke else {}))
        sizes = model.stage_sizes(img, img)
        found: List[Tuple[int, int, int, int, int, int]] = []
        for s, stage in enumerate(model.stages):
            for m in stage.modules():
                if isinstance(m, QnA) and m.kernel_size[0] == m.kernel_size[1]:
                    shape = (sizes[s][0], sizes[s][1], m.features, m.heads, m.kernel_size[0], m.stride[0])
                    if shape not in found:
                        found.append(shape)
        if not found:
            raise RuntimeError("no QnA layer found in the model's stages")
        return found, f"qna_vit create_model('qna_vit_tiny'), input {img}x{img}"
    except Exception as e:
        if smoke:
            rows = [(8, 8, 16, 8, 3, 1), (8, 8, 32, 16, 3, 2)]
            return rows, f"smoke fallback shapes (qna_vit unavailable: {type(e).__name__})"
        return list(SPEC_VIT_TINY_LAYERS), f"docs/spec.md section 2 (qna_vit unavailable: {e})"


def vit_tiny_shapes(smoke: bool) -> Tuple[List[CoreShape], str]:
    """The core-op shapes of the ``vit_tiny`` suite and where they came from."""
    layers, source = vit_tiny_layers(smoke)
    if smoke:  # one layer of each kind is enough to exercise the suite
        layers = [next(l for l in layers if l[5] == 1)] + [l for l in layers if l[5] != 1][:1]
        source += ", smoke: first stride-1 and stride-2 layers only"
    B = 1 if smoke else 128
    return [CoreShape(B, H, W, C, h, k, torch.bfloat16, stride=s) for H, W, C, h, k, s in layers], source
