"""QnA forward (and the backward's delta) on tensor cores: the window sum as banded matrix products.

For one head and query ``n``, with a shift ``c`` shared by the whole tile, the forward factorises
(``docs/backward.md``, "The forward and what it saves")::

    exp(l[src] + r[o] - lse[i]) = exp(l[src] - c) * exp(r[o] - r_max) * exp(c + r_max - lse[i])

so for a program owning ``BLOCK_R`` output rows x ``BLOCK_W`` output columns, and one window row ``dy``:

* ``E[c, r] = exp(l[row r + dy, halo column c] - c)``: one exponential per *source* pixel,
* ``T'[c, i] = exp(r[dy, c - i*s] - r_max)`` (0 off the band ``0 <= c - i*s < k_w``), ``T = a * T'``:
  ``[halo, W]``, the same banded matrix for every tile, built from the tiny bias and scale tables,
* ``S[r, i] += E @ T'`` (the softmax denominators, ``[R, halo] x [halo, W]``) and
  ``Y[(r, d), i] += (E * v) @ T`` (``[R*d, halo] x [halo, W]``: the tile's rows and the head dim are the
  product's rows, which makes a head dim of 8 a 128-row operand; a warpgroup ``wgmma`` on sm_90).

Then ``out = sum_n Y_n / S_n`` and ``lse_n = c + r_max + log S_n``: no exponential per (pixel, offset)
pair, and the products run on tensor cores. The shift is exact algebra, but every term must stay a
normal float: a tile whose logits (plus bias) span more than ``RANGE_LIMIT`` takes the direct
algorithm of :mod:`forward` instead (decided per program, so the result is exact either way).

The backward's ``D[n, i] = sum_o a P t = g[i] . (sum_o a P v)`` (``backward.py``) is the same window
sum dotted with the output gradient: with ``DELTA_MODE`` the kernel computes ``Y`` as above and writes
``D = g . Y * exp(c + r_max - lse)`` from the saved ``lse`` (no denominator product), so ``D`` matches
the ``P`` the main backward kernel recomputes.

Precision: the forward of bfloat16 inputs takes bfloat16 operands for the value products (``E``
rounded to bfloat16, times the values, rounded again: the inputs' own precision) and tf32 for the
denominators; float16 and float32 inputs take ``tf32x3`` for both (float32-accurate; float16 operands
would underflow, as ``E * v`` can leave float16's range). The delta must be float32-accurate, since the
main backward kernel subtracts it from ``a t`` (a bfloat16 ``D`` put ~2 % of error into ``drpb``): its
bfloat16 products split each operand into two bfloat16 parts (three products), others take tf32x3.

A NaN or infinity in the products would spread along the tile's rows (``0 * NaN`` off the band): a tile
whose result is not finite is redone by the direct algorithm, so non-finite inputs reach exactly the
outputs the direct kernels give them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backward import _delta_window
from .forward import (
    _element_strides,
    _exp,
    _fwd_window,
    _grad_offsets,
    _grad_strides,
    _head_blocks,
    _nh_contiguous,
    _store_out_lse,
)

# Largest spread (logits + bias, natural log units) one shift may cover: every term of the products then
# stays above exp(-60) ~ 1e-26 of the shift, a normal number in float32, tf32 and bfloat16, so nothing
# underflows; flushed products of values below ~1e-12 could only cost ~1e-12 absolute error.
RANGE_LIMIT = 60.0

# value-product operand modes (VDOT)
VDOT_BF16 = 0  # bfloat16 operands, float32 accumulation (bfloat16 inputs on a GPU)
VDOT_TF32X3 = 1  # float32 operands, three tf32 products (float16 / float32 inputs)
# the interpreter: its bf16 dot is wrong and its bf16 conversion truncates, so operands are rounded to
# nearest by hand (_round_bf16) and multiplied in float32
VDOT_BF16_EMULATED = 2  # bfloat16-rounded operands multiplied in float32
VDOT_BF16X3 = 3  # float32 operands as bfloat16 high + low parts, three products (~2^-16 relative error)
VDOT_BF16X3_EMULATED = 4  # the same split, multiplied in float32 (the interpreter)


@triton.jit
def _split_bf16(x):
    """``x`` (float32) as ``hi + lo``, both bfloat16: 16 significant bits."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _round_bf16(x):
    """``x`` (float32) rounded to the nearest bfloat16 (ties to even), as float32. For the interpreter,
    whose own conversion to bfloat16 truncates (Triton 3.6), where a GPU rounds to nearest."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _split_bf16_emulated(x):
    """:func:`_split_bf16` as float32 values, rounding as a GPU does (:func:`_round_bf16`)."""
    hi = _round_bf16(x)
    return hi, _round_bf16(x - hi)


@triton.jit
def _vdot(t, x, acc, VDOT: tl.constexpr):
    if VDOT == 0:
        return tl.dot(t.to(tl.bfloat16), x.to(tl.bfloat16), acc)
    elif VDOT == 2:
        return tl.dot(_round_bf16(t), _round_bf16(x), acc, input_precision="ieee")
    elif VDOT == 3:
        # hi*hi + lo*hi + hi*lo: the lo*lo term is below 2^-16 of the product
        th, tlo = _split_bf16(t)
        xh, xlo = _split_bf16(x)
        acc = tl.dot(th, xh, acc)
        acc = tl.dot(tlo, xh, acc)
        return tl.dot(th, xlo, acc)
    elif VDOT == 4:
        th, tlo = _split_bf16_emulated(t)
        xh, xlo = _split_bf16_emulated(x)
        acc = tl.dot(th, xh, acc, input_precision="ieee")
        acc = tl.dot(tlo, xh, acc, input_precision="ieee")
        return tl.dot(th, xlo, acc, input_precision="ieee")
    else:
        return tl.dot(t, x, acc, input_precision="tf32x3")


@triton.jit
def _sdot(e, tp, acc, VDOT: tl.constexpr):
    """The denominators' product: tf32 for bfloat16 inputs (errors far below theirs), else tf32x3."""
    if VDOT == 0:
        return tl.dot(e, tp, acc, input_precision="tf32")
    else:
        return tl.dot(e, tp, acc, input_precision="tf32x3")


