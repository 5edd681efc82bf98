"""Providers at the level of the core op (logits ``[B,H,W,N,h]``, values ``[B,H,W,h,d]``).

Each provider turns a :class:`CoreShape` into a :class:`~benchmarks.runner.Workload` or raises
:class:`~benchmarks.runner.Unsupported`. All inputs are drawn at random (never zeros); every tensor a
trained layer would learn (relative-position bias, attention scale, convolution weight) takes a
gradient too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from qna_triton import qna_attention
from qna_triton.layout import output_size
from qna_triton.ops import resolve_backend
from qna_triton.reference import naive_qna_attention, paper_qna_attention
from qna_triton.tuning import kernel_algorithm

from . import floors
from .peers import FLEX_MIN_HEAD_DIM, flex_neighbourhood_attention, neighbourhood_block_mask, swin_window_attention
from .runner import PASSES, Unsupported, Workload

__all__ = ["CoreShape", "Options", "CORE_PROVIDERS", "build_core", "DTYPES", "dtype_name"]

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class CoreShape:
    """One problem of the core op: ``channels = heads * head_dim``, window ``k x k``, padding ``(k-1)//2``."""

    batch: int
    height: int
    width: int
    channels: int
    heads: int
    window: int
    dtype: torch.dtype
    queries: int = 2
    stride: int = 1

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def padding(self) -> int:
        return (self.window - 1) // 2

    @property
    def out_hw(self) -> Tuple[int, int]:
        k, s, p = self.window, self.stride, self.padding
        return output_size(self.height, k, s, p), output_size(self.width, k, s, p)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def label(self) -> str:
        return (
            f"B{self.batch} {self.height}x{self.width} C{self.channels} h{self.heads} d{self.head_dim} "
            f"N{self.queries} k{self.window} s{self.stride}"
        )

    def bytes_floor(self) -> int:
        return floors.forward_bytes(
            self.batch, (self.height, self.width), self.out_hw, self.queries, self.heads, self.channels, self.elem_bytes
        )

    def flops(self) -> int:
        return floors.forward_flops(
            self.batch, self.out_hw, self.window, self.window, self.heads, self.queries, self.head_dim
        )

    def fields(self) -> dict:
        """The shape's columns of a result row."""
        return dict(
            batch=self.batch,
            height=self.height,
            width=self.width,
            channels=self.channels,
            heads=self.heads,
            head_dim=self.head_dim,
            queries=self.queries,
            window=self.window,
            stride=self.stride,
            bytes_floor=self.bytes_floor(),
            flops=self.flops(),
        )


@dataclass(frozen=True)
class Options:
    """How providers are built: ``compile`` off skips the compiled providers (CPU smoke runs);
    ``compile_mode`` is the mode of ``paper_compiled``; ``seed`` seeds every input draw."""

    device: torch.device
    compile: bool = True
    compile_mode: str = "max-autotune"
    seed: int = 0


def _generator(opts: Options) -> torch.Generator:
    g = torch.Generator(device=opts.device)
    g.manual_seed(opts.seed)
    return g


def _randn(
    shape, opts: Options, g: torch.Generator, dtype: torch.dtype, std: float = 1.0, grad: bool = True
) -> torch.Tensor:
    t = torch.randn(shape, generator=g, device=opts.device, dtype=torch.float32).mul_(std).to(dtype)
    return t.requires_grad_(grad)


def qna_inputs(s: CoreShape, opts: Options, grad: bool = True) -> Callable[[], List[torch.Tensor]]:
    """Random ``logits, values, rpb, scale`` (rpb and scale float32, as a layer's parameters); the
    logits query-minor, as the QnA layer's fused projection lays them out."""
    g = _generator(opts)
    K, N, h = s.window * s.window, s.queries, s.heads

    def make() -> List[torch.Tensor]:
        return [
            _randn((s.batch, s.height, s.width, h, N), opts, g, s.dtype, grad=False)
            .transpose(-1, -2)
            .requires_grad_(grad),
            _randn((s.batch, s.height, s.width, h, s.head_dim), opts, g, s.dtype, grad=grad),
            _randn((K, N, h), opts, g, torch.float32, std=0.5, grad=grad),
            _randn((K, N, h), opts, g, torch.float32, std=0.5, grad=grad),
        ]

    return make


