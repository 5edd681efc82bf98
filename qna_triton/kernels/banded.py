"""QnA forward on tensor cores: the window sum as banded matrix products (large windows).

For one head and query ``n``, with a shift ``c`` shared by the whole tile, the forward factorises
(``../shared`` kernel notes, "Beyond the direct algorithm")::

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

Precision: bfloat16 inputs take bfloat16 operands for the value products (``E`` rounded to bfloat16,
times the values, rounded again: the inputs' own precision) and tf32 for the denominators; float16 and
float32 inputs take ``tf32x3`` for both (float32-accurate; float16 operands would underflow, as ``E * v``
can leave float16's range). A NaN or infinite input reaches every output of the tile rows whose
products it enters (``0 * NaN`` off the band), not only the windows holding it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import _exp, _fwd_window, _head_blocks, _store_out_lse

# Largest spread (logits + bias, natural log units) one shift may cover: every term of the products then
# stays above exp(-60) ~ 1e-26 of the shift, a normal number in float32, tf32 and bfloat16, so nothing
# underflows; flushed products of values below ~1e-12 could only cost ~1e-12 absolute error.
RANGE_LIMIT = 60.0

# value-product operand modes (VDOT)
VDOT_BF16 = 0  # bfloat16 operands, float32 accumulation (bfloat16 inputs on a GPU)
VDOT_TF32X3 = 1  # float32 operands, three tf32 products (float16 / float32 inputs)
VDOT_BF16_EMULATED = 2  # bfloat16-rounded operands multiplied in float32 (the interpreter: its bf16 dot is wrong)


@triton.jit
def _vdot(t, x, acc, VDOT: tl.constexpr):
    if VDOT == 0:
        return tl.dot(t.to(tl.bfloat16), x.to(tl.bfloat16), acc)
    elif VDOT == 2:
        return tl.dot(t.to(tl.bfloat16).to(tl.float32), x.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
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
    dx = offs_c[:, None] - offs_i[None, :] * SW
    on = (dx >= 0) & (dx < KW)
    idx = (dy * KW + dx) * NH + qh
    tp = _exp(tl.load(R + idx, mask=on, other=float("-inf")) - rmax)
    if HAS_SCALE:
        return tp, tp * tl.load(A + idx, mask=on, other=0.0)
    else:
        return tp, tp


@triton.jit
def _pick(vec, offs, n):
    """``vec[n]`` for a runtime ``n`` (a masked sum: Triton has no dynamic indexing of registers)."""
    return tl.sum(tl.where(offs == n, vec, 0.0), axis=0)


@triton.jit
def qna_fwd_banded_kernel(
    L, V, R, A, O, LSE,
    B, H, W, Ho, Wo, NQ: tl.constexpr, HEADS, D: tl.constexpr,
    sl_b, sl_y, sl_x, sl_n, sl_j,
    sv_b, sv_y, sv_x, sv_j, sv_t,
    KH, KW, SH, SW, PH, PW,
    HAS_SCALE: tl.constexpr, WIDE: tl.constexpr, L_HN: tl.constexpr, V_HD: tl.constexpr,
    L_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, HALO: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, FALLBACK_P: tl.constexpr,
    VDOT: tl.constexpr, RANGE_LIMIT: tl.constexpr,
):
    sl_b, sl_y, sl_x = sl_b * L_ALIGN, sl_y * L_ALIGN, sl_x * L_ALIGN
    sv_b, sv_y, sv_x = sv_b * V_ALIGN, sv_y * V_ALIGN, sv_x * V_ALIGN
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

    if WIDE:
        jl = j.to(tl.int64) * sl_j
        jv = j.to(tl.int64) * sv_j
    else:
        jl = j * sl_j
        jv = j * sv_j
    if L_HN:
        n_off = j * NQ + offs_n  # query-minor: one head's queries are adjacent
    else:
        if WIDE:
            n_off = offs_n.to(tl.int64) * sl_n + jl
        else:
            n_off = offs_n * sl_n + jl
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
        lmin = tl.minimum(lmin, tl.min(tl.min(tl.where(lt == float("-inf"), float("inf"), lt), axis=1), axis=0))
    rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rmin = tl.full((BLOCK_N,), float("inf"), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, KH * KW, BLOCK_K):
        kk = k0 + offs_k
        rt = tl.load(R + kk[:, None] * NH + j * NQ + offs_n[None, :],
                     mask=(kk < KH * KW)[:, None] & (offs_n < NQ)[None, :], other=float("-inf"))
        rmax = tl.maximum(rmax, tl.max(rt, axis=0))
        rmin = tl.minimum(rmin, tl.min(tl.where(rt == float("-inf"), float("inf"), rt), axis=0))
    lmax = tl.where(lmax == float("-inf"), 0.0, lmax)  # no finite logit / bias: any shift works
    lmin = tl.where(lmin == float("inf"), lmax, lmin)
    rmax = tl.where(rmax == float("-inf"), 0.0, rmax)
    rmin = tl.where(rmin == float("inf"), rmax, rmin)
    spread = tl.where(offs_n < NQ, (lmax - lmin) + (rmax - rmin), 0.0)

    if tl.max(spread, axis=0) > RANGE_LIMIT:
        # too wide for one shift: the direct algorithm, exact for any logits, over sub-tiles of pixels
        nh_mask, nh_l, nh_r, hd_mask, hd_v, hd_o = _head_blocks(
            j, NQ, HEADS, D, sl_n, sl_j, sv_j, sv_t, BLOCK_N, 1, BLOCK_D, WIDE, L_HN, V_HD)
        for q0 in range(0, BLOCK_W * BLOCK_R, FALLBACK_P):
            q = q0 + tl.arange(0, FALLBACK_P)
            py = (rb * BLOCK_R + q // BLOCK_W).to(tl.int64)
            px = (cb * BLOCK_W + q % BLOCK_W).to(tl.int64)
            mask_p = (py < Ho) & (px < Wo)
            acc, lse = _fwd_window(L, V, R, A, b, py * SH - PH, px * SW - PW, mask_p, H, W, KH, KW,
                                   nh_mask, nh_l, nh_r, hd_mask, hd_v, NH,
                                   sl_b, sl_y, sl_x, sv_b, sv_y, sv_x, HAS_SCALE, True,
                                   FALLBACK_P, BLOCK_N, 1, BLOCK_D)
            _store_out_lse(O, LSE, acc, lse, (b * Ho + py) * Wo + px, mask_p, hd_o, hd_mask, nh_r, nh_mask,
                           HEADS * D, NH)
    else:
        # products in the transposed orientation: [R*DC, halo] x [halo, W], the rows of the tile and
        # the head dim as the product's rows
        pix = (b * Ho + oy.to(tl.int64))[:, None] * Wo + ox[None, :]  # [R, W] output pixel index
        pix_ok = row_out[:, None] & (ox < Wo)[None, :]
        offs_dc = tl.arange(0, BLOCK_DC)
        for dc in range(0, D, BLOCK_DC):
            dd = dc + offs_dc
            if V_HD:
                d_v = j * D + dd
            else:
                if WIDE:
                    d_v = jv + dd.to(tl.int64) * sv_t
                else:
                    d_v = jv + dd * sv_t
            out = tl.zeros((BLOCK_R, BLOCK_DC, BLOCK_W), tl.float32)
            for n in range(NQ):
                shift = _pick(lmax, offs_n, n)
                r_max = _pick(rmax, offs_n, n)
                if L_HN:
                    ln = j * NQ + n
                else:
                    if WIDE:
                        ln = n.to(tl.int64) * sl_n + jl
                    else:
                        ln = n * sl_n + jl
                s = tl.zeros((BLOCK_R, BLOCK_W), tl.float32)
                y = tl.zeros((BLOCK_R * BLOCK_DC, BLOCK_W), tl.float32)
                for dy in range(KH):
                    iy = oy * SH - PH + dy
                    m2 = ((iy >= 0) & (iy < H) & row_out)[:, None] & col_in[None, :]  # [R, halo]
                    y_l = iy.to(tl.int64) * sl_y
                    lt = tl.load(l_img + y_l[:, None] + x_l[None, :] + ln, mask=m2, other=float("-inf"))
                    e = _exp(lt.to(tl.float32) - shift)  # [R, halo]: one exponential per source pixel
                    tp, t = _band_t(R, A, dy, r_max, j * NQ + n, offs_i, offs_c, KW, SW, NH, HAS_SCALE)
                    s = _sdot(e, tp, s, VDOT)
                    v_ptr = (v_img + (iy.to(tl.int64) * sv_y)[:, None, None] + d_v[None, :, None]
                             + x_v[None, None, :])
                    vt = tl.load(v_ptr, mask=m2[:, None, :] & (dd < D)[None, :, None], other=0.0)
                    if VDOT == 0:  # bfloat16 products: packed multiplies, no conversions
                        x = tl.reshape(e.to(tl.bfloat16)[:, None, :] * vt, (BLOCK_R * BLOCK_DC, HALO))
                    elif VDOT == 2:  # the same roundings in float32 (the interpreter): E, then E * v in _vdot
                        eb = e.to(tl.bfloat16).to(tl.float32)
                        x = tl.reshape(eb[:, None, :] * vt.to(tl.float32), (BLOCK_R * BLOCK_DC, HALO))
                    else:
                        x = tl.reshape(e[:, None, :] * vt.to(tl.float32), (BLOCK_R * BLOCK_DC, HALO))
                    y = _vdot(x, t, y, VDOT)
                inv = tl.where(s > 0, 1.0 / s, 0.0)  # an empty window (s = 0) gives 0
                out += tl.reshape(y, (BLOCK_R, BLOCK_DC, BLOCK_W)) * inv[:, None, :]
                if dc == 0:
                    lse = tl.where(s > 0, shift + r_max + tl.log(s), float("-inf"))
                    tl.store(LSE + pix * NH + j * NQ + n, lse, mask=pix_ok)
            o_ptr = O + (pix * (HEADS * D) + j * D)[:, None, :] + dd[None, :, None]
            tl.store(o_ptr, out.to(O.dtype.element_ty), mask=pix_ok[:, None, :] & (dd < D)[None, :, None])
