"""The main backward kernel on tensor cores (stride 1): ``dlogits``, ``dvalues``, ``drpb``, ``dscale``.

A program owns ``BLOCK_R`` x ``BLOCK_W`` *source* pixels of one head (persistent: it loops over
tiles). With the forward's factorisation ``P[n, i, o] = E[p] T'[o] F[i]`` (``E = exp(l - c)``, ``c``
the tile's largest logit, ``T' = exp(r - r_max)``, ``F[i] = exp(c + r_max - lse[i])``), ``G = F g``
and ``H = F D`` per output pixel ``i``, per query and window row ``dy`` the output pixels that read the
tile through row ``dy`` are a halo of ``BLOCK_W + k_w - 1`` columns in the rows ``y + pad - dy``, and
the band ``T[c, x] = (a T')[dy, x - c + k_w - 1]`` (0 off ``0 <= dx < k_w``) joins halo column ``c``
to source column ``x``:

* ``Z += G @ T`` (``[R*dc, halo] x [halo, W]``) and ``U += H @ T'`` (``[R, halo] x [halo, W]``), so
  ``dv = sum_n E_n Z_n`` and ``dl_n = E_n (v . Z_n - U_n)``: no exponential and no ``g . v`` per pair;
* ``M = G^T @ (E v)`` and ``M' = H^T @ E`` (``[halo, W]``): their sums along the band's diagonals
  (``_diag``) are ``da[dy, dx] / T'`` and the ``sum P D`` term of ``dr = a da - sum P D``.

``v . Z - U`` and ``a da - sum P D`` cancel as ``a t - D`` does, so every product is float32-accurate
(split bfloat16 for bfloat16 inputs, tf32x3 otherwise). A tile whose logit + bias spread passes
``RANGE_LIMIT``, or whose results are not finite, is redone by the direct algorithm of
``backward.py``. A tile's ``dr`` / ``da`` rows go to a per-program scratch row first and are added to
the program's row of the partial sums only once the tile is known good (a redone tile rewrites the
scratch), so a redo never counts a pair twice; every element of both rows is written by one program in
a fixed order, so the sums are deterministic, as in the direct kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backward import _bwd_pairs
from .banded import (
    _any_nonfinite2,
    _band_at,
    _finite_min,
    _head_offsets,
    _pick,
    _query_offsets,
    _range_or_zero,
    _sdot,
    _sub_tile,
    _too_wide,
    _value_offsets,
    _vdot,
)
from .forward import _element_strides, _exp, _grad_offsets, _grad_strides, _head_blocks, _load_v, _nh_contiguous


@triton.jit
def _band(R, A, dy, rmax, qh, offs_c, offs_x, KW, NH, HAS_SCALE: tl.constexpr):
    """``T'[c, x] = exp(r[dy, x - c + k_w - 1] - r_max)`` on the band, 0 off it, and ``T = a T'``:
    ``[halo, W]`` (halo column ``c`` is the output column ``x0 + pad - (k_w - 1) + c``)."""
    return _band_at(R, A, dy, offs_x[None, :] - offs_c[:, None] + (KW - 1), rmax, qh, KW, NH, HAS_SCALE)


@triton.jit
def _diag(m, offs_k, offs_x, KW, C0, HALO: tl.constexpr):
    """``s[k] = sum_x m[x - k + k_w - 1 - c0, x]`` of a ``[HALO, W]`` product over the halo columns
    ``c0 .. c0 + HALO - 1``: its part of the sum along the band's diagonal of offset ``dx = k``
    (``[BLOCK_KW]``, 0 beyond ``k_w``)."""
    idx = offs_x[None, :] - offs_k[:, None] + (KW - 1 - C0)
    ok = (idx >= 0) & (idx < HALO) & (offs_k < KW)[:, None]
    vals = tl.gather(m, tl.where(ok, idx, 0), 0)
    return tl.sum(tl.where(ok, vals, 0.0), axis=1)


@triton.jit
def _window_row(
    R,
    A,
    G,
    LSE,
    DELTA,
    DR_TILE,
    DA_TILE,
    b,
    y,
    dy,
    x_halo,
    dc,
    dd,
    n,
    j,
    qh,
    shift,
    r_max,
    e,
    ev,
    z,
    u,
    row,
    Ho,
    Wo,
    NH,
    HEADS,
    D: tl.constexpr,
    sg_p,
    sg_j,
    sg_t,
    KW,
    PH,
    offs_c,
    offs_x,
    offs_kw,
    HALO_CHUNKS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    VDOT: tl.constexpr,
    RANGE_LIMIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    HALO: tl.constexpr,
):
    """Window row ``dy`` of one query ``n`` and head-dim chunk ``dd`` of a tile of source pixels (rows
    ``y``): the output pixels reading the tile through it (rows ``y + PH - dy``, the halo's columns
    from ``x_halo``) add to ``z = sum g F T`` and, in the first chunk, to ``u = sum (F D) T'``; the
    row's ``dr`` / ``da`` go to the scratch rows. Returns ``(z, u)``."""
    qt = n * HEADS + j  # query n, head j in a row of the [K, N, h] tables (qh: in lse and D)
    yo = y + PH - dy
    row_ok = (yo >= 0) & (yo < Ho)
    orow = (b * Ho + yo.to(tl.int64)) * Wo
    da_acc = tl.zeros((BLOCK_KW,), tl.float32)
    pd_acc = tl.zeros((BLOCK_KW,), tl.float32)
    # the halo in chunks of HALO columns: their products and diagonal sums are
    # independent, so a chunk's operands are all that is held at a time
    for ci in range(HALO_CHUNKS):
        c = ci * HALO + offs_c
        xo = x_halo + c
        ok = row_ok[:, None] & ((xo >= 0) & (xo < Wo) & (c < BLOCK_W + KW - 1))[None, :]
        opix = orow[:, None] + xo[None, :]  # [R, HALO]
        lse = tl.load(LSE + opix * NH + qh, mask=ok, other=float("-inf"))
        # exact for any pair with a finite weight (the tile's spread bounds the
        # exponent there); the clamp only keeps F finite where every pair's weight is 0
        f = tl.where(lse == float("-inf"), 0.0, _exp(tl.minimum(shift + r_max - lse, RANGE_LIMIT)))
        gt = tl.load(
            G + (opix * sg_p + j * sg_j)[:, None, :] + (dd * sg_t)[None, :, None],
            mask=ok[:, None, :] & (dd < D)[None, :, None],
            other=0.0,
        ).to(tl.float32)
        gf = tl.reshape(gt * f[:, None, :], (BLOCK_R * BLOCK_DC, HALO))
        tp, t = _band(R, A, dy, r_max, qt, c, offs_x, KW, NH, HAS_SCALE)
        z = _vdot(gf, t, z, VDOT)
        m = _vdot(tl.trans(gf), ev, tl.zeros((HALO, BLOCK_W), tl.float32), VDOT)
        da_acc += _diag(m, offs_kw, offs_x, KW, ci * HALO, HALO)
        if dc == 0:
            hf = f * tl.load(DELTA + opix * NH + qh, mask=ok, other=0.0)
            u = _sdot(hf, tp, u, VDOT)
            mh = _sdot(tl.trans(hf), e, tl.zeros((HALO, BLOCK_W), tl.float32), VDOT)
            pd_acc += _diag(mh, offs_kw, offs_x, KW, ci * HALO, HALO)
    tpo = _exp(tl.load(R + (dy * KW + offs_kw) * NH + qt, mask=offs_kw < KW, other=float("-inf")) - r_max)
    if HAS_SCALE:
        ao = tl.load(A + (dy * KW + offs_kw) * NH + qt, mask=offs_kw < KW, other=0.0)
    else:
        ao = tl.full((BLOCK_KW,), 1.0, tl.float32)
    da_row = da_acc * tpo
    dr_row = ao * da_row - tpo * pd_acc
    # the scratch rows: written by the first head-dim chunk, added to by the others
    # (always with this [k_w] mapping, so each element by the same threads)
    srow = row + (dy * KW + offs_kw) * NH + n * HEADS
    if dc > 0:
        dr_row += tl.load(DR_TILE + srow, mask=offs_kw < KW, other=0.0)
        da_row += tl.load(DA_TILE + srow, mask=offs_kw < KW, other=0.0)
    tl.store(DR_TILE + srow, dr_row, mask=offs_kw < KW)
    if HAS_SCALE:
        tl.store(DA_TILE + srow, da_row, mask=offs_kw < KW)
    return z, u