@triton.jit
def _band_t(R, A, dy, rmax, qh, offs_i, offs_c, KW, SW, NH, HAS_SCALE: tl.constexpr):
    """The banded ``[halo, W]`` matrices of window row ``dy``: ``T' = exp(r - r_max)`` and ``T = a T'``."""
    return _band_at(R, A, dy, offs_c[:, None] - offs_i[None, :] * SW, rmax, qh, KW, NH, HAS_SCALE)


@triton.jit
def _band_at(R, A, dy, dx, rmax, qh, KW, NH, HAS_SCALE: tl.constexpr):
    """``T' = exp(r[dy, dx] - r_max)`` and ``T = a T'`` for a matrix of window columns ``dx`` (0 off
    ``0 <= dx < k_w``): the band of either orientation (forward: halo source x output; main backward
    kernel: halo output x source)."""
    on = (dx >= 0) & (dx < KW)
    idx = (dy * KW + dx) * NH + qh
    tp = _exp(tl.load(R + idx, mask=on, other=float("-inf")) - rmax)
    if HAS_SCALE:
        return tp, tp * tl.load(A + idx, mask=on, other=0.0)
    else:
        return tp, tp


@triton.jit
def _sub_tile(q0, b, rb, cb, rows, cols, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, SUB: tl.constexpr):
    """Pixels ``q0 .. q0 + SUB`` (row-major) of the ``BLOCK_R x BLOCK_W`` tile ``(rb, cb)`` of image
    ``b`` in a ``rows x cols`` map, as the exact fallbacks walk a tile: ``(row, column, mask, flat
    index)``, 64-bit."""
    q = q0 + tl.arange(0, SUB)
    py = (rb * BLOCK_R + q // BLOCK_W).to(tl.int64)
    px = (cb * BLOCK_W + q % BLOCK_W).to(tl.int64)
    return py, px, (py < rows) & (px < cols), (b * rows + py) * cols + px


@triton.jit
def _pick(vec, offs, n):
    """``vec[n]`` for a runtime ``n`` (a masked sum: Triton has no dynamic indexing of registers)."""
    return tl.sum(tl.where(offs == n, vec, 0.0), axis=0)


@triton.jit
def _any_nonfinite2(x):
    """1 if the 2-D ``x`` holds a NaN or an infinity, else 0."""
    return tl.max(tl.max((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=1), axis=0)


@triton.jit
def _head_offsets(j, sl_j, sv_j, WIDE: tl.constexpr):
    """Head ``j``'s offsets into a pixel's logits and values (64-bit for tensors of 2^31+ elements)."""
    if WIDE:
        return j.to(tl.int64) * sl_j, j.to(tl.int64) * sv_j
    else:
        return j * sl_j, j * sv_j


@triton.jit
def _query_offsets(n, j, NQ, sl_n, jl, L_HN: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of the logits of queries ``n`` (a runtime scalar or a block) of head ``j`` in a pixel;
    ``L_HN``: the layer's query-minor layout, one head's queries adjacent."""
    if L_HN:
        return j * NQ + n
    else:
        if WIDE:  # (tl.cast: a query loop's n is a Python int in the interpreter)
            return tl.cast(n, tl.int64) * sl_n + jl
        else:
            return n * sl_n + jl


@triton.jit
def _value_offsets(dd, j, D: tl.constexpr, jv, sv_t, V_HD: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of head ``j``'s value components ``dd`` in a pixel; ``V_HD``: contiguous ``[h, d]``."""
    if V_HD:
        return j * D + dd
    else:
        if WIDE:
            return jv + dd.to(tl.int64) * sv_t
        else:
            return jv + dd * sv_t


@triton.jit
def _finite_min(x):
    """``x`` with -inf made +inf, for a minimum over the finite values."""
    return tl.where(x == float("-inf"), float("inf"), x)


@triton.jit
def _range_or_zero(mx, mn):
    """A (max, min) over finite values, (0, 0) where there was none (any shift works there)."""
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, tl.where(mn == float("inf"), mx, mn)


@triton.jit
def _too_wide(lmax, lmin, rmax, rmin, offs_n, NQ, RANGE_LIMIT: tl.constexpr):
    """1 if some query's logit + bias spread passes ``RANGE_LIMIT`` (one shift would underflow)."""
    spread = tl.where(offs_n < NQ, (lmax - lmin) + (rmax - rmin), 0.0)
    return (tl.max(spread, axis=0) > RANGE_LIMIT).to(tl.int32)


@triton.jit
def _out_offsets(pix, j, dd, HEADS, D: tl.constexpr):
    """``[R, DC, W]`` offsets of a value chunk of the output (or its gradient) ``[B, Ho, Wo, h, d]``."""
    return (pix * (HEADS * D) + j * D)[:, None, :] + dd[None, :, None]


@triton.jit
def _out_mask(pix_ok, dd, D: tl.constexpr):
    return pix_ok[:, None, :] & (dd < D)[None, :, None]


@triton.jit
def _weighted_values(e, vt, VDOT: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr):
    """The value product's operand ``E v`` (``[R, halo]`` exponentials times ``[R, DC, halo]`` values)
    as ``[R*DC, halo]``, in the precision of ``VDOT``: bfloat16 products as packed multiplies without
    conversions; in the interpreter the same roundings in float32 (``E`` rounded here, ``E v`` in
    :func:`_vdot`); float32 otherwise."""
    if VDOT == 0:
        return tl.reshape(e.to(tl.bfloat16)[:, None, :] * vt, (ROWS, HALO))
    elif VDOT == 2:
        return tl.reshape(_round_bf16(e)[:, None, :] * vt.to(tl.float32), (ROWS, HALO))
    else:
        return tl.reshape(e[:, None, :] * vt.to(tl.float32), (ROWS, HALO))


@triton.jit
def _direct_delta_pixels(
    L,
    V,
    R,
    A,
    G,
    LSE,
    DELTA,
    b,
    y0,
    x0,
    offs_p,
    mask_p,
    H,
    W,
    KH,
    KW,
    nh_mask,
    nh_l,
    nh_r,
    nh_t,
    hd_mask,
    hd_v,
    g_hd,
    sg_p,
    NH,
    sl_b,
    sl_y,
    sl_x,
    sv_b,
    sv_y,
    sv_x,
    HAS_SCALE: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward's ``D`` of ``P`` output pixels (one head) by the direct algorithm: the banded
    kernel's exact fallback in its delta mode (``g_hd``, ``sg_p``: the output gradient's offsets,
    :func:`~qna_triton.kernels.forward._grad_offsets`)."""
    pnh = mask_p[:, None, None] & nh_mask[None, :, :]
    g = tl.load(
        G + offs_p[:, None, None] * sg_p + g_hd[None, :, :],
        mask=mask_p[:, None, None] & hd_mask[None, :, :],
        other=0.0,
    ).to(tl.float32)
    lse = tl.load(LSE + offs_p[:, None, None] * NH + nh_r[None, :, :], mask=pnh, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = _delta_window(
        L,
        V,
        R,
        A,
        g,
        lse,
        b,
        y0,
        x0,
        mask_p,
        H,
        W,
        KH,
        KW,
        nh_mask,
        nh_l,
        nh_t,
        hd_mask,
        hd_v,
        NH,
        sl_b,
        sl_y,
        sl_x,
        sv_b,
        sv_y,
        sv_x,
        HAS_SCALE,
        True,
        P,
        BLOCK_N,
        1,
    )
    tl.store(DELTA + offs_p[:, None, None] * NH + nh_r[None, :, :], delta, mask=pnh)


@triton.jit
def _direct_forward_pixels(
    L,
    V,
    R,
    A,
    O,
    LSE,
    b,
    y0,
    x0,
    offs_p,
    mask_p,
    H,
    W,
    KH,
    KW,
    nh_mask,
    nh_l,
    nh_r,
    nh_t,
    hd_mask,
    hd_v,
    hd_o,
    NH,
    HEADS,
    D: tl.constexpr,
    sl_b,
    sl_y,
    sl_x,
    sv_b,
    sv_y,
    sv_x,
    HAS_SCALE: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The output and ``lse`` of ``P`` output pixels (one head) by the direct algorithm: the banded
    kernel's exact fallback as the forward."""
    acc, lse = _fwd_window(
        L,
        V,
        R,
        A,
        b,
        y0,
        x0,
        mask_p,
        H,
        W,
        KH,
        KW,
        nh_mask,
        nh_l,
        nh_t,
        hd_mask,
        hd_v,
        NH,
        sl_b,
        sl_y,
        sl_x,
        sv_b,
        sv_y,
        sv_x,
        HAS_SCALE,
        True,
        P,
        BLOCK_N,
        1,
        BLOCK_D,
    )
    _store_out_lse(O, LSE, acc, lse, offs_p, mask_p, hd_o, hd_mask, nh_r, nh_mask, HEADS * D, NH)


@triton.jit
def _delta_of_query(
    yt, dacc, redo, c, n, G, LSE, pix, pix_ok, j, dd, offs_n, NQ, NH, sg_p, sg_j, sg_t, D: tl.constexpr
):
    """The delta's epilogue for query ``n`` and one head-dim chunk: ``D += g . Y exp(c - lse)``, into
    row ``n`` of ``dacc``; ``redo`` set if the part is not finite. ``c`` is the tile's shift plus the
    bias maximum; ``sg_*`` the output gradient's pixel, head and dim strides.

    The saved lse, so that D is consistent with the P the main backward kernel recomputes (finite lse:
    the exponent is at most the tile's spread; an empty window has D = 0). The gradient tile is loaded
    here, after the window loop: held through it, it would cost 16-32 registers a thread there (spills
    at head dims of 16 and more).
    """
    lse = tl.load(LSE + pix * NH + j * NQ + n, mask=pix_ok, other=float("-inf"))
    fac = tl.where(lse == float("-inf"), 0.0, _exp(c - lse))
    g_off = (pix * sg_p + j * sg_j)[:, None, :] + (dd * sg_t)[None, :, None]
    gt = tl.load(G + g_off, mask=_out_mask(pix_ok, dd, D), other=0.0).to(tl.float32)
    part = tl.sum(yt * gt, axis=1) * fac
    redo = tl.maximum(redo, _any_nonfinite2(part))
    dacc += tl.where((offs_n == n)[:, None, None], part[None, :, :], 0.0)
    return dacc, redo


@triton.jit
def _output_of_query(yt, s, out, c, n, LSE, pix, pix_ok, j, first_chunk, NQ, NH):
    """The forward's epilogue for query ``n`` and one head-dim chunk: ``out += Y / S`` (an empty
    window, ``S = 0``, gives 0) and, on the first chunk, the lse ``c + log S`` stored. ``c`` is the
    tile's shift plus the bias maximum."""
    inv = tl.where(s > 0, 1.0 / s, 0.0)
    out += yt * inv[:, None, :]
    if first_chunk:
        lse = tl.where(s > 0, c + tl.log(s), float("-inf"))
        tl.store(LSE + pix * NH + j * NQ + n, lse, mask=pix_ok)
    return out


@triton.jit
def _store_out_chunk(O, out, redo, pix, pix_ok, j, dd, HEADS, D: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The forward's store of one head-dim chunk ``out [R, DC, W]`` of the tile; returns ``redo``, set
    if the chunk is not finite.

    A NaN or infinity anywhere in the products spreads along the tile's rows (0 * NaN off the band):
    such a tile is redone by the direct algorithm, which confines it to its windows. Checking the output
    suffices: whatever makes S non-finite (E or T') enters the value product too, and 0 * NaN is NaN (a
    check of S as well costs ~4 % more instructions in the window loop, by the compiler report). The
    offsets are computed here, after the loops: computed before, they would hold registers through them.
    """
    redo = tl.maximum(redo, _any_nonfinite2(tl.reshape(out, (ROWS, COLS))))
    tl.store(O + _out_offsets(pix, j, dd, HEADS, D), out.to(O.dtype.element_ty), mask=_out_mask(pix_ok, dd, D))
    return redo


@triton.jit
def _store_delta(DELTA, dacc, pix, pix_ok, j, offs_n, NQ, NH):
    """The delta's store: ``dacc [N, R, W]`` of head ``j``, query-minor like ``lse``."""
    d_ptr = DELTA + pix[None, :, :] * NH + j * NQ + offs_n[:, None, None]
    tl.store(d_ptr, dacc, mask=pix_ok[None, :, :] & (offs_n < NQ)[:, None, None])


@triton.jit
def qna_banded_kernel(
    L,
    V,
    R,
    A,
    O,
    LSE,
    G,
    DELTA,
    SIZES,
    NQ: tl.constexpr,
    D: tl.constexpr,
    L_STRIDES,
    V_STRIDES,
    G_STRIDES,
    WINDOW,
    HAS_SCALE: tl.constexpr,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
    L_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
    G_ALIGN: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HALO: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FALLBACK_P: tl.constexpr,
    VDOT: tl.constexpr,
    RANGE_LIMIT: tl.constexpr,
    DELTA_MODE: tl.constexpr,
):
    """The forward (``O``, ``LSE`` written; ``G``, ``DELTA`` unused) or, with ``DELTA_MODE``, the
    backward's ``D = g . sum_o a P v`` per (pixel, query, head) (``G`` with its ``G_STRIDES`` and the
    saved ``LSE`` read, ``DELTA`` written; ``O`` unused): the same window sum, dotted with the output
    gradient."""
    B, H, W, Ho, Wo, HEADS = SIZES
    sg_p, sg_j, sg_t = _grad_strides(G_STRIDES, G_ALIGN)
    KH, KW, SH, SW, PH, PW = WINDOW
    sl_b, sl_y, sl_x, sl_n, sl_j = _element_strides(L_STRIDES, L_ALIGN)
    sv_b, sv_y, sv_x, sv_j, sv_t = _element_strides(V_STRIDES, V_ALIGN)
    NH = NQ * HEADS
    # program -> (image, block of output rows, block of output columns); axis 1 is the head
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(Wo, BLOCK_W)
    row_blocks = tl.cdiv(Ho, BLOCK_R)
    cb = pid % col_blocks
    rb = (pid // col_blocks) % row_blocks
    b = (pid // (col_blocks * row_blocks)).to(tl.int64)
    j = tl.program_id(1)

    offs_r = tl.arange(0, BLOCK_R)
    offs_i = tl.arange(0, BLOCK_W)
    offs_c = tl.arange(0, HALO)
    offs_n = tl.arange(0, BLOCK_N)
    oy = rb * BLOCK_R + offs_r  # output rows
    ox = cb * BLOCK_W + offs_i  # output columns
    ix = cb * BLOCK_W * SW - PW + offs_c  # the halo's source columns
    col_in = (ix >= 0) & (ix < W) & (offs_c < (BLOCK_W - 1) * SW + KW)
    row_out = oy < Ho

    jl, jv = _head_offsets(j, sl_j, sv_j, WIDE)
    n_off = _query_offsets(offs_n, j, NQ, sl_n, jl, L_HN, WIDE)
    l_img = L + b * sl_b
    v_img = V + b * sv_b
    x_l = ix.to(tl.int64) * sl_x
    x_v = ix.to(tl.int64) * sv_x

    # ---- the tile's logit range (finite values) per query, and the bias range: is one shift safe?
    # over the halo's distinct source rows, BLOCK_R at a time (two or three steps for the usual windows)
    lmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lmin = tl.full((BLOCK_N,), float("inf"), tl.float32)
    halo_rows = (BLOCK_R - 1) * SH + KH
    for t0 in range(0, halo_rows, BLOCK_R):
        iy = rb * BLOCK_R * SH - PH + t0 + offs_r
        m2 = ((iy >= 0) & (iy < H) & (t0 + offs_r < halo_rows))[:, None] & col_in[None, :]
        ptr = l_img + (iy.to(tl.int64)[:, None] * sl_y + x_l[None, :])[:, :, None] + n_off[None, None, :]
        lt = tl.load(ptr, mask=m2[:, :, None] & (offs_n < NQ)[None, None, :], other=float("-inf")).to(tl.float32)
        lmax = tl.maximum(lmax, tl.max(tl.max(lt, axis=1), axis=0))
        lmin = tl.minimum(lmin, tl.min(tl.min(_finite_min(lt), axis=1), axis=0))
    rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rmin = tl.full((BLOCK_N,), float("inf"), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, KH * KW, BLOCK_K):
        kk = k0 + offs_k
        rt = tl.load(
            R + kk[:, None] * NH + offs_n[None, :] * HEADS + j,
            mask=(kk < KH * KW)[:, None] & (offs_n < NQ)[None, :],
            other=float("-inf"),
        )
        rmax = tl.maximum(rmax, tl.max(rt, axis=0))
        rmin = tl.minimum(rmin, tl.min(_finite_min(rt), axis=0))
    lmax, lmin = _range_or_zero(lmax, lmin)
    rmax, rmin = _range_or_zero(rmax, rmin)

    pix = (b * Ho + oy.to(tl.int64))[:, None] * Wo + ox[None, :]  # [R, W] output pixel index
    pix_ok = row_out[:, None] & (ox < Wo)[None, :]
    # 1: this tile runs the direct algorithm (too wide a range for one shift, or a non-finite result)
    redo = _too_wide(lmax, lmin, rmax, rmin, offs_n, NQ, RANGE_LIMIT)
    if redo == 0:
        # products in the transposed orientation: [R*DC, halo] x [halo, W], the rows of the tile and
        # the head dim as the product's rows
        offs_dc = tl.arange(0, BLOCK_DC)
        if DELTA_MODE:
            dacc = tl.zeros((BLOCK_N, BLOCK_R, BLOCK_W), tl.float32)
        for dc in range(0, D, BLOCK_DC):
            dd = dc + offs_dc
            d_v = _value_offsets(dd, j, D, jv, sv_t, V_HD, WIDE)
            if not DELTA_MODE:
                out = tl.zeros((BLOCK_R, BLOCK_DC, BLOCK_W), tl.float32)
            for n in range(NQ):
                shift = _pick(lmax, offs_n, n)
                r_max = _pick(rmax, offs_n, n)
                ln = _query_offsets(n, j, NQ, sl_n, jl, L_HN, WIDE)
                s = tl.zeros((BLOCK_R, BLOCK_W), tl.float32)
                y = tl.zeros((BLOCK_R * BLOCK_DC, BLOCK_W), tl.float32)
                rq, aq = R + (n * HEADS + j), A + (n * HEADS + j)  # query n, head j's column of the tables
                for dy in range(KH):
                    iy = oy * SH - PH + dy
                    m2 = ((iy >= 0) & (iy < H) & row_out)[:, None] & col_in[None, :]  # [R, halo]
                    y_l = iy.to(tl.int64) * sl_y
                    lt = tl.load(l_img + y_l[:, None] + x_l[None, :] + ln, mask=m2, other=float("-inf"))
                    e = _exp(lt.to(tl.float32) - shift)  # [R, halo]: one exponential per source pixel
                    tp, t = _band_t(rq, aq, dy, r_max, 0, offs_i, offs_c, KW, SW, NH, HAS_SCALE)
                    if not DELTA_MODE:  # the delta normalises by the saved lse instead
                        s = _sdot(e, tp, s, VDOT)
                    v_ptr = v_img + (iy.to(tl.int64) * sv_y)[:, None, None] + d_v[None, :, None] + x_v[None, None, :]
                    vt = tl.load(v_ptr, mask=m2[:, None, :] & (dd < D)[None, :, None], other=0.0)
                    y = _vdot(_weighted_values(e, vt, VDOT, BLOCK_R * BLOCK_DC, HALO), t, y, VDOT)
                yt = tl.reshape(y, (BLOCK_R, BLOCK_DC, BLOCK_W))
                if DELTA_MODE:
                    dacc, redo = _delta_of_query(
                        yt,
                        dacc,
                        redo,
                        shift + r_max,
                        n,
                        G,
                        LSE,
                        pix,
                        pix_ok,
                        j,
                        dd,
                        offs_n,
                        NQ,
                        NH,
                        sg_p,
                        sg_j,
                        sg_t,
                        D,
                    )
                else:
                    out = _output_of_query(yt, s, out, shift + r_max, n, LSE, pix, pix_ok, j, dc == 0, NQ, NH)
            if not DELTA_MODE:
                redo = _store_out_chunk(O, out, redo, pix, pix_ok, j, dd, HEADS, D, BLOCK_R * BLOCK_DC, BLOCK_W)
        if DELTA_MODE:
            _store_delta(DELTA, dacc, pix, pix_ok, j, offs_n, NQ, NH)

    if redo > 0:
        # the direct algorithm, exact for any logits, over sub-tiles of pixels (overwrites what the
        # products stored for a tile with a non-finite result)
        nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o = _head_blocks(
            j, NQ, HEADS, D, sl_n, sl_j, sv_j, sv_t, BLOCK_N, 1, BLOCK_D, WIDE, L_HN, V_HD
        )
        nh_t = _nh_contiguous(j, HEADS, BLOCK_N, 1)
        for q0 in range(0, BLOCK_W * BLOCK_R, FALLBACK_P):
            py, px, mask_p, offs_p = _sub_tile(q0, b, rb, cb, Ho, Wo, BLOCK_R, BLOCK_W, FALLBACK_P)
            if DELTA_MODE:
                _direct_delta_pixels(
                    L,
                    V,
                    R,
                    A,
                    G,
                    LSE,
                    DELTA,
                    b,
                    py * SH - PH,
                    px * SW - PW,
                    offs_p,
                    mask_p,
                    H,
                    W,
                    KH,
                    KW,
                    nh_mask,
                    nh_l,
                    nh_r,
                    nh_t,
                    hd_mask,
                    hd_v,
                    _grad_offsets(j, sg_j, sg_t, 1, BLOCK_D),
                    sg_p,
                    NH,
                    sl_b,
                    sl_y,
                    sl_x,
                    sv_b,
                    sv_y,
                    sv_x,
                    HAS_SCALE,
                    FALLBACK_P,
                    BLOCK_N,
                )
            else:
                _direct_forward_pixels(
                    L,
                    V,
                    R,
                    A,
                    O,
                    LSE,
                    b,
                    py * SH - PH,
                    px * SW - PW,
                    offs_p,
                    mask_p,
                    H,
                    W,
                    KH,
                    KW,
                    nh_mask,
                    nh_l,
                    nh_r,
                    nh_t,
                    hd_mask,
                    hd_v,
                    hd_o,
                    NH,
                    HEADS,
                    D,
                    sl_b,
                    sl_y,
                    sl_x,
                    sv_b,
                    sv_y,
                    sv_x,
                    HAS_SCALE,
                    FALLBACK_P,
                    BLOCK_N,
                    BLOCK_D,
                )
