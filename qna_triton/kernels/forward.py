"""Fused QnA forward: one program per tile of output pixels and group of heads.

Each program streams over the window offsets twice, reading only its tile's source pixels:
1. the exact ``lse`` of ``z = l[src] + r[o]`` per (pixel, query, head), by an online maximum (the running
   sum is rescaled when the maximum grows); saved for the backward: ``N*h`` floats per pixel,
2. ``out += (sum_n a[o,n] exp(z - lse)) * v[src]``: the queries and the scale are folded into one
   weight per (pixel, offset, head) before touching the values, so the value pass costs the same for
   any number of queries.
Tiles whose windows all lie inside the image run both passes without bounds checks.
Nothing of size ``window x pixels`` is ever written; accumulation is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exp(x):
    """``exp(x)`` as one ``ex2`` instruction: ``tl.exp`` adds a denormal-range fix-up around it (five
    instructions per element in the window loops), which only matters for results below 2^-126,
    negligible next to a softmax sum of at least 1."""
    return tl.math.exp2(x * 1.4426950408889634)


@triton.jit
def _element_strides(strides, ALIGN: tl.constexpr):
    """A tensor's ``(batch, row, column, inner, inner)`` strides as the launch describes them (the
    three pixel strides divided by their alignment ``ALIGN``, ``_pixel_align`` in the launcher), in
    elements: multiplying by the constant tells the compiler every pixel starts ``ALIGN`` elements
    aligned, which Triton's own specialisation (multiples of 16) cannot say."""
    return strides[0] * ALIGN, strides[1] * ALIGN, strides[2] * ALIGN, strides[3], strides[4]


@triton.jit
def _src_coords(offs_p, Ho, Wo, SH, SW, PH, PW):
    """Flat output-pixel index -> (batch, top-left source row, top-left source column)."""
    X = offs_p % Wo
    t = offs_p // Wo
    Y = t % Ho
    b = t // Ho
    return b, Y * SH - PH, X * SW - PW


@triton.jit
def _load_z(L, R, o, b, y, x, valid, nh_l, nh_t, nh_mask, NH, sl_b, sl_y, sl_x):
    """z = logits[b, y, x, n, j] + rpb[o, n, j] as [P, N, H] float32; -inf where the source is masked
    (``nh_t``: :func:`_nh_contiguous`, the offsets in a row of the tables)."""
    base = b * sl_b + y * sl_y + x * sl_x
    msk = valid[:, None, None] & nh_mask[None, :, :]
    z = tl.load(L + base[:, None, None] + nh_l[None, :, :], mask=msk, other=float("-inf")).to(tl.float32)
    r = tl.load(R + o * NH + nh_t, mask=nh_mask, other=0.0)
    return z + r[None, :, :]


