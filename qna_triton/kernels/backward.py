"""Fused QnA backward, deterministic (no float atomics racing between programs).

With ``P[n,i,o] = exp(l[src(i,o)] + r[o,n] - lse[n,i])`` (recomputed from the saved ``lse``),
``t[i,o] = g[i] . v[src(i,o)]`` per head and ``D[n,i] = sum_o a[o,n] P t`` (``docs/backward.md``):

* :func:`qna_bwd_delta_kernel` (over output pixels) computes ``D``, the per-query output dotted with
  the output gradient, without ever forming the per-query outputs.
* :func:`qna_bwd_kernel` (over *input* pixels p) visits, for each offset o, the one output pixel
  ``i = (p + pad - o) / s`` that reads p through o (when it is an integer inside the output), so
  ``dl[p] = sum_o P (a t - D)`` and ``dv[p] = sum_o (sum_n a P) g[i]`` are plain sums owned by one
  program. ``dr`` and ``da`` are sums over all pixels: each program accumulates its own row of a
  ``[programs, k_h*k_w, N, h]`` buffer (the programs of one row own disjoint head columns of it, and
  an element is always added to by the same thread, so the order of additions is fixed), reduced
  afterwards by one deterministic ``sum``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import (
    _col_valid,
    _element_strides,
    _exp,
    _grad_offsets,
    _grad_strides,
    _head_blocks,
    _interior,
    _load_v,
    _nh_contiguous,
    _output_tile,
    _row_valid,
    _weights_and_values,
)


@triton.jit
def _delta_window(
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
    HAS_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``D = sum_o a P (g . v[src])`` over the window, ``[P, N, H]`` float32."""
    delta = tl.zeros((BLOCK_P, BLOCK_N, BLOCK_H), tl.float32)
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
                HAS_SCALE,
            )
            t = tl.sum(g * v, axis=2)  # [P, H]
            delta += p * t[:, None, :]
    return delta


@triton.jit
def qna_bwd_delta_kernel(
    L,
    V,
    R,
    A,
    G,
    LSE,
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
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    B, H, W, Ho, Wo, HEADS = SIZES
    sg_p, sg_j, sg_t = _grad_strides(G_STRIDES, G_ALIGN)
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
    pnh_mask = mask_p[:, None, None] & nh_mask[None, :, :]

    g = tl.load(
        G + offs_p[:, None, None] * sg_p + _grad_offsets(tl.program_id(1), sg_j, sg_t, BLOCK_H, BLOCK_D)[None, :, :],
        mask=mask_p[:, None, None] & hd_mask[None, :, :],
        other=0.0,
    ).to(tl.float32)
    lse = tl.load(LSE + offs_p[:, None, None] * NH + nh_r[None, :, :], mask=pnh_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    if _interior(offs_p, mask_p, y0, x0, H, W, KH, KW):
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
            False,
            BLOCK_P,
            BLOCK_N,
            BLOCK_H,
        )
    else:
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
            BLOCK_P,
            BLOCK_N,
            BLOCK_H,
        )
    tl.store(DELTA + offs_p[:, None, None] * NH + nh_r[None, :, :], delta, mask=pnh_mask)


@triton.jit
def _bwd_pairs(
    R,
    A,
    G,
    LSE,
    DELTA,
    l_p,
    v_p,
    o,
    i,
    valid,
    nh_mask,
    nh_r,
    nh_t,
    hd_mask,
    g_hd,
    sg_p,
    NH,
    HAS_SCALE: tl.constexpr,
):
    """The pairs (input pixel p, offset o) of a tile, with ``i`` the output pixel reading p through o
    (``valid`` where it exists; ``nh_r`` the offsets in lse and D, ``nh_t`` in the tables, ``g_hd``
    and ``sg_p`` in the output gradient, :func:`_grad_offsets`):
    ``(dz = P (a t - D), a P, g[i], P t)`` as ``[P, N, H]``, ``[P, N, H]``, ``[P, H, D]`` and ``[P, N, H]``."""
    i = tl.where(valid, i, 0)
    ivalid = valid[:, None, None] & nh_mask[None, :, :]
    # +inf for masked lanes: P = exp(z - inf) = 0 there, with no overflow on the way
    lse = tl.load(LSE + i[:, None, None] * NH + nh_r[None, :, :], mask=ivalid, other=float("inf"))
    # a window whose every offset is masked by -inf logits or bias has lse = -inf and P = 0
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + i[:, None, None] * NH + nh_r[None, :, :], mask=ivalid, other=0.0)
    r = tl.load(R + o * NH + nh_t, mask=nh_mask, other=0.0)
    p = _exp(l_p + r[None, :, :] - lse)
    g = tl.load(
        G + i[:, None, None] * sg_p + g_hd[None, :, :],
        mask=valid[:, None, None] & hd_mask[None, :, :],
        other=0.0,
    ).to(tl.float32)
    t = tl.sum(g * v_p, axis=2)[:, None, :]  # [P, 1, H]
    if HAS_SCALE:
        a = tl.load(A + o * NH + nh_t, mask=nh_mask, other=0.0)[None, :, :]
        ap = a * p
    else:
        ap = p
    return ap * t - p * delta, ap, g, p * t