def _geometry(s: CoreShape):
    k, st, p = s.window, s.stride, s.padding
    return (k, k), (st, st), (p, p)


def _compile(fn: Callable, mode: str) -> Callable:
    return torch.compile(fn, mode=mode, dynamic=False)


def _uses_cudagraphs(mode: str, device: torch.device) -> bool:
    return device.type == "cuda" and mode in ("max-autotune", "reduce-overhead")


# ----------------------------------------------------------------------------------- providers
def qna_triton(s: CoreShape, opts: Options) -> Workload:
    ks, st, pd = _geometry(s)

    def fwd(l, v, r, a):
        return qna_attention(l, v, r, a, ks, st, pd)

    backend = resolve_backend(opts.device, s.dtype)
    notes = [] if backend == "triton" else [f"backend={backend} (the library's PyTorch path on {opts.device.type})"]
    return Workload(qna_inputs(s, opts), fwd, notes=notes)


def qna_triton_direct(s: CoreShape, opts: Options) -> Workload:
    """Our op with the direct kernels forced for every run of it, forward and backward (``qna_triton``
    takes the banded forward from 7 x 7 and the banded delta from 11 x 11 on GPUs with tensor cores):
    the two algorithms side by side."""
    ks, st, pd = _geometry(s)

    def fwd(l, v, r, a):
        return qna_attention(l, v, r, a, ks, st, pd)

    return Workload(
        qna_inputs(s, opts),
        fwd,
        notes=["direct forward and delta (forced)"],
        context=lambda: kernel_algorithm("direct"),
    )


def _paper(s: CoreShape) -> Callable:
    ks, st, pd = _geometry(s)

    def fwd(l, v, r, a):
        return paper_qna_attention(l, v, r, a, ks, st, pd, exact_fallback=False)[0]

    return fwd


def paper_eager(s: CoreShape, opts: Options) -> Workload:
    return Workload(qna_inputs(s, opts), _paper(s))


def _no_cudagraphs(mode: str) -> str:
    return "max-autotune-no-cudagraphs" if "autotune" in mode else "default"


def paper_compiled(s: CoreShape, opts: Options, cudagraphs: bool = True) -> Workload:
    """The paper's form under ``torch.compile(mode=opts.compile_mode)``.

    With CUDA graphs the inputs are marked as static addresses: a graph otherwise copies every
    non-static input into its own buffers on each replay, a cost the op inside a captured model would
    not pay. Then one input set is used (a new address would be a new graph), and memory is measured on
    a twin compiled without CUDA graphs. Should that fail, the workload falls back to the twin's mode.
    """
    if not opts.compile:
        raise Unsupported("compilation disabled (--no-compile)")
    fn = _paper(s)
    graphs = cudagraphs and _uses_cudagraphs(opts.compile_mode, opts.device)
    mode = (
        opts.compile_mode
        if graphs or not _uses_cudagraphs(opts.compile_mode, opts.device)
        else _no_cudagraphs(opts.compile_mode)
    )
    notes = [f"torch.compile(mode={mode!r})"]
    if not graphs:
        return Workload(qna_inputs(s, opts), _compile(fn, mode), compiled=True, notes=notes)
    make = qna_inputs(s, opts)

    def make_static() -> List[torch.Tensor]:
        ts = make()
        for t in ts:
            torch._dynamo.mark_static_address(t)
        return ts

    notes += [
        "inputs marked static (no per-replay input copies), one input set",
        "memory measured without CUDA graphs (a graph's private pool hides the per-call peak)",
    ]
    return Workload(
        make_static,
        _compile(fn, mode),
        memory_forward=_compile(fn, _no_cudagraphs(mode)),
        compiled=True,
        mark_step=True,
        rotate=False,
        notes=notes,
        fallback=lambda: paper_compiled(s, opts, cudagraphs=False),
    )


def naive_window(s: CoreShape, opts: Options) -> Workload:
    ks, st, pd = _geometry(s)

    def fwd(l, v, r, a):
        # it computes in the inputs' dtype, tables included
        return naive_qna_attention(l, v, r.to(l.dtype), a.to(l.dtype), ks, st, pd)

    return Workload(qna_inputs(s, opts), fwd, notes=["materialises every window (k^2 copies of the values)"])