@triton.jit
def _nh_contiguous(pid_h, HEADS, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """``[N, H]`` offsets of a program's (query, head) block in a contiguous ``[N, h]`` block: a row of
    the rpb / scale tables ``[K, N, h]`` (read as the caller's tensors are laid out, with no copy), or
    a pixel of a contiguous logits gradient. Masked like the other ``[N, H]`` blocks (``nh_mask``)."""
    return tl.arange(0, BLOCK_N)[:, None] * HEADS + (pid_h * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]


@triton.jit
def _grad_strides(strides, ALIGN: tl.constexpr):
    """The output gradient's ``(pixel, head, dim)`` strides in elements, the first two passed divided
    by their alignment ``ALIGN`` (as :func:`_element_strides`: the compiler then knows each pixel's and
    head's block starts ``ALIGN`` elements aligned, and vectorises the loads)."""
    return strides[0] * ALIGN, strides[1] * ALIGN, strides[2]


@triton.jit
def _grad_offsets(pid_h, sg_j, sg_t, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[H, D]`` offsets of a program's (head, dim) block in one pixel of the output gradient, read with
    its own strides (``sg_j``, ``sg_t``: the launcher passes ``d, 1`` for a contiguous one, ``0, 0`` for
    the expanded gradient of a ``sum``; their span fits 32 bits). Masked like ``hd_mask``."""
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    return offs_h[:, None] * sg_j + tl.arange(0, BLOCK_D)[None, :] * sg_t


@triton.jit
def _head_blocks(
    pid_h,
    NQ: tl.constexpr,
    HEADS,
    D: tl.constexpr,
    sl_n,
    sl_j,
    sv_j,
    sv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
):
    """Index blocks of one program's heads: ``[N, H]`` over (query, head) and ``[H, D]`` over (head, dim).

    Returns the masks and the offsets into the logits, the values, our own per-(query, head) buffers
    (``lse`` and ``delta``: query-minor) and the output and its gradient
    (``[h, d]``). ``L_HN`` / ``V_HD``: the logits / values of a pixel are laid out exactly like our
    buffers (the QnA layer's packed projection), so their offsets are compile-time multiples of
    ``NQ`` / ``D``: that lets the compiler vectorise the loads and give the logits, statistics and
    values tiles thread mappings that agree, which keeps the window loops free of layout
    conversions through shared memory (``docs/kernels.md``, compiler report)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < HEADS
    nh_mask = (offs_n[:, None] < NQ) & mask_h[None, :]
    nh_r = offs_n[:, None] + offs_h[None, :] * NQ
    hd_mask = mask_h[:, None] & (offs_d[None, :] < D)
    hd_o = offs_h[:, None] * D + offs_d[None, :]
    if L_HN:
        nh_l = nh_r
    else:
        if WIDE:  # a strided input (e.g. head-major) puts a head or query beyond 2^31 elements
            nh_l = offs_n.to(tl.int64)[:, None] * sl_n + offs_h.to(tl.int64)[None, :] * sl_j
        else:
            nh_l = offs_n[:, None] * sl_n + offs_h[None, :] * sl_j
    if V_HD:
        hd_v = hd_o
    else:
        if WIDE:
            hd_v = offs_h.to(tl.int64)[:, None] * sv_j + offs_d.to(tl.int64)[None, :] * sv_t
        else:
            hd_v = offs_h[:, None] * sv_j + offs_d[None, :] * sv_t
    return nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o


@triton.jit
def _output_tile(
    B,
    Ho,
    Wo,
    NQ: tl.constexpr,
    HEADS,
    D: tl.constexpr,
    sl_n,
    sl_j,
    sv_j,
    sv_t,
    SH,
    SW,
    PH,
    PW,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """This program's tile of output pixels (64-bit indices: tensors beyond 2^31 elements), their
    window origins, and its head blocks (:func:`_head_blocks`)."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < B * Ho * Wo
    b, y0, x0 = _src_coords(offs_p, Ho, Wo, SH, SW, PH, PW)
    nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o = _head_blocks(
        tl.program_id(1), NQ, HEADS, D, sl_n, sl_j, sv_j, sv_t, BLOCK_N, BLOCK_H, BLOCK_D, WIDE, L_HN, V_HD
    )
    return offs_p, mask_p, b, y0, x0, nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o


@triton.jit
def _load_v(V, b, y, x, valid, hd_v, hd_mask, sv_b, sv_y, sv_x):
    """values[b, y, x, heads, :] as ``[P, H, D]`` float32; 0 where the source is masked."""
    base = b * sv_b + y * sv_y + x * sv_x
    v = tl.load(V + base[:, None, None] + hd_v[None, :, :], mask=valid[:, None, None] & hd_mask[None, :, :], other=0.0)
    return v.to(tl.float32)


@triton.jit
def _weights_and_values(
    L,
    V,
    R,
    A,
    o,
    b,
    y,
    x,
    valid,
    lse,
    nh_l,
    nh_t,
    nh_mask,
    hd_v,
    hd_mask,
    NH,
    sl_b,
    sl_y,
    sl_x,
    sv_b,
    sv_y,
    sv_x,
    HAS_SCALE: tl.constexpr,
):
    """At window offset ``o``: the scaled probabilities ``a[o] * exp(z - lse)`` ``[P, N, H]`` and the
    source values ``[P, H, D]`` (0 where masked), float32."""
    p = _exp(_load_z(L, R, o, b, y, x, valid, nh_l, nh_t, nh_mask, NH, sl_b, sl_y, sl_x) - lse)
    if HAS_SCALE:
        p = p * tl.load(A + o * NH + nh_t, mask=nh_mask, other=0.0)[None, :, :]
    return p, _load_v(V, b, y, x, valid, hd_v, hd_mask, sv_b, sv_y, sv_x)


@triton.jit
def _row_valid(mask_p, y, H, MASKED: tl.constexpr):
    if MASKED:
        return mask_p & (y >= 0) & (y < H)
    else:  # an interior tile: a constant the compiler folds into the loads (no predicates per offset)
        return tl.full(mask_p.shape, 1, tl.int1)


@triton.jit
def _col_valid(vy, x, W, MASKED: tl.constexpr):
    if MASKED:
        return vy & (x >= 0) & (x < W)
    else:
        return vy


@triton.jit
def _interior(offs_p, mask_p, y0, x0, H, W, KH, KW):
    """Whether every window of the tile lies inside the image (and every pixel of the tile exists):
    then the window loops run without bounds checks."""
    return (
        (tl.min(mask_p.to(tl.int32), axis=0) == 1)
        & (tl.min(y0, axis=0) >= 0)
        & (tl.max(y0, axis=0) + KH <= H)
        & (tl.min(x0, axis=0) >= 0)
        & (tl.max(x0, axis=0) + KW <= W)
    )


@triton.jit
def _fwd_window(
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
    HAS_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The two passes over the window; returns ``(out [P, H, D], lse [P, N, H])``, float32."""
    # pass 1: maximum and normaliser together (online: the sum is rescaled when the maximum grows)
    m = tl.full((BLOCK_P, BLOCK_N, BLOCK_H), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_P, BLOCK_N, BLOCK_H), tl.float32)
    for u in range(KH):
        y = y0 + u
        vy = _row_valid(mask_p, y, H, MASKED)
        for w in range(KW):
            x = x0 + w
            valid = _col_valid(vy, x, W, MASKED)
            z = _load_z(L, R, u * KW + w, b, y, x, valid, nh_l, nh_t, nh_mask, NH, sl_b, sl_y, sl_x)
            m_new = tl.maximum(m, z)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: 0 keeps exp finite
            s = s * _exp(m - shift) + _exp(z - shift)
            m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)  # empty window
    lse = m + tl.log(s)  # -inf where the window holds no pixel
    lse_shift = tl.where(s > 0, lse, 0.0)

    # pass 2: values weighted by the query-summed, scaled probabilities
    acc = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_D), tl.float32)
    for u in range(KH):
        y = y0 + u
        vy = _row_valid(mask_p, y, H, MASKED)
        for w in range(KW):
            x = x0 + w
            valid = _col_valid(vy, x, W, MASKED)
            p, v = _weights_and_values(
                L,
                V,
                R,
                A,
                u * KW + w,
                b,
                y,
                x,
                valid,
                lse_shift,
                nh_l,
                nh_t,
                nh_mask,
                hd_v,
                hd_mask,
                NH,
                sl_b,
                sl_y,
                sl_x,
                sv_b,
                sv_y,
                sv_x,
                HAS_SCALE,
            )
            acc += tl.sum(p, axis=1)[:, :, None] * v  # queries summed before touching the values

    return acc, lse