@triton.jit
def _direct_tile_gradients(
    L,
    V,
    R,
    A,
    G,
    LSE,
    DELTA,
    DL,
    DV,
    DR_TILE,
    DA_TILE,
    b,
    rb,
    cb,
    j,
    row,
    row0,
    row_n,
    row_mask,
    H,
    W,
    Ho,
    Wo,
    NQ: tl.constexpr,
    HEADS,
    D: tl.constexpr,
    NH,
    KH,
    KW,
    PH,
    PW,
    sl_b,
    sl_y,
    sl_x,
    sl_n,
    sl_j,
    sv_b,
    sv_y,
    sv_x,
    sv_j,
    sv_t,
    DL_PIX_STRIDE,
    DV_PIX_STRIDE,
    sg_p,
    sg_j,
    sg_t,
    HAS_SCALE: tl.constexpr,
    WIDE: tl.constexpr,
    L_HN: tl.constexpr,
    V_HD: tl.constexpr,
    DL_QM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    FALLBACK_P: tl.constexpr,
):
    """The exact fallback of a tile of source pixels (head ``j``; row block ``rb``, column block
    ``cb`` of image ``b``): the direct algorithm (backward.py's pairs) over sub-tiles of pixels writes
    their ``dl`` / ``dv``, and its ``dr`` / ``da`` replace whatever the products wrote to the scratch."""
    tl.debug_barrier()
    for dy in range(KH):
        tl.store(DR_TILE + row + dy * KW * NH + row_n, tl.zeros((BLOCK_N, BLOCK_KW), tl.float32), mask=row_mask)
        tl.store(DA_TILE + row + dy * KW * NH + row_n, tl.zeros((BLOCK_N, BLOCK_KW), tl.float32), mask=row_mask)
    tl.debug_barrier()
    nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_g = _head_blocks(
        j, NQ, HEADS, D, sl_n, sl_j, sv_j, sv_t, BLOCK_N, 1, BLOCK_D, WIDE, L_HN, V_HD
    )
    nh_t = _nh_contiguous(j, HEADS, BLOCK_N, 1)
    g_hd = _grad_offsets(j, sg_j, sg_t, 1, BLOCK_D)
    if DL_QM:  # dl stored query-minor, as lse
        nh_dl = nh_r
    else:  # each pixel's [N, h] block contiguous (the gradient of contiguous logits)
        nh_dl = nh_t
    for q0 in range(0, BLOCK_W * BLOCK_R, FALLBACK_P):
        py, px, mask_p, offs_p = _sub_tile(q0, b, rb, cb, H, W, BLOCK_R, BLOCK_W, FALLBACK_P)
        l_p = tl.load(
            L + (b * sl_b + py * sl_y + px * sl_x)[:, None, None] + nh_l[None, :, :],
            mask=mask_p[:, None, None] & nh_mask[None, :, :],
            other=0.0,
        ).to(tl.float32)
        v_p = _load_v(V, b, py, px, mask_p, hd_v, hd_mask, sv_b, sv_y, sv_x)
        dl = tl.zeros((FALLBACK_P, BLOCK_N, 1), tl.float32)
        dv = tl.zeros((FALLBACK_P, 1, BLOCK_D), tl.float32)
        for u in range(KH):
            Y = py + PH - u  # stride 1: the output row reading row py through offset row u
            vy = mask_p & (Y >= 0) & (Y < Ho)
            for w in range(KW):
                X = px + PW - w
                valid = vy & (X >= 0) & (X < Wo)
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
                srow = row0 + o * NH + nh_t
                tl.store(DR_TILE + srow, tl.load(DR_TILE + srow, mask=nh_mask) + tl.sum(dz, axis=0), mask=nh_mask)
                if HAS_SCALE:
                    tl.store(DA_TILE + srow, tl.load(DA_TILE + srow, mask=nh_mask) + tl.sum(pt, axis=0), mask=nh_mask)
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


