"""Layer-level providers: the whole QnA layer (projections included) and the neighbourhood-attention
layer of the same width, heads and window."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from qna_triton import QnA
from qna_triton.ops import resolve_backend

from .peers import FLEX_MIN_HEAD_DIM, FlexNeighborhoodAttention
from .providers import CoreShape, Options
from .runner import PASSES, Unsupported, Workload

__all__ = ["LAYER_PROVIDERS", "build_layer"]


def _input(s: CoreShape, opts: Options, grad: bool) -> Callable[[], List[torch.Tensor]]:
    g = torch.Generator(device=opts.device)
    g.manual_seed(opts.seed)

    def make() -> List[torch.Tensor]:
        x = torch.randn((s.batch, s.height, s.width, s.channels), generator=g, device=opts.device)
        return [x.to(s.dtype).requires_grad_(grad)]

    return make


def qna_layer(s: CoreShape, opts: Options) -> Workload:
    torch.manual_seed(opts.seed)
    layer = QnA(s.channels, s.channels, s.heads, kernel_size=s.window, stride=s.stride, n_queries=s.queries)
    with torch.no_grad():  # random, not the zero init, so the bias takes part like a trained one
        layer.rpe_bias.normal_(0.0, 0.5)
    layer = layer.to(device=opts.device, dtype=s.dtype)
    backend = resolve_backend(opts.device, s.dtype)
    notes = ["qna_triton.QnA: fused projection, kernel, output projection; eager"]
    if backend != "triton":
        notes.append(f"backend={backend} (the library's PyTorch path on {opts.device.type})")
    return Workload(_input(s, opts, True), layer, params=list(layer.parameters()), notes=notes)


def flex_na_layer(s: CoreShape, opts: Options) -> Workload:
    if s.stride != 1:
        raise Unsupported("neighbourhood attention has no stride")
    cuda = opts.device.type == "cuda"
    torch.manual_seed(opts.seed)
    layer = FlexNeighborhoodAttention(s.channels, s.heads, s.window, compile=opts.compile)
    layer = layer.to(device=opts.device, dtype=s.dtype)
    notes = [
        "qkv projection + FlexAttention (2-D window block mask, relative-position bias) + output projection",
        "attention " + ("compiled (mode='default')" if opts.compile else "eager (compilation disabled)"),
    ]
    if cuda and s.head_dim < FLEX_MIN_HEAD_DIM:
        notes.append(f"head dim {s.head_dim} zero-padded to {FLEX_MIN_HEAD_DIM}")
    if not cuda:
        notes.append("FlexAttention has no CPU backward: forward only")
        for p in layer.parameters():
            p.requires_grad_(False)
    layer.block_mask(s.height, s.width, opts.device)  # built once per shape, outside the timing
    return Workload(
        _input(s, opts, cuda),
        layer,
        params=list(layer.parameters()),
        passes=PASSES if cuda else ("fwd",),
        compiled=opts.compile,
        notes=notes,
    )


LAYER_PROVIDERS: Dict[str, Callable[[CoreShape, Options], Workload]] = {
    "qna_layer": qna_layer,
    "flex_na_layer": flex_na_layer,
}


def build_layer(name: str, s: CoreShape, opts: Options) -> Callable[[], Workload]:
    return lambda: LAYER_PROVIDERS[name](s, opts)