@triton.jit
def _store_out_lse(O, LSE, acc, lse, offs_p, mask_p, hd_o, hd_mask, nh_r, nh_mask, HD, NH):
    """Writes a tile's output ``[P, H, D]`` (in the output's dtype) and ``lse`` ``[P, N, H]`` (query-minor)."""
    tl.store(
        O + offs_p[:, None, None] * HD + hd_o[None, :, :],
        acc.to(O.dtype.element_ty),
        mask=mask_p[:, None, None] & hd_mask[None, :, :],
    )
    tl.store(LSE + offs_p[:, None, None] * NH + nh_r[None, :, :], lse, mask=mask_p[:, None, None] & nh_mask[None, :, :])


@triton.jit
def qna_fwd_kernel(
    L,
    V,
    R,
    A,
    O,
    LSE,
    SIZES,
    NQ: tl.constexpr,
    D: tl.constexpr,
    L_STRIDES,
    V_STRIDES,
    WINDOW,
    HAS_SCALE: tl.constexpr,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
    L_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    B, H, W, Ho, Wo, HEADS = SIZES
    KH, KW, SH, SW, PH, PW = WINDOW
    sl_b, sl_y, sl_x, sl_n, sl_j = _element_strides(L_STRIDES, L_ALIGN)
    sv_b, sv_y, sv_x, sv_j, sv_t = _element_strides(V_STRIDES, V_ALIGN)
    offs_p, mask_p, b, y0, x0, nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o = _output_tile(
        B,
        Ho,
        Wo,
        NQ,
        HEADS,
        D,
        sl_n,
        sl_j,
        sv_j,
        sv_t,
        SH,
        SW,
        PH,
        PW,
        WIDE,
        L_HN,
        V_HD,
        BLOCK_P,
        BLOCK_N,
        BLOCK_H,
        BLOCK_D,
    )
    NH = NQ * HEADS
    nh_t = _nh_contiguous(tl.program_id(1), HEADS, BLOCK_N, BLOCK_H)

    if _interior(offs_p, mask_p, y0, x0, H, W, KH, KW):
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
            False,
            BLOCK_P,
            BLOCK_N,
            BLOCK_H,
            BLOCK_D,
        )
    else:
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
            BLOCK_P,
            BLOCK_N,
            BLOCK_H,
            BLOCK_D,
        )

    _store_out_lse(O, LSE, acc, lse, offs_p, mask_p, hd_o, hd_mask, nh_r, nh_mask, HEADS * D, NH)