# the tile counts change with the batch: not specialised on (one compiled kernel for every batch)
@triton.jit(do_not_specialize=["NUM_TILES", "TILES_PER_PROGRAM"])
def qna_banded_bwd_kernel(
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
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HALO: tl.constexpr,
    HALO_CHUNKS: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    FALLBACK_P: tl.constexpr,
    VDOT: tl.constexpr,
    RANGE_LIMIT: tl.constexpr,
):
    """``dl``, ``dv`` of the tile's source pixels (``DL``, ``DV``) and this program's row of the
    ``[programs, k_h*k_w, N, h]`` partial sums of ``dr`` / ``da``, in ``ROWS`` with the scratch rows of
    the same shape after them."""
    B, H, W, Ho, Wo, HEADS = SIZES
    KH, KW, SH, SW, PH, PW = WINDOW
    sl_b, sl_y, sl_x, sl_n, sl_j = _element_strides(L_STRIDES, L_ALIGN)
    sv_b, sv_y, sv_x, sv_j, sv_t = _element_strides(V_STRIDES, V_ALIGN)
    sg_p, sg_j, sg_t = _grad_strides(G_STRIDES, G_ALIGN)
    NH = NQ * HEADS
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    j = tl.program_id(1)
    col_blocks = tl.cdiv(W, BLOCK_W)
    row_blocks = tl.cdiv(H, BLOCK_R)

    offs_r = tl.arange(0, BLOCK_R)
    offs_x = tl.arange(0, BLOCK_W)
    offs_c = tl.arange(0, HALO)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dc = tl.arange(0, BLOCK_DC)
    offs_kw = tl.arange(0, BLOCK_KW)
    jl, jv = _head_offsets(j, sl_j, sv_j, WIDE)

    # the bias range per query (the same for every tile)
    rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rmin = tl.full((BLOCK_N,), float("inf"), tl.float32)
    for dy in range(KH):
        rt = tl.load(
            R + (dy * KW + offs_kw[:, None]) * NH + offs_n[None, :] * HEADS + j,
            mask=(offs_kw < KW)[:, None] & (offs_n < NQ)[None, :],
            other=float("-inf"),
        )
        rmax = tl.maximum(rmax, tl.max(rt, axis=0))
        rmin = tl.minimum(rmin, tl.min(_finite_min(rt), axis=0))
    rmax, rmin = _range_or_zero(rmax, rmin)

    # ROWS holds blocks of [programs, k_h*k_w, N, h] rows: dr's partial sums, da's (with a scale), then
    # the scratch rows of each; this program's are row pid of each block, its head's columns
    block = num_progs.to(tl.int64) * KH * KW * NH
    if HAS_SCALE:
        dr_part, da_part, dr_tile, da_tile = ROWS, ROWS + block, ROWS + 2 * block, ROWS + 3 * block
    else:  # (da's pointers stand in by dr's: never written then)
        dr_part, da_part, dr_tile, da_tile = ROWS, ROWS, ROWS + block, ROWS + block
    row0 = pid.to(tl.int64) * KH * KW * NH
    row = row0 + j
    row_n = (offs_kw * NH)[None, :] + (offs_n * HEADS)[:, None]  # one window row: [N, k_w]
    row_mask = (offs_n < NQ)[:, None] & (offs_kw < KW)[None, :]
    for it in range(TILES_PER_PROGRAM):
        tile = pid + it * num_progs
        if tile < NUM_TILES:  # (the persistent loop's last round may have no tile)
            cb = tile % col_blocks
            rb = (tile // col_blocks) % row_blocks
            b = (tile // (col_blocks * row_blocks)).to(tl.int64)
            y = rb * BLOCK_R + offs_r  # the tile's source rows
            x = cb * BLOCK_W + offs_x  # and columns
            pix_ok = (y < H)[:, None] & (x < W)[None, :]
            pix = (b * H + y.to(tl.int64))[:, None] * W + x[None, :]  # [R, W] flat source pixel
            l_base = b * sl_b + (y.to(tl.int64) * sl_y)[:, None] + (x.to(tl.int64) * sl_x)[None, :]
            v_base = b * sv_b + (y.to(tl.int64) * sv_y)[:, None] + (x.to(tl.int64) * sv_x)[None, :]
            n_off = _query_offsets(offs_n, j, NQ, sl_n, jl, L_HN, WIDE)
            lt = tl.load(
                L + l_base[:, :, None] + n_off[None, None, :],
                mask=pix_ok[:, :, None] & (offs_n < NQ)[None, None, :],
                other=float("-inf"),
            ).to(tl.float32)
            lmax = tl.max(tl.max(lt, axis=1), axis=0)
            lmax, lmin = _range_or_zero(lmax, tl.min(tl.min(_finite_min(lt), axis=1), axis=0))
            redo = _too_wide(lmax, lmin, rmax, rmin, offs_n, NQ, RANGE_LIMIT)

            # output pixels reading the tile through window row dy: rows y + PH - dy, halo columns xo
            x_halo = cb * BLOCK_W + PW - (KW - 1)  # the output column of halo column 0
            dl_t = tl.zeros((BLOCK_N, BLOCK_R, BLOCK_W), tl.float32)
            if redo == 0:
                for dc in range(0, D, BLOCK_DC):
                    dd = dc + offs_dc
                    d_v = _value_offsets(dd, j, D, jv, sv_t, V_HD, WIDE)
                    vt = tl.load(
                        V + v_base[:, None, :] + d_v[None, :, None],
                        mask=pix_ok[:, None, :] & (dd < D)[None, :, None],
                        other=0.0,
                    ).to(tl.float32)
                    dv_t = tl.zeros((BLOCK_R, BLOCK_DC, BLOCK_W), tl.float32)
                    for n in range(NQ):
                        shift = _pick(lmax, offs_n, n)
                        r_max = _pick(rmax, offs_n, n)
                        qh = j * NQ + n
                        ln = _query_offsets(n, j, NQ, sl_n, jl, L_HN, WIDE)
                        e = _exp(tl.load(L + l_base + ln, mask=pix_ok, other=float("-inf")).to(tl.float32) - shift)
                        ev = tl.reshape(e[:, None, :] * vt, (BLOCK_R * BLOCK_DC, BLOCK_W))
                        z = tl.zeros((BLOCK_R * BLOCK_DC, BLOCK_W), tl.float32)
                        u = tl.zeros((BLOCK_R, BLOCK_W), tl.float32)
                        for dy in range(KH):
                            z, u = _window_row(
                                R,
                                A,
                                G,
                                LSE,
                                DELTA,
                                dr_tile,
                                da_tile,
                                b,
                                y,
                                dy,
                                x_halo,
                                dc,
                                dd,
                                n,
                                j,
                                qh,
                                shift,
                                r_max,
                                e,
                                ev,
                                z,
                                u,
                                row,
                                Ho,
                                Wo,
                                NH,
                                HEADS,
                                D,
                                sg_p,
                                sg_j,
                                sg_t,
                                KW,
                                PH,
                                offs_c,
                                offs_x,
                                offs_kw,
                                HALO_CHUNKS,
                                HAS_SCALE,
                                VDOT,
                                RANGE_LIMIT,
                                BLOCK_R,
                                BLOCK_DC,
                                BLOCK_W,
                                BLOCK_KW,
                                HALO,
                            )
                        z3 = tl.reshape(z, (BLOCK_R, BLOCK_DC, BLOCK_W))
                        dv_t += e[:, None, :] * z3
                        dl_n = e * tl.sum(vt * z3, axis=1)
                        if dc == 0:
                            dl_n -= e * u
                        dl_t += tl.where((offs_n == n)[:, None, None], dl_n[None, :, :], 0.0)
                    redo = tl.maximum(redo, _any_nonfinite2(tl.reshape(dv_t, (BLOCK_R * BLOCK_DC, BLOCK_W))))
                    tl.store(
                        DV + (pix * DV_PIX_STRIDE + j * D)[:, None, :] + dd[None, :, None],
                        dv_t.to(DV.dtype.element_ty),
                        mask=pix_ok[:, None, :] & (dd < D)[None, :, None],
                    )
                redo = tl.maximum(redo, _any_nonfinite2(tl.reshape(dl_t, (BLOCK_N * BLOCK_R, BLOCK_W))))
                if DL_QM:
                    dl_ptr = DL + pix[None, :, :] * DL_PIX_STRIDE + j * NQ + offs_n[:, None, None]
                else:
                    dl_ptr = DL + pix[None, :, :] * DL_PIX_STRIDE + j + offs_n[:, None, None] * HEADS
                tl.store(dl_ptr, dl_t.to(DL.dtype.element_ty), mask=pix_ok[None, :, :] & (offs_n < NQ)[:, None, None])
            if redo > 0:
                # the direct algorithm for this tile (backward.py's pairs), over sub-tiles of pixels; its
                # dr / da replace whatever the products wrote to the scratch
                _direct_tile_gradients(
                    L,
                    V,
                    R,
                    A,
                    G,
                    LSE,
                    DELTA,
                    DL,
                    DV,
                    dr_tile,
                    da_tile,
                    b,
                    rb,
                    cb,
                    j,
                    row,
                    row0,
                    row_n,
                    row_mask,
                    H,
                    W,
                    Ho,
                    Wo,
                    NQ,
                    HEADS,
                    D,
                    NH,
                    KH,
                    KW,
                    PH,
                    PW,
                    sl_b,
                    sl_y,
                    sl_x,
                    sl_n,
                    sl_j,
                    sv_b,
                    sv_y,
                    sv_x,
                    sv_j,
                    sv_t,
                    DL_PIX_STRIDE,
                    DV_PIX_STRIDE,
                    sg_p,
                    sg_j,
                    sg_t,
                    HAS_SCALE,
                    WIDE,
                    L_HN,
                    V_HD,
                    DL_QM,
                    BLOCK_W,
                    BLOCK_R,
                    BLOCK_N,
                    BLOCK_D,
                    BLOCK_KW,
                    FALLBACK_P,
                )
            # the tile is good: add its scratch rows to the program's partial sums (the barrier orders the
            # scratch written above, with other thread mappings, before it is read here)
            tl.debug_barrier()
            for dy in range(KH):
                off = row + dy * KW * NH + row_n
                tl.store(
                    dr_part + off,
                    tl.load(dr_part + off, mask=row_mask) + tl.load(dr_tile + off, mask=row_mask),
                    mask=row_mask,
                )
                if HAS_SCALE:
                    da = tl.load(da_part + off, mask=row_mask) + tl.load(da_tile + off, mask=row_mask)
                    tl.store(da_part + off, da, mask=row_mask)
