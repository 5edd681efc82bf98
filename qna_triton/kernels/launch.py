"""Launchers of the fused QnA kernels (inputs validated by the caller; float16, bfloat16 and float32,
all accumulated in float32).

A :class:`Problem` is built once per call from the logits, the values, the tables and the geometry:
the sizes, the strides (pixel strides divided by their alignment), the window and the layout
constants, as the kernels' keyword arguments (every kernel names them alike). Each launch is then a
:class:`KernelLaunch` (kernel, grid, keyword arguments) made by one builder per kernel
(:func:`forward_launch`, :func:`delta_launch`, :func:`main_backward_launch`): the launchers run them,
the autotuner times them one by one, and the ahead-of-time compile check (``aot.py``) compiles them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton

from .._cache import KeyedCache, clear_all, settings, tensor_key
from ..layout import Pair, empty_query_minor, is_query_minor, output_size, query_minor
from ..tuning import KernelConfig, check_banded_tiles, get_config, halo_chunk, heuristic_config
from ..tuning.selection import forced_algorithm, target_of
from ..tuning.targets import is_rocm
from .backward import qna_bwd_delta_kernel, qna_bwd_kernel
from .banded import (
    RANGE_LIMIT,
    VDOT_BF16,
    VDOT_BF16_EMULATED,
    VDOT_BF16X3,
    VDOT_BF16X3_EMULATED,
    VDOT_TF32X3,
    qna_banded_kernel,
)
from .banded_bwd import qna_banded_bwd_kernel
from .forward import qna_fwd_kernel

__all__ = [
    "kernel_tables",
    "plan_key",
    "qna_forward",
    "qna_backward",
    "Problem",
    "KernelLaunch",
    "BackwardLaunches",
    "forward_launch",
    "delta_launch",
    "main_backward_launch",
    "backward_launches",
]


def _table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """rpb / scale ``[K, N, h]`` as the kernels read it: float32, contiguous. A float32 contiguous
    tensor (a parameter, the usual case) is read where it lies, with no copy."""
    if t is None:
        return None
    # no detach: the ops run their implementation with autograd off (inside a custom op, or an
    # autograd.Function's forward and backward)
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.contiguous()


Tables = Tuple[torch.Tensor, Optional[torch.Tensor]]


def kernel_tables(rpb: torch.Tensor, scale: Optional[torch.Tensor]) -> Tables:
    """``rpb`` and ``scale`` (None stays None) as the kernels read them (:func:`_table`): made once per
    forward (the eager route keeps them for the backward, ``qna_triton.ops``)."""
    if rpb.dtype == torch.float32 and rpb.is_contiguous():  # the usual case: no call into torch
        if scale is None or (scale.dtype == torch.float32 and scale.is_contiguous()):
            return rpb, scale
    return _table(rpb), _table(scale)


def _layout(logits: torch.Tensor, values: torch.Tensor, wide: Optional[bool] = None) -> dict:
    """The kernels' layout constants for these inputs, computed once per launcher call:

    * ``L_HN`` / ``V_HD``: each pixel's logits are an ``[h, N]`` and its values an ``[h, d]``
      contiguous block, so the kernels use compile-time offsets for them (vectorised loads, no layout
      conversions);
    * ``L_ALIGN`` / ``V_ALIGN``: :func:`_pixel_align` of each (the pixel strides are passed divided by it);
    * ``WIDE``: 64-bit query/head/dim offsets (:func:`_wide_offsets`, unless ``wide`` is given)."""
    _, _, _, N, h = logits.shape
    d = values.shape[-1]
    return dict(
        L_HN=(logits.stride(3) == 1 or N == 1) and (logits.stride(4) == N or h == 1),
        V_HD=(values.stride(4) == 1 or d == 1) and (values.stride(3) == d or h == 1),
        L_ALIGN=_pixel_align(logits),
        V_ALIGN=_pixel_align(values),
        WIDE=_wide_offsets(logits, values) if wide is None else wide,
    )


def _pixel_align(t: torch.Tensor) -> int:
    """The largest ``a`` (up to 16 bytes' worth of elements) dividing every batch/row/column stride of
    ``t``. The kernels receive those strides divided by ``a`` and multiply by the constant ``a``, so the
    compiler knows each pixel starts ``a`` elements aligned (Triton's launch specialisation only knows
    multiples of 16): a packed projection of ``h*N + h*d = 136`` columns still gets 128-bit loads."""
    if any(t.size(i) > 1 and abs(t.stride(i)) >= 2**31 for i in range(3)):
        # the kernels multiply the divided stride back in the argument's own integer type: a quotient
        # that fits 32 bits would wrap there, so such strides go undivided (64-bit arguments)
        return 1
    a = max(1, 16 // t.element_size())
    while a > 1 and any(t.size(i) > 1 and t.stride(i) % a for i in range(3)):
        a //= 2
    return a


def _pixel_strides(t: torch.Tensor, align: Optional[int] = None) -> Tuple[int, ...]:
    """Batch/row/column strides divided by ``align`` (default :func:`_pixel_align`; 0 for a dimension
    of size 1), then the two inner strides as they are."""
    a = _pixel_align(t) if align is None else align
    return (*(t.stride(i) // a if t.size(i) > 1 else 0 for i in range(3)), t.stride(3), t.stride(4))


def grad_strides(g: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """The ``(pixel, head, dim)`` element strides with which the backward kernels read an output
    gradient ``[B, Ho, Wo, h, d]`` where it lies: any layout whose pixels are evenly spaced in (batch,
    row, column) order, e.g. contiguous, the stride-0 expansion a ``sum``'s backward hands on, or heads
    and dims permuted within each pixel. None for any other (a crop of a larger map, a transposed
    image), which is copied contiguous first (:func:`readable_grad`)."""
    B, Ho, Wo, h, d = g.shape
    sb, sy, sx, sj, st = g.stride()
    sp = sx if Wo > 1 else sy if Ho > 1 else sb if B > 1 else 0
    if (Wo > 1 and sx != sp) or (Ho > 1 and sy != Wo * sp) or (B > 1 and sb != Ho * Wo * sp):
        return None
    # a pixel's offsets are computed in 32 bits, padded lanes too (masked)
    if 2 * (h * abs(sj) + d * abs(st)) >= 2**31:
        return None
    return sp, sj, st


GradArgs = Tuple[Tuple[int, int, int], int]  # the kernels' G_STRIDES and G_ALIGN


def grad_args(g: torch.Tensor) -> Optional[GradArgs]:
    """The kernels' ``G_STRIDES`` and ``G_ALIGN`` for the output gradient ``g``: its :func:`grad_strides`
    with the pixel and head strides divided by the largest alignment (up to 16 bytes' worth of elements)
    dividing both, as :func:`_pixel_align` does for the inputs, so a contiguous gradient's loads stay
    vectorised; None where ``g`` is not read in place."""
    strides = grad_strides(g)
    if strides is None:
        return None
    sp, sj, st = strides
    # a quotient that fits 32 bits but a stride that does not would wrap when multiplied back
    a = 1 if max(sp, sj) >= 2**31 else max(1, 16 // g.element_size())
    while a > 1 and (sp % a or sj % a):
        a //= 2
    return (sp // a, sj // a, st), a


def readable_grad(grad_out: torch.Tensor) -> Tuple[torch.Tensor, GradArgs]:
    """``(g, its grad_args)``: the output gradient itself where the kernels read it in place, else a
    contiguous copy."""
    args = grad_args(grad_out)
    if args is None:
        grad_out = grad_out.contiguous()
        args = grad_args(grad_out)
        if args is None:  # a pixel of over 2^30 elements
            raise ValueError(f"grad_out: a pixel of {tuple(grad_out.shape[3:])} elements is too large for the kernels")
    return grad_out, args


def _in_place(g: torch.Tensor) -> Dict[str, Any]:
    """The ``G_STRIDES`` and ``G_ALIGN`` arguments (:func:`grad_args`) of an output gradient a launch is
    built on; raises where ``g`` cannot be read in place."""
    args = grad_args(g)
    if args is None:
        raise ValueError(
            f"grad_out: strides {tuple(g.stride())} for shape {tuple(g.shape)} put its pixels unevenly;"
            " pass readable_grad(grad_out)[0]"
        )
    return dict(G_STRIDES=args[0], G_ALIGN=args[1])


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _wide_offsets(logits: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether a query/head/dim offset times its stride can pass 2^31 (e.g. a head-major input over
    2^31 elements): then those offsets are computed in 64 bits, at some cost in registers. Bounded
    with twice the sizes, since the padded lanes of a block compute (masked) addresses too."""
    _, _, _, N, h = logits.shape
    d = values.shape[-1]
    span_l = 2 * N * abs(logits.stride(3)) + 2 * h * abs(logits.stride(4))
    span_v = 2 * h * abs(values.stride(3)) + 2 * d * abs(values.stride(4))
    return max(span_l, span_v) >= 2**31


# Floating-point contraction (a*b + c as one fused multiply-add, rounded once), chosen here rather than
# left to Triton's default, which Triton 3.10 flips from on to off: the kernels' numerics, the tests'
# tolerances and the compiler reports stay what they were measured with, whichever Triton runs them.
# (The interpreter rounds every product and sum separately either way.)
FP_FUSION = True


def launch_options(cfg: KernelConfig) -> dict:
    """The compile options of a launch with ``cfg``: warps, pipeline stages and :data:`FP_FUSION`."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)


def _blocks(cfg: KernelConfig, N: int, d: int) -> dict:
    """Compile-time parameters of the direct kernels for ``cfg``."""
    return dict(
        BLOCK_P=cfg.block_p,
        BLOCK_N=triton.next_power_of_2(N),
        BLOCK_H=cfg.block_h,
        BLOCK_D=triton.next_power_of_2(d),
        **launch_options(cfg),
    )


def banded_blocks(
    cfg: KernelConfig,
    N: int,
    d: int,
    ks: Pair,
    st: Pair,
    values: torch.Tensor,
    on_gpu: Optional[bool] = None,
    delta: bool = False,
) -> dict:
    """Compile-time parameters of the banded kernel for ``cfg`` (``algo="banded"``), as the forward or
    (``delta``) the backward's delta kernel; ``on_gpu`` defaults to whether ``values`` is not a CPU
    tensor (CPU tensors run the interpreter; ``meta`` ones are compiled by ``aot.py``).

    Operand precision of the value products: the forward of bfloat16 inputs multiplies bfloat16
    operands (its output has the inputs' precision); the delta needs more, since the main backward
    kernel subtracts it from ``a t`` (a bfloat16-rounded ``D`` cost ~2 % of ``drpb`` in the tests),
    so it splits each operand into two bfloat16 parts (three products, ~2^-16); float16 and float32
    inputs take tf32x3 (float32-accurate) in both."""
    on_gpu = values.device.type != "cpu" if on_gpu is None else on_gpu
    bw, br = cfg.block_w, cfg.block_r
    check_banded_tiles(bw, br)
    bd = triton.next_power_of_2(d)
    dc = min(bd, max(1, 256 // br))  # the value product's columns: block_r x dc <= 256
    vdot = _vdot_mode(values, on_gpu, split=delta)
    return dict(
        BLOCK_W=bw,
        BLOCK_R=br,
        HALO=max(16, triton.next_power_of_2((bw - 1) * st[1] + ks[1])),
        BLOCK_DC=dc,
        BLOCK_N=triton.next_power_of_2(N),
        BLOCK_D=bd,
        BLOCK_K=min(256, triton.next_power_of_2(ks[0] * ks[1])),
        FALLBACK_P=min(bw * br, max(16, 1024 // bd)),
        VDOT=vdot,
        RANGE_LIMIT=RANGE_LIMIT,
        **launch_options(cfg),
    )


def _vdot_mode(values: torch.Tensor, on_gpu: bool, split: bool, split_fp16: bool = False) -> int:
    """The banded products' precision; ``split_fp16`` lets float16 inputs take the split bfloat16
    products too (~2^-16, well below float16's 2^-11), where tf32x3's float32 operands would spill."""
    if values.dtype != torch.bfloat16 and not (split_fp16 and values.dtype == torch.float16):
        return VDOT_TF32X3
    if split:
        return VDOT_BF16X3 if on_gpu else VDOT_BF16X3_EMULATED
    return VDOT_BF16 if on_gpu else VDOT_BF16_EMULATED


def banded_bwd_blocks(
    cfg: KernelConfig, N: int, d: int, ks: Pair, values: torch.Tensor, on_gpu: Optional[bool] = None
) -> dict:
    """Compile-time parameters of the banded main backward kernel for ``cfg`` (stride 1): tiles of
    ``block_r x block_w`` source pixels, a halo of ``block_w + k_w - 1`` output columns in chunks of
    :func:`halo_chunk`, and float32-accurate products (split bfloat16 for bfloat16 and float16 inputs,
    tf32x3 for float32), since ``v . Z - U`` and ``a da - sum P D`` cancel as ``a t - D`` does."""
    on_gpu = values.device.type != "cpu" if on_gpu is None else on_gpu
    bw, br = cfg.block_w, cfg.block_r
    check_banded_tiles(bw, br)
    bd = triton.next_power_of_2(d)
    chunk = halo_chunk(bw + ks[1] - 1)
    return dict(
        BLOCK_W=bw,
        BLOCK_R=br,
        HALO=chunk,
        HALO_CHUNKS=triton.cdiv(bw + ks[1] - 1, chunk),
        BLOCK_DC=min(bd, max(1, 128 // br)),
        BLOCK_N=triton.next_power_of_2(N),
        BLOCK_D=bd,
        BLOCK_KW=triton.next_power_of_2(ks[1]),
        FALLBACK_P=min(bw * br, max(16, 1024 // bd)),
        VDOT=_vdot_mode(values, on_gpu, split=True, split_fp16=True),
        RANGE_LIMIT=RANGE_LIMIT,
        **launch_options(cfg),
    )


@dataclass(eq=False)
class Problem:
    """One QnA problem as the kernels see it: the inputs (``logits [B,H,W,N,h]``, ``values
    [B,H,W,h,d]``; ``r`` / ``a`` the rpb and scale tables, float32 contiguous ``[K, N, h]``,
    ``a`` None without a scale), the geometry, and :attr:`args`, the keyword arguments every kernel
    takes alike, grouped as Triton allows: ``SIZES = (B, H, W, H_out, W_out, h)``, the compile-time
    ``NQ`` and ``D``, ``L_STRIDES`` / ``V_STRIDES`` (:func:`_pixel_strides`), ``WINDOW = (k_h, k_w,
    s_h, s_w, p_h, p_w)``, and the layout constants (:func:`_layout`) with ``HAS_SCALE``. Triton
    specialises each element of a tuple as it would a lone integer (1 a constant, multiples of 16
    marked), so grouping leaves the compiled code as it was (``docs/kernels.md``)."""

    logits: torch.Tensor
    values: torch.Tensor
    r: torch.Tensor
    a: Optional[torch.Tensor]
    ks: Pair
    st: Pair
    pd: Pair
    args: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        logits: torch.Tensor,
        values: torch.Tensor,
        rpb: torch.Tensor,
        scale: Optional[torch.Tensor],
        ks: Pair,
        st: Pair,
        pd: Pair,
        wide: Optional[bool] = None,
        tables: Optional[Tables] = None,
    ) -> Problem:
        """The problem of these inputs (``wide`` forces the 64-bit offset variant, see :func:`_layout`).
        Its :attr:`args` are computed once per key of the inputs' shapes, strides and dtypes (shared:
        never modified), its tables at every call."""
        ks, st, pd = tuple(ks), tuple(st), tuple(pd)
        key = (tensor_key(logits), tensor_key(values), scale is None, ks, st, pd, wide)
        args = _PROBLEM_ARGS.get(key)
        if args is None:
            args = _PROBLEM_ARGS.put(key, _problem_args(logits, values, scale is not None, ks, st, pd, wide))
        return cls.with_args(logits, values, rpb, scale, ks, st, pd, args, tables)

    @classmethod
    def with_args(
        cls, logits, values, rpb, scale, ks: Pair, st: Pair, pd: Pair, args: Dict[str, Any], tables=None
    ) -> Problem:
        """The problem of these inputs whose :attr:`args` are known (those of a cached plan); ``tables``
        (:func:`kernel_tables` of ``rpb`` and ``scale``) where the caller has them already."""
        r, a = kernel_tables(rpb, scale) if tables is None else tables
        return cls(logits, values, r, a, ks, st, pd, args)

    @property
    def sizes(self) -> Dict[str, int]:
        """``B``, ``H``, ``W``, ``Ho``, ``Wo`` (the output map), ``N``, ``h``, ``d`` by name."""
        B, H, W, Ho, Wo, h = self.args["SIZES"]
        return dict(B=B, H=H, W=W, Ho=Ho, Wo=Wo, N=self.args["NQ"], h=h, d=self.args["D"])

    @property
    def out_shape(self) -> Tuple[int, int, int, int, int]:
        """``[B, H_out, W_out, h, d]``."""
        z = self.sizes
        return z["B"], z["Ho"], z["Wo"], z["h"], z["d"]

    @property
    def stats_shape(self) -> Tuple[int, int, int, int, int]:
        """``[B, H_out, W_out, N, h]``: ``lse`` and the backward's ``D``."""
        z = self.sizes
        return z["B"], z["Ho"], z["Wo"], z["N"], z["h"]

    def inputs(self) -> Dict[str, torch.Tensor]:
        """The kernels' input pointers (``A`` stands in by ``R`` without a scale: never read then)."""
        return dict(L=self.logits, V=self.values, R=self.r, A=self.a if self.a is not None else self.r)


def _problem_args(
    logits: torch.Tensor, values: torch.Tensor, has_scale: bool, ks: Pair, st: Pair, pd: Pair, wide: Optional[bool]
) -> Dict[str, Any]:
    """:attr:`Problem.args` of these inputs."""
    B, H, W, N, h = logits.shape
    d = values.shape[-1]
    layout = _layout(logits, values, wide)
    Ho, Wo = output_size(H, ks[0], st[0], pd[0]), output_size(W, ks[1], st[1], pd[1])
    return dict(
        SIZES=(B, H, W, Ho, Wo, h),
        NQ=N,
        D=d,
        L_STRIDES=_pixel_strides(logits, layout["L_ALIGN"]),
        V_STRIDES=_pixel_strides(values, layout["V_ALIGN"]),
        WINDOW=(*ks, *st, *pd),
        HAS_SCALE=has_scale,
        **layout,
    )


_PROBLEM_ARGS = KeyedCache("problem arguments")


@dataclass(eq=False)
class KernelLaunch:
    """One kernel launch: the kernel, its grid and its keyword arguments (tensors, sizes, compile-time
    constants, launch options). ``zeroed``: buffers the kernel adds into, zeroed before every launch."""

    fn: Any
    grid: Tuple[int, ...]
    kwargs: Dict[str, Any]
    zeroed: Tuple[torch.Tensor, ...] = ()

    def __call__(self) -> None:
        for t in self.zeroed:
            t.zero_()
        _launch(self.fn, self.grid, *_positional(self.fn, self.kwargs))


def _positional(fn: Any, kwargs: Dict[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """``kwargs`` as ``fn`` takes them fastest: its parameters in order (every one is always given), and
    the launch options (``num_warps``, ...) by name. A kernel-like object that does not list its
    parameters (``arg_names``, as Triton's kernels and autotuners do) gets them all by name."""
    names = getattr(fn, "arg_names", None)
    if names is None:
        return [], dict(kwargs)
    return [kwargs[n] for n in names], {k: v for k, v in kwargs.items() if k not in names}


def _launch(fn: Any, grid: Tuple[int, ...], args: List[Any], options: Dict[str, Any]) -> None:
    """Launches ``fn`` on ``grid`` with its parameters ``args`` (in order; the first, ``L``, the logits)
    and launch ``options``, on the logits' device (Triton launches on the current device): every launch
    of the library goes through here."""
    logits = args[0] if args else options["L"]
    if logits.is_cuda and logits.device.index != torch.cuda.current_device():
        with torch.cuda.device(logits.device):
            fn[grid](*args, **options)
    else:
        fn[grid](*args, **options)


@dataclass(frozen=True, eq=False)
class LaunchTemplate:
    """A :class:`KernelLaunch` with its tensors taken out: each tensor argument is named by the buffer
    it was (``logits``, ``out``, ``rows``, ...), so that a later call of the same key launches on its
    own buffers (:meth:`launch`) without redoing what the builder derived. The arguments are kept in the
    kernel's parameter order, so a launch fills in the tensors and passes them positionally (no
    keyword dictionary per launch)."""

    fn: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]  # the kernel's parameters in order, None where a buffer goes
    slots: Tuple[Tuple[int, ...], Tuple[str, ...]]  # the buffers' places in args, and their names
    options: Dict[str, Any]  # the launch options
    zeroed: Tuple[str, ...]  # the buffers zeroed before each launch (KernelLaunch.zeroed), by name

    @classmethod
    def of(
        cls, launch: KernelLaunch, buffers: Dict[str, Any], per_call: Optional[Dict[str, str]] = None
    ) -> Optional[LaunchTemplate]:
        """The template of ``launch``, built from ``buffers``; None where a tensor cannot be named
        (two buffers are one tensor, e.g. the same tensor passed as logits and values, or an argument
        is none of them): such a launch is not cached. ``per_call``: the other arguments that each
        launch takes from its buffers, by name (kernel parameter: buffer)."""
        if not hasattr(launch.fn, "arg_names"):  # its arguments could not be filled in by position
            return None
        per_call = per_call or {}
        tensors = {name: t for name, t in buffers.items() if isinstance(t, torch.Tensor)}
        named = {id(t): name for name, t in tensors.items()}
        if len(named) != len(tensors):
            return None
        args, options = _positional(launch.fn, launch.kwargs)
        places = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
        if any(id(args[i]) not in named for i in places) or any(id(t) not in named for t in launch.zeroed):
            return None
        names = [named[id(args[i])] for i in places]
        for i, param in enumerate(launch.fn.arg_names):
            if param in per_call:
                places.append(i)
                names.append(per_call[param])
        slots = tuple(places), tuple(names)
        constants = tuple(None if i in slots[0] else v for i, v in enumerate(args))
        return cls(launch.fn, launch.grid, constants, slots, options, tuple(named[id(t)] for t in launch.zeroed))

    def launch(self, buffers: Dict[str, Optional[torch.Tensor]]) -> None:
        """The launch on ``buffers`` (named as when the template was made)."""
        for name in self.zeroed:
            buffers[name].zero_()
        args = list(self.args)
        for i, name in zip(*self.slots):
            args[i] = buffers[name]
        _launch(self.fn, self.grid, args, self.options)


def _buffers(p: Problem, **more: Optional[torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
    """The tensors a launch of ``p`` reads or writes, by the names :class:`LaunchTemplate` files them under."""
    return dict(logits=p.logits, values=p.values, r=p.r, a=p.a, **more)


def _forward_outputs(
    out_shape: Tuple[int, ...], stats_shape: Tuple[int, ...], logits: torch.Tensor, values: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward's ``out`` (the values' dtype) and ``lse`` (float32, query-minor), uninitialised."""
    out = torch.empty(out_shape, device=values.device, dtype=values.dtype)
    return out, empty_query_minor(stats_shape, device=logits.device, dtype=torch.float32)


def forward_launch(p: Problem, cfg: KernelConfig) -> Tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The forward's launch and its outputs: ``(launch, out [B,Ho,Wo,h,d] in the values' dtype, lse
    [B,Ho,Wo,N,h] float32, query-minor)``."""
    out, lse = _forward_outputs(p.out_shape, p.stats_shape, p.logits, p.values)
    if cfg.algo == "banded":
        return _banded_launch(p, cfg, False, out, lse, None), out, lse
    z = p.sizes
    grid = (triton.cdiv(z["B"] * z["Ho"] * z["Wo"], cfg.block_p), triton.cdiv(z["h"], cfg.block_h))
    kwargs = dict(p.inputs(), O=out, LSE=lse, **p.args, **_blocks(cfg, z["N"], z["d"]))
    return KernelLaunch(qna_fwd_kernel, grid, kwargs), out, lse


def delta_launch(
    p: Problem, cfg: KernelConfig, g: torch.Tensor, lse: torch.Tensor, delta: Optional[torch.Tensor] = None
) -> Tuple[KernelLaunch, torch.Tensor]:
    """The backward's delta ``D = g . o_n`` per (pixel, query, head): ``(launch, D)``, ``D`` float32
    query-minor like ``lse`` (written into ``delta`` when given)."""
    if delta is None:
        delta = empty_query_minor(p.stats_shape, device=p.logits.device, dtype=torch.float32)
    if cfg.algo == "banded":  # the forward's banded window sum, dotted with the output gradient
        return _banded_launch(p, cfg, True, g, lse, delta), delta
    z = p.sizes
    grid = (triton.cdiv(z["B"] * z["Ho"] * z["Wo"], cfg.block_p), triton.cdiv(z["h"], cfg.block_h))
    kwargs = dict(p.inputs(), G=g, LSE=lse, DELTA=delta, **p.args, **_in_place(g), **_blocks(cfg, z["N"], z["d"]))
    return KernelLaunch(qna_bwd_delta_kernel, grid, kwargs), delta


def _banded_launch(
    p: Problem,
    cfg: KernelConfig,
    delta_mode: bool,
    out_or_g: torch.Tensor,
    lse: torch.Tensor,
    delta: Optional[torch.Tensor],
) -> KernelLaunch:
    """The banded kernel as the forward (writes ``out_or_g`` = out and ``lse``) or, with ``delta_mode``,
    as the backward's delta (reads ``out_or_g`` = the output gradient and ``lse``, writes ``delta``);
    the pointers one mode does not use stand in by ones it does."""
    z = p.sizes
    blocks = banded_blocks(cfg, z["N"], z["d"], p.ks, p.st, p.values, delta=delta_mode)  # checks the tiles first
    grid = (z["B"] * triton.cdiv(z["Ho"], cfg.block_r) * triton.cdiv(z["Wo"], cfg.block_w), z["h"])
    kwargs = dict(
        p.inputs(),
        O=out_or_g,
        LSE=lse,
        G=out_or_g,
        DELTA=delta if delta_mode else lse,
        **p.args,
        **_in_place(out_or_g),  # (in the forward, its contiguous output: never read as a gradient)
        DELTA_MODE=delta_mode,
        **blocks,
    )
    return KernelLaunch(qna_banded_kernel, grid, kwargs)


# Main backward kernel: resident warps aimed at per SM (whatever num_warps a config has, so tuned configs
# compare at equal occupancy), and the most bytes its [programs, K, N, h] partial-sum rows may take.
_BWD_WARPS_PER_SM = 32
_PARTIAL_ROWS_BYTES = 64 << 20
# What an SM holds, beyond what torch reports: 64 Ki registers (every NVIDIA GPU since sm_50), allocated
# per warp in units of 256; at most 32 resident programs; 1 KiB of shared memory reserved per program.
_REGS_PER_SM, _REG_UNIT, _MAX_PROGRAMS_PER_SM, _SHARED_RESERVED = 65536, 256, 32, 1024


def resident_programs(regs: int, num_warps: int, shared_bytes: int, threads_per_sm: int, shared_per_sm: int) -> int:
    """Programs of a compiled kernel (``regs`` per thread, ``shared_bytes`` per program) that one SM
    holds at once: the least of what its registers, threads and shared memory allow (at least 1)."""
    regs_per_warp = -(-max(1, regs) * 32 // _REG_UNIT) * _REG_UNIT
    by_regs = (_REGS_PER_SM // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared_bytes + _SHARED_RESERVED) if shared_bytes else by_threads
    return max(1, min(by_regs, by_threads, by_shared, _MAX_PROGRAMS_PER_SM))


_RESIDENT: Dict[Tuple[str, int], int] = {}


def _resident_per_sm(fn, kwargs: dict, device: torch.device) -> Optional[int]:
    """:func:`resident_programs` of ``fn`` as compiled for these arguments (compiling it, as the launch
    that follows would), or None where this Triton does not expose the compiled kernel's resources, on
    AMD GPUs (the register model above is NVIDIA's: the grid then aims at ``_BWD_WARPS_PER_SM`` alone),
    and where the kernel does not compile (the launch then reports it, see :func:`_launched`)."""
    if is_rocm():
        return None
    try:
        kernel = fn.warmup(grid=(1,), **kwargs)
    except _compile_errors() as exc:
        if not _is_compile_error(exc):
            raise
        return None
    if hasattr(kernel, "result"):  # asynchronous compilation
        kernel = kernel.result()
    try:
        key = (kernel.hash, device.index or 0)
        if key not in _RESIDENT:
            kernel._init_handles()  # loads the binary: sets n_regs
            props = torch.cuda.get_device_properties(device)
            _RESIDENT[key] = resident_programs(
                kernel.n_regs,
                kernel.metadata.num_warps,
                kernel.metadata.shared,
                props.max_threads_per_multi_processor,
                props.shared_memory_per_multiprocessor,
            )
        return _RESIDENT[key]
    except AttributeError:
        return None


def _num_programs(
    num_tiles: int,
    device: torch.device,
    num_warps: int = 4,
    head_blocks: int = 1,
    row_elems: int = 1,
    resident: Optional[int] = None,
) -> int:
    """Programs (along the grid's first axis; ``head_blocks`` along the second) of the persistent
    backward kernels: enough that about ``_BWD_WARPS_PER_SM`` warps are resident per SM, but no more
    than the SM holds at once (``resident`` programs, from the compiled kernel's registers: programs
    that wait for a second wave would leave the first wave's SMs idle at the end), and few enough
    that the partial-sum buffer for ``dr``/``da`` (``row_elems`` float32 per program) stays under
    ``_PARTIAL_ROWS_BYTES``."""
    if device.type != "cuda":
        return max(1, min(num_tiles, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = max(1, _BWD_WARPS_PER_SM // num_warps)
    if resident is not None:
        per_sm = min(per_sm, resident)
    want = max(1, sms * per_sm // max(1, head_blocks))
    cap = max(1, _PARTIAL_ROWS_BYTES // (4 * max(1, row_elems)))  # one row holds every head block
    return max(1, min(num_tiles, want, cap))


@dataclass(eq=False)
class BackwardLaunches:
    """The backward of one problem: the delta launch, the main launch, and what they write
    (``dl``/``dv``, views of ``dqv`` when packed; the ``dr``/``da`` partial-sum rows)."""

    p: Problem
    delta: KernelLaunch
    main: KernelLaunch
    dl: torch.Tensor
    dv: torch.Tensor
    dqv: Optional[torch.Tensor]
    partial_sums: torch.Tensor  # [1 or 2, programs, K, N, h]: the dr (and da) partial-sum rows (_partial_rows)
    rpb_dtype: torch.dtype
    scale_dtype: Optional[torch.dtype]
    delta_cfg: Optional[KernelConfig] = None  # the chosen configs, None where given explicitly (no fallback)
    main_cfg: Optional[KernelConfig] = None
    g: Optional[torch.Tensor] = None  # the output gradient, lse and D: what a direct fallback relaunches with
    lse: Optional[torch.Tensor] = None
    delta_out: Optional[torch.Tensor] = None

    def reduce(self, shared: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(drpb, dscale or None)`` (:func:`_reduce_rows`)."""
        return _reduce_rows(self.partial_sums, self.rpb_dtype, self.scale_dtype, shared)

    def run(self, shared: bool = False) -> Tuple[torch.Tensor, ...]:
        """Both launches, then the results of :func:`qna_backward` (a banded launch that does not
        compile is replaced by the direct kernel's, see :func:`_launched`; ``shared``: see
        :func:`_reduce_rows`)."""
        p = self.p
        _, _, _, _, h = p.logits.shape
        d = p.values.shape[-1]
        if self.delta_cfg is None or not _launched("bwd_delta", self.delta, p, self.delta_cfg):
            if self.delta_cfg is None:
                self.delta()
            else:
                self.delta = delta_launch(p, heuristic_config("bwd_delta", h, d), self.g, self.lse, self.delta_out)[0]
                self.delta()
        if self.main_cfg is None or not _launched("bwd", self.main, p, self.main_cfg):
            if self.main_cfg is None:
                self.main()
            else:
                self.main, self.partial_sums = main_backward_launch(
                    p, heuristic_config("bwd", h, d), self.g, self.lse, self.delta_out, self.dl, self.dv
                )
                self.main()
        drpb, dscale = self.reduce(shared)
        return (self.dqv, drpb, dscale) if self.dqv is not None else (self.dl, self.dv, drpb, dscale)


def _reduce_rows(
    partial_sums: torch.Tensor, rpb_dtype: torch.dtype, scale_dtype: Optional[torch.dtype], shared: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(drpb, dscale or None)``, contiguous in the tables' ``[K, N, h]`` order and dtypes: the
    partial-sum rows ``[1 or 2, programs, K, N, h]`` summed over the programs in a fixed order (one
    reduction, whose output is contiguous). With ``shared``, float32
    ``drpb`` and ``dscale`` are two halves of one tensor (the eager route's autograd takes them so);
    else they never share memory (custom ops may not return aliases)."""
    sums = partial_sums.sum(1)
    grads = sums.unbind(0)
    dr = grads[0] if rpb_dtype == torch.float32 else grads[0].to(rpb_dtype)
    if scale_dtype is None:
        return dr, None
    if scale_dtype != torch.float32:
        return dr, grads[1].to(scale_dtype)
    return dr, (grads[1] if shared or dr is not grads[0] else grads[1].clone())


def main_backward_launch(
    p: Problem,
    cfg: KernelConfig,
    g: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dl: torch.Tensor,
    dv: torch.Tensor,
) -> Tuple[KernelLaunch, torch.Tensor]:
    """The main backward kernel's launch (direct, or banded at stride 1) writing ``dl`` and ``dv`` (each
    pixel's ``[h, N]`` and ``[h, d]`` block at the tensor's pixel stride ``stride(2)``, e.g. the parts
    of a packed gradient: :func:`_grad_buffers`), and its ``dr`` (and ``da``) partial-sum rows
    ``[1 or 2, programs, K, N, h]``: ``(launch, partial_sums)``."""
    launch, rows = _main_backward_launch(p, cfg, g, lse, delta, dl, dv)
    return launch, _partial_sums(rows, p.a is not None, cfg.algo == "banded")


def _partial_rows(shape: Tuple[int, ...], device: torch.device, has_scale: bool, banded: bool) -> torch.Tensor:
    """The main backward kernel's float32 rows, one allocation ``[rows, programs, K, N, h]`` passed as
    ``ROWS``: the ``dr`` partial sums, ``da``'s (with a scale) and, for the banded kernel, the scratch
    rows of each after them. The partial sums are zeroed by the launch (``KernelLaunch.zeroed``)."""
    parts = 2 if has_scale else 1
    return torch.empty((2 * parts if banded else parts, *shape), device=device, dtype=torch.float32)


def _partial_sums(rows: torch.Tensor, has_scale: bool, banded: bool) -> torch.Tensor:
    """The partial sums of :func:`_partial_rows`'s ``rows``, ``[1 or 2, programs, K, N, h]``, summed by
    :func:`_reduce_rows`."""
    return rows[: 2 if has_scale else 1] if banded else rows


def _dl_query_minor(dl: torch.Tensor) -> bool:
    """Whether the main backward kernel writes ``dl`` query-minor (a packed gradient's ``[B, H, W, h*N]``
    part, or a query-minor ``[B, H, W, N, h]``; also where ``N`` or ``h`` is 1 and the two orders are
    one) rather than with each pixel's ``[N, h]`` block contiguous."""
    return dl.dim() == 4 or is_query_minor(dl) or dl.shape[-1] == 1 or dl.shape[-2] == 1


def _main_backward_launch(
    p: Problem,
    cfg: KernelConfig,
    g: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dl: torch.Tensor,
    dv: torch.Tensor,
) -> Tuple[KernelLaunch, torch.Tensor]:
    """:func:`main_backward_launch`, with the whole allocation of :func:`_partial_rows` it writes."""
    banded = cfg.algo == "banded"
    if banded and p.st != (1, 1):
        raise ValueError(f"the banded backward kernel needs stride 1, got stride={p.st}")
    z = p.sizes
    B, H, W, N, h, d, K = z["B"], z["H"], z["W"], z["N"], z["h"], z["d"], p.ks[0] * p.ks[1]
    if banded:
        fn, head_blocks, row_elems = qna_banded_bwd_kernel, h, 2 * K * N * h  # + the scratch rows
        num_tiles = B * triton.cdiv(H, cfg.block_r) * triton.cdiv(W, cfg.block_w)
        blocks = banded_bwd_blocks(cfg, N, d, p.ks, p.values)
    else:
        fn, head_blocks, row_elems = qna_bwd_kernel, triton.cdiv(h, cfg.block_h), K * N * h
        num_tiles = triton.cdiv(B * H * W, cfg.block_p)
        blocks = _blocks(cfg, N, d)
    kwargs = dict(
        p.inputs(),
        G=g,
        LSE=lse,
        DELTA=delta,
        DL=dl,
        DV=dv,
        **p.args,
        **_in_place(g),
        NUM_TILES=num_tiles,
        DL_PIX_STRIDE=dl.stride(2),
        DV_PIX_STRIDE=dv.stride(2),
        DL_QM=_dl_query_minor(dl),
        **blocks,
    )

    def parts(rows: Dict[str, torch.Tensor], progs: int) -> dict:
        return dict(kwargs, **rows, TILES_PER_PROGRAM=triton.cdiv(num_tiles, progs))

    resident = None
    if p.logits.is_cuda:  # the compiled kernel's registers bound the programs resident at once
        with _on_device(p.logits):
            resident = _resident_per_sm(fn, parts(dict(ROWS=delta), 1), p.logits.device)
    progs = _num_programs(num_tiles, p.logits.device, cfg.num_warps, head_blocks, row_elems, resident)
    rows = _partial_rows((progs, K, N, h), p.logits.device, p.a is not None, banded)
    # the kernel adds into its partial sums (the banded kernel's scratch rows it writes before reading)
    zeroed = (_partial_sums(rows, p.a is not None, banded),)
    return KernelLaunch(fn, (progs, head_blocks), parts(dict(ROWS=rows), progs), zeroed), rows


def backward_launches(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    lse: torch.Tensor,
    ks: Pair,
    st: Pair,
    pd: Pair,
    config: Optional[KernelConfig] = None,
    delta_config: Optional[KernelConfig] = None,
    packed_grad: bool = False,
    tables: Optional[Tables] = None,
    key: Optional[tuple] = None,
) -> BackwardLaunches:
    """The launches of :func:`qna_backward` (nothing launched yet; every check done), described afresh.
    Where the configs are chosen (not given) and ``key`` (:func:`_plan_key`) is given, the description
    is filed under it (:class:`_BackwardPlan`), which later calls of the key run instead."""
    ks, st, pd = tuple(ks), tuple(st), tuple(pd)
    g, g_args = readable_grad(grad_out)
    lse = query_minor(lse)
    p = Problem.of(logits, values, rpb, scale, ks, st, pd, tables=tables)
    # explicit configs (the autotuner's candidates) run as given, or raise: only chosen ones fall back
    cfg = config or _direct_if_uncompilable("bwd", p, get_config("bwd", logits, values, ks, st, pd))
    dcfg = delta_config or _direct_if_uncompilable("bwd_delta", p, get_config("bwd_delta", logits, values, ks, st, pd))
    delta, delta_out = delta_launch(p, dcfg, g, lse)
    dqv, dl, dv = _grad_buffers(logits, values, packed_grad)
    main, rows = _main_backward_launch(p, cfg, g, lse, delta_out, dl, dv)
    partial_sums = main.zeroed[0]  # the rows themselves, or (banded) the view of them without the scratch
    if key is not None and config is None and delta_config is None:
        buffers = _buffers(
            p, g=g, lse=lse, delta=delta_out, dl=dl, dv=dv, rows=rows, g_strides=g_args[0], g_align=g_args[1]
        )
        if partial_sums is not rows:
            buffers["partial_sums"] = partial_sums
        per_call = {"G_STRIDES": "g_strides", "G_ALIGN": "g_align"}  # the output gradient's layout, each call's
        templates = LaunchTemplate.of(delta, buffers, per_call), LaunchTemplate.of(main, buffers, per_call)
        if None not in templates:
            if dqv is not None:
                grads = ((dqv.shape, dqv.stride()), (dl.shape[-1], dv.shape[-1]))
            else:
                grads = ((dl.shape, dl.stride()), (dv.shape, dv.stride()))
            layouts = (delta_out.shape, delta_out.stride()), (rows.shape, rows.stride()), grads
            contiguous = torch.empty(p.out_shape, device="meta", dtype=g.dtype)
            g_layout = contiguous.stride(), grad_args(contiguous)
            _BACKWARD_PLANS.put(key, _BackwardPlan(p.args, (ks, st, pd), dcfg, cfg, *templates, *layouts, g_layout))
    return BackwardLaunches(
        p,
        delta,
        main,
        dl,
        dv,
        dqv,
        partial_sums,
        rpb.dtype,
        scale.dtype if scale is not None else None,
        None if delta_config else dcfg,
        None if config else cfg,
        g,
        lse,
        delta_out,
    )


def _grad_buffers(
    logits: torch.Tensor, values: torch.Tensor, packed: bool
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(dqv, dl, dv)``, what the main backward kernel writes (each pixel's block at the tensor's
    pixel stride): with ``packed``, ``dl`` and ``dv`` are the two parts of one ``dqv [B,H,W,h*N + h*d]``;
    else ``dqv`` is None, ``dl`` a ``[B,H,W,N,h]`` in the logits' layout (query-minor for query-minor
    logits, else contiguous) and ``dv`` a ``[B,H,W,h,d]``, the gradients as returned."""
    B, H, W, N, h = logits.shape
    d = values.shape[-1]
    if packed:
        dqv = torch.empty((B, H, W, N * h + h * d), device=logits.device, dtype=logits.dtype)
        return (dqv, *dqv.split((N * h, h * d), -1))
    if is_query_minor(logits):
        dl = empty_query_minor((B, H, W, N, h), device=logits.device, dtype=logits.dtype)
    else:
        dl = torch.empty((B, H, W, N, h), device=logits.device, dtype=logits.dtype)
    return None, dl, torch.empty((B, H, W, h, d), device=values.device, dtype=values.dtype)


# ---------------------------------------------------------------------- launches described once per key
@dataclass(frozen=True, eq=False)
class _ForwardPlan:
    """The forward of one key (:func:`_plan_key`) as described at its first call: :meth:`run` allocates
    the outputs and launches, with nothing derived again."""

    args: Dict[str, Any]  # Problem.args
    geometry: Tuple[Pair, Pair, Pair]  # ks, st, pd
    cfg: KernelConfig
    launch: LaunchTemplate
    out: Tuple[Tuple[int, ...], Tuple[int, ...]]  # the output's shape and (contiguous) strides
    lse: Tuple[Tuple[int, ...], Tuple[int, ...]]  # lse's shape and (query-minor) strides

    def run(self, logits: torch.Tensor, values: torch.Tensor, r: torch.Tensor, a: Optional[torch.Tensor]):
        """:func:`qna_forward` of inputs of this key, ``r`` and ``a`` their tables."""
        # empty_strided with the strides known: a third of torch.empty's host time
        out = torch.empty_strided(*self.out, device=values.device, dtype=values.dtype)
        lse = torch.empty_strided(*self.lse, device=logits.device, dtype=torch.float32)
        try:
            self.launch.launch(dict(logits=logits, values=values, r=r, a=a, out=out, lse=lse))
        except _compile_errors() as exc:
            p = Problem(logits, values, r, a, *self.geometry, self.args)
            _not_compiled("fwd", exc, p, self.cfg)
            launch, out, lse = forward_launch(p, heuristic_config("fwd", p.sizes["h"], p.sizes["d"]))
            launch()
        return out, lse


@dataclass(frozen=True, eq=False)
class _BackwardPlan:
    """The backward of one key, as :class:`_ForwardPlan` is the forward's."""

    args: Dict[str, Any]  # Problem.args
    geometry: Tuple[Pair, Pair, Pair]
    delta_cfg: KernelConfig
    main_cfg: KernelConfig
    delta: LaunchTemplate
    main: LaunchTemplate
    delta_out: Tuple[Tuple[int, ...], Tuple[int, ...]]  # D's shape and (query-minor) strides
    rows: Tuple[Tuple[int, ...], Tuple[int, ...]]  # the partial-sum rows' allocation (_partial_rows)
    grads: Tuple[Tuple[Any, ...], Tuple[Any, ...]]  # dqv's layout and its split, or dl's and dv's layouts
    g_layout: Tuple[Tuple[int, ...], GradArgs]  # a contiguous output gradient's strides, its grad_args
    banded: bool = False  # the main kernel is the banded one (scratch rows beside the partial sums)

    def __post_init__(self) -> None:
        object.__setattr__(self, "banded", self.main_cfg.algo == "banded")

    def run(
        self,
        grad_out: torch.Tensor,
        logits: torch.Tensor,
        values: torch.Tensor,
        rpb: torch.Tensor,
        scale: Optional[torch.Tensor],
        lse: torch.Tensor,
        tables: Tables,
        packed: bool,
        shared: bool,
    ) -> Tuple[torch.Tensor, ...]:
        """:func:`qna_backward` of inputs of this key, ``tables`` those of ``rpb`` and ``scale``."""
        if grad_out.stride() == self.g_layout[0]:  # contiguous: the usual case
            g, g_args = grad_out, self.g_layout[1]
        else:  # read in place where it can be (e.g. the stride-0 gradient of a sum), else copied
            g, g_args = readable_grad(grad_out)
        if lse.stride() != self.delta_out[1]:  # D is stored as lse must be
            lse = query_minor(lse)
        r, a = tables
        dev = logits.device
        delta_out = torch.empty_strided(*self.delta_out, device=dev, dtype=torch.float32)
        # every buffer allocated with its known strides (empty_strided: a third of torch.empty's host time)
        if packed:
            dqv = torch.empty_strided(*self.grads[0], device=dev, dtype=logits.dtype)
            dl, dv = dqv.split(self.grads[1], -1)
        else:
            dqv = None
            dl = torch.empty_strided(*self.grads[0], device=dev, dtype=logits.dtype)
            dv = torch.empty_strided(*self.grads[1], device=dev, dtype=values.dtype)
        rows = torch.empty_strided(*self.rows, device=dev, dtype=torch.float32)
        buffers = dict(
            logits=logits,
            values=values,
            r=r,
            a=a,
            g=g,
            lse=lse,
            delta=delta_out,
            dl=dl,
            dv=dv,
            rows=rows,
            g_strides=g_args[0],
            g_align=g_args[1],
        )
        if self.banded:  # the main launch zeroes the partial sums, not the scratch rows after them
            buffers["partial_sums"] = _partial_sums(rows, a is not None, True)
        kernel = "bwd_delta"
        try:
            self.delta.launch(buffers)
            kernel = "bwd"
            self.main.launch(buffers)
        except _compile_errors() as exc:
            cfg = self.delta_cfg if kernel == "bwd_delta" else self.main_cfg
            _not_compiled(kernel, exc, Problem(logits, values, r, a, *self.geometry, self.args), cfg)
            # described afresh without that variant (the caches were emptied)
            launches = backward_launches(g, logits, values, rpb, scale, lse, *self.geometry, None, None, packed, tables)
            return launches.run(shared)
        if shared and not self.banded and rpb.dtype == torch.float32 and (a is None or scale.dtype == torch.float32):
            sums = rows.sum(1).unbind(0)  # _reduce_rows' usual case, inline
            drpb, dscale = sums[0], (None if a is None else sums[1])
        else:
            sums = buffers["partial_sums"] if self.banded else rows
            drpb, dscale = _reduce_rows(sums, rpb.dtype, None if a is None else scale.dtype, shared)
        return (dqv, drpb, dscale) if packed else (dl, dv, drpb, dscale)


_FORWARD_PLANS = KeyedCache("forward launches")
_BACKWARD_PLANS = KeyedCache("backward launches")


def forward_plan(key: tuple) -> Optional[_ForwardPlan]:
    """The forward's plan filed under ``key`` (:func:`plan_key`), where one is."""
    return _FORWARD_PLANS.get(key)


def backward_plan(key: tuple) -> Optional[_BackwardPlan]:
    """The backward's plan filed under ``key`` (:func:`plan_key`), where one is."""
    return _BACKWARD_PLANS.get(key)


def _plan_key(kind: Any, logits, values, rpb, scale, ks: Pair, st: Pair, pd: Pair) -> tuple:
    """:func:`plan_key` of these tensors."""
    return plan_key(kind, tuple(map(tensor_key, (logits, values, rpb, scale))), ks, st, pd)


def plan_key(kind: Any, metas: tuple, ks: Pair, st: Pair, pd: Pair) -> tuple:
    """What a chosen launch depends on: ``kind`` (``"fwd"``, or ``("bwd", packed_grad)``), the
    :func:`tensor_key` of logits, values, rpb and scale (``metas``), the geometry, the environment's
    settings and a forced algorithm (:func:`~qna_triton.tuning.kernel_algorithm`). The tuned files, the
    variants found not to compile and the GPU are read when a plan is made; a change of the first two
    empties the plans (``tuning.clear_cache``, :func:`_not_compiled`)."""
    return (kind, settings(), forced_algorithm(), metas, tuple(ks), tuple(st), tuple(pd))


# ------------------------------------------------------------- a banded variant that does not compile
# The target table keeps the heuristic off the banded variants a target's compiler is known to reject,
# but a tuned file, a forced algorithm or a compiler release not checked yet can still choose one: then
# the problem runs the direct algorithm (same results up to rounding), with one warning per (kernel,
# target, Triton release), and the variant is not compiled again in this process.
_UNCOMPILABLE: Dict[tuple, str] = {}
_WARNED: set = set()


def _compile_errors() -> Tuple[type, ...]:
    """The exception types a failed compile raises: Triton's compilation and resource errors, and a
    RuntimeError (see :func:`_is_compile_error` for which)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return CompilationError, OutOfResources, RuntimeError


def _is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a kernel did not compile: Triton's compilation, resource and assembler
    errors, or the plain RuntimeError of a failed MLIR pass pipeline or assembler (``PassManager::run
    failed``, ``ptxas``). Any other error (a device error, out of memory) is not one, and propagates."""
    import triton.runtime.errors as runtime_errors
    from triton.compiler.errors import CompilationError

    triton_errors = tuple(
        getattr(runtime_errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(runtime_errors, name)
    )
    if isinstance(exc, (CompilationError, *triton_errors)):
        return True
    msg = str(exc)
    return type(exc) is RuntimeError and ("PassManager" in msg or "ptxas" in msg.lower())


def _variant_key(kernel: str, p: Problem, cfg: KernelConfig) -> tuple:
    """What decides a compiled variant: the kernel, its config, the dtypes and every compile-time
    argument but the sizes and strides (the device too: each GPU compiles its own)."""
    args = {k: v for k, v in p.args.items() if k not in ("SIZES", "L_STRIDES", "V_STRIDES")}
    return (
        kernel,
        cfg,
        p.logits.dtype,
        p.values.dtype,
        p.logits.device,
        p.args["SIZES"][-1],
        tuple(sorted(args.items())),
    )


def _direct_if_uncompilable(kernel: str, p: Problem, cfg: KernelConfig) -> KernelConfig:
    """``cfg``, or the direct heuristic config when ``cfg`` is a banded variant that failed to compile."""
    if cfg.algo == "banded" and _variant_key(kernel, p, cfg) in _UNCOMPILABLE:
        return heuristic_config(kernel, p.sizes["h"], p.sizes["d"])
    return cfg


def _launched(kernel: str, launch: KernelLaunch, p: Problem, cfg: KernelConfig) -> bool:
    """Runs ``launch``; False (:func:`_not_compiled`) where it is a banded variant this target's compiler
    rejects, so that the caller runs the direct algorithm instead. Other errors propagate."""
    try:
        launch()
        return True
    except _compile_errors() as exc:
        _not_compiled(kernel, exc, p, cfg)
        return False


def _not_compiled(kernel: str, exc: BaseException, p: Problem, cfg: KernelConfig) -> None:
    """Handles ``exc``, raised by a launch of ``kernel`` with ``cfg``: re-raises it unless it says that a
    banded variant does not compile (:func:`_is_compile_error`); then files the variant as uncompilable,
    empties the caches (the launches described with it are chosen afresh, without it) and warns once
    per (kernel, target, Triton release)."""
    if cfg.algo != "banded" or not _is_compile_error(exc):
        raise exc
    _UNCOMPILABLE[_variant_key(kernel, p, cfg)] = f"{type(exc).__name__}: {exc}"
    clear_all()
    target = target_of(p.logits.device).describe()
    tag = (kernel, target, triton.__version__)
    if tag not in _WARNED:
        _WARNED.add(tag)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"qna_triton: the banded {kernel} kernel does not compile for {target} under Triton "
            f"{triton.__version__} ({type(exc).__name__}: {first}); this problem runs the direct "
            f"algorithm instead",
            RuntimeWarning,
            stacklevel=4,
        )


def qna_forward(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    ks: Pair,
    st: Pair,
    pd: Pair,
    config: Optional[KernelConfig] = None,
    tables: Optional[Tables] = None,
    key: Optional[tuple] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out [B,Ho,Wo,h,d] in the values' dtype, lse [B,Ho,Wo,N,h] float32)``; ``lse``
    is stored query-minor (:func:`query_minor`). ``tables``: :func:`kernel_tables` of ``rpb`` and
    ``scale``, where the caller made them; ``key``: :func:`plan_key` of the inputs, where the caller
    has it."""
    if config is not None:  # an explicit config (the autotuner's candidates) runs as given, or raises
        launch, out, lse = forward_launch(Problem.of(logits, values, rpb, scale, ks, st, pd, tables=tables), config)
        launch()
        return out, lse
    ks, st, pd = tuple(ks), tuple(st), tuple(pd)
    if key is None:
        key = _plan_key("fwd", logits, values, rpb, scale, ks, st, pd)
    plan = _FORWARD_PLANS.get(key)
    if plan is not None:
        return plan.run(logits, values, *(kernel_tables(rpb, scale) if tables is None else tables))
    p = Problem.of(logits, values, rpb, scale, ks, st, pd, tables=tables)
    cfg = _direct_if_uncompilable("fwd", p, get_config("fwd", logits, values, ks, st, pd))
    launch, out, lse = forward_launch(p, cfg)
    template = LaunchTemplate.of(launch, _buffers(p, out=out, lse=lse))
    if template is not None:
        geometry = (ks, st, pd)
        plan = _ForwardPlan(p.args, geometry, cfg, template, (out.shape, out.stride()), (lse.shape, lse.stride()))
        _FORWARD_PLANS.put(key, plan)
    if not _launched("fwd", launch, p, cfg):
        launch, out, lse = forward_launch(p, heuristic_config("fwd", p.sizes["h"], p.sizes["d"]))
        launch()
    return out, lse


def qna_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    lse: torch.Tensor,
    ks: Pair,
    st: Pair,
    pd: Pair,
    config: Optional[KernelConfig] = None,
    delta_config: Optional[KernelConfig] = None,
    packed_grad: bool = False,
    tables: Optional[Tables] = None,
    key: Optional[tuple] = None,
    shared: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Fused backward, deterministic: ``(dlogits, dvalues, drpb, dscale or None)``, or with
    ``packed_grad`` ``(dqv, drpb, dscale or None)`` where ``dqv [B, H, W, h*N + h*d]`` holds both
    gradients side by side (the gradient of a fused logits-and-values projection, written once; the
    logits part query-minor, as in the QnA layer's packed projection). ``dlogits`` has the logits'
    layout: query-minor for query-minor logits, else contiguous.
    ``tables``: :func:`kernel_tables` of ``rpb`` and ``scale``, where the caller kept the forward's;
    ``key``: :func:`plan_key` of the inputs, where the caller has it; ``shared``: ``drpb`` and
    ``dscale`` may share one tensor (:func:`_reduce_rows`)."""
    if config is None and delta_config is None:
        ks, st, pd = tuple(ks), tuple(st), tuple(pd)
        if key is None:
            key = _plan_key(("bwd", packed_grad), logits, values, rpb, scale, ks, st, pd)
        plan = _BACKWARD_PLANS.get(key)
        if plan is not None:
            tables = kernel_tables(rpb, scale) if tables is None else tables
            return plan.run(grad_out, logits, values, rpb, scale, lse, tables, packed_grad, shared)
    launches = backward_launches(
        grad_out, logits, values, rpb, scale, lse, ks, st, pd, config, delta_config, packed_grad, tables, key
    )
    return launches.run(shared)