# the tile counts change with the batch: not specialised on (one compiled kernel for every batch)
@triton.jit(do_not_specialize=["NUM_TILES", "TILES_PER_PROGRAM"])
def qna_bwd_kernel(
    L,
    V,
    R,
    A,
    G,
    LSE,
    DELTA,
    DL,
    DV,
    ROWS,
    SIZES,
    NQ: tl.constexpr,
    D: tl.constexpr,
    L_STRIDES,
    V_STRIDES,
    G_STRIDES,
    WINDOW,
    NUM_TILES,
    TILES_PER_PROGRAM,
    DL_PIX_STRIDE,
    DV_PIX_STRIDE,
    HAS_SCALE: tl.constexpr,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
    DL_QM: tl.constexpr,
    L_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
    G_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    B, H, W, Ho, Wo, HEADS = SIZES
    KH, KW, SH, SW, PH, PW = WINDOW
    sl_b, sl_y, sl_x, sl_n, sl_j = _element_strides(L_STRIDES, L_ALIGN)
    sv_b, sv_y, sv_x, sv_j, sv_t = _element_strides(V_STRIDES, V_ALIGN)
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_progs = tl.num_programs(0)
    nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_g = _head_blocks(
        pid_h, NQ, HEADS, D, sl_n, sl_j, sv_j, sv_t, BLOCK_N, BLOCK_H, BLOCK_D, WIDE, L_HN, V_HD
    )
    NH = NQ * HEADS
    K = KH * KW
    # this program's row of the dr partial sums, and of da's (the block of rows after dr's)
    dr_row = ROWS + pid.to(tl.int64) * K * NH
    da_row = dr_row + num_progs.to(tl.int64) * K * NH
    nh_t = _nh_contiguous(pid_h, HEADS, BLOCK_N, BLOCK_H)
    sg_p, sg_j, sg_t = _grad_strides(G_STRIDES, G_ALIGN)
    g_hd = _grad_offsets(pid_h, sg_j, sg_t, BLOCK_H, BLOCK_D)
    if DL_QM:  # dl stored query-minor, as lse
        nh_dl = nh_r
    else:  # each pixel's [N, h] block contiguous (the gradient of contiguous logits)
        nh_dl = nh_t

    for it in range(TILES_PER_PROGRAM):
        tile = pid + it * num_progs
        offs_p = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        # the tile index as a block, so the mask is two int1 blocks and-ed (a scalar comparison mixed into
        # a block mask is an int32 mask in the interpreter, which Triton 3.9 rejects); the comparison
        # with NUM_TILES is implied by the pixel one, but the compiler allocates 16 fewer registers with it
        tile_p = tile + tl.zeros((BLOCK_P,), tl.int32)
        mask_p = (offs_p < B * H * W) & (tile_p < NUM_TILES)
        x = offs_p % W
        tmp = offs_p // W
        y = tmp % H
        b = tmp // H
        lbase = b * sl_b + y * sl_y + x * sl_x
        l_p = tl.load(
            L + lbase[:, None, None] + nh_l[None, :, :], mask=mask_p[:, None, None] & nh_mask[None, :, :], other=0.0
        ).to(tl.float32)
        v_p = _load_v(V, b, y, x, mask_p, hd_v, hd_mask, sv_b, sv_y, sv_x)
        dl = tl.zeros((BLOCK_P, BLOCK_N, BLOCK_H), tl.float32)
        dv = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_D), tl.float32)
        for u in range(KH):
            ty = y + PH - u  # = Y * SH for the output row Y that reads row y through offset row u
            Y = ty // SH
            vy = mask_p & (ty >= 0) & (Y * SH == ty) & (Y < Ho)
            for w in range(KW):
                tx = x + PW - w
                X = tx // SW
                valid = vy & (tx >= 0) & (X * SW == tx) & (X < Wo)
                o = u * KW + w
                dz, ap, g, pt = _bwd_pairs(
                    R,
                    A,
                    G,
                    LSE,
                    DELTA,
                    l_p,
                    v_p,
                    o,
                    (b * Ho + Y) * Wo + X,
                    valid,
                    nh_mask,
                    nh_r,
                    nh_t,
                    hd_mask,
                    g_hd,
                    sg_p,
                    NH,
                    HAS_SCALE,
                )
                dl += dz
                dv += tl.sum(ap, axis=1)[:, :, None] * g
                # these columns of the row belong to this program alone: relaxed ordering suffices
                part = o * NH + nh_t
                tl.atomic_add(dr_row + part, tl.sum(dz, axis=0), mask=nh_mask, sem="relaxed")
                if HAS_SCALE:
                    tl.atomic_add(da_row + part, tl.sum(pt, axis=0), mask=nh_mask, sem="relaxed")
        # dl and dv may be the two column ranges of one packed [B, H, W, N*h + h*d] gradient
        tl.store(
            DL + offs_p[:, None, None] * DL_PIX_STRIDE + nh_dl[None, :, :],
            dl.to(DL.dtype.element_ty),
            mask=mask_p[:, None, None] & nh_mask[None, :, :],
        )
        tl.store(
            DV + offs_p[:, None, None] * DV_PIX_STRIDE + hd_g[None, :, :],
            dv.to(DV.dtype.element_ty),
            mask=mask_p[:, None, None] & hd_mask[None, :, :],
        )