def flex_nat(s: CoreShape, opts: Options) -> Workload:
    if s.stride != 1:
        raise Unsupported("neighbourhood attention has no stride")
    k, W, L, h, d = s.window, s.width, s.height * s.width, s.heads, s.head_dim
    cuda = opts.device.type == "cuda"
    # FlexAttention has no CPU backward: CPU (smoke) runs time the forward only.
    grad = cuda
    g = _generator(opts)

    def make() -> List[torch.Tensor]:
        qkv = [_randn((s.batch, h, L, d), opts, g, s.dtype, grad=grad) for _ in range(3)]
        return qkv + [_randn((h, k * k), opts, g, torch.float32, std=0.5, grad=grad)]

    block_mask = neighbourhood_block_mask(s.height, s.width, k, k, opts.device)
    pad = FLEX_MIN_HEAD_DIM if (cuda and d < FLEX_MIN_HEAD_DIM) else 0

    attn = _compile(flex_neighbourhood_attention, "default") if opts.compile else flex_neighbourhood_attention

    def fwd(q, kk, v, bias):
        return attn(q, kk, v, bias, block_mask, W, k, k, pad)

    notes = ["block mask built once per shape, outside the timing"]
    if pad:
        notes.append(f"head dim {d} zero-padded to {pad} (FlexAttention's CUDA kernels need >= {pad})")
    notes.append("torch.compile(mode='default')" if opts.compile else "eager FlexAttention (compilation disabled)")
    passes = PASSES if grad else ("fwd",)
    if not grad:
        notes.append("FlexAttention has no CPU backward: forward only")
    return Workload(make, fwd, passes=passes, compiled=opts.compile, notes=notes)


def swin_sdpa(s: CoreShape, opts: Options) -> Workload:
    if s.stride != 1:
        raise Unsupported("window attention has no stride")
    k, h, d = s.window, s.heads, s.head_dim
    g = _generator(opts)

    def make() -> List[torch.Tensor]:
        qkv = [_randn((s.batch, s.height, s.width, h, d), opts, g, s.dtype) for _ in range(3)]
        return qkv + [_randn(((2 * k - 1) ** 2, h), opts, g, torch.float32, std=0.5)]

    def fwd(q, kk, v, table):
        return swin_window_attention(q, kk, v, table, k, k)

    notes = [f"{k}x{k} windows, image zero-padded to a multiple of {k}"] if s.height % k or s.width % k else []
    return Workload(make, fwd, notes=notes)


def depthwise_conv(s: CoreShape, opts: Options) -> Workload:
    k, C, st, p = s.window, s.channels, s.stride, s.padding
    g = _generator(opts)

    def make() -> List[torch.Tensor]:
        x = _randn((s.batch, C, s.height, s.width), opts, g, s.dtype, grad=False)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        return [x, _randn((C, 1, k, k), opts, g, s.dtype, std=1.0 / k)]

    def fwd(x, w):
        return F.conv2d(x, w, stride=st, padding=p, groups=C)

    return Workload(make, fwd, notes=["channels-last"])


def copy(s: CoreShape, opts: Options) -> Workload:
    """A device copy moving the forward's bytes floor (half read, half written)."""
    n = s.bytes_floor() // 2

    def make() -> List[torch.Tensor]:
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=opts.device)
        return [src, torch.empty_like(src)]

    def fwd(src, dst):
        return dst.copy_(src)

    return Workload(
        make,
        fwd,
        passes=("fwd",),
        measure_memory=False,
        notes=[f"copies {n} bytes: {2 * n} moved, the forward's bytes floor"],
    )


CORE_PROVIDERS: Dict[str, Callable[[CoreShape, Options], Workload]] = {
    "copy": copy,
    "qna_triton": qna_triton,
    "qna_triton_direct": qna_triton_direct,
    "paper_eager": paper_eager,
    "paper_compiled": paper_compiled,
    "naive_window": naive_window,
    "flex_nat": flex_nat,
    "swin_sdpa": swin_sdpa,
    "depthwise_conv": depthwise_conv,
}


def build_core(name: str, s: CoreShape, opts: Options) -> Callable[[], Workload]:
    """A deferred builder (so that building errors are recorded per provider by the runner)."""
    return lambda: CORE_PROVIDERS[name](s, opts)
