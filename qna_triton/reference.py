"""Pure-PyTorch references for the QnA core op (``docs/spec.md`` section 1.3, step 4).

Three forms of the same function, all on tensors in the library's layout:

* :func:`naive_qna_attention` walks the windows literally (materialises every window, masks the
  out-of-image offsets by their coordinates). Exact in float64: the oracle for every test.
* :func:`paper_qna_attention` is the paper's efficient form: two depthwise convolutions over
  exp-weighted values, stabilised by subtracting a per-(image, query, head) maximum. It is the CPU
  execution path of the library and the "paper's formulation" baseline of the benchmarks.
* :func:`direct_qna_attention` streams over the window offsets with an exact per-window maximum
  (what the fused kernels do, in PyTorch). It is the exact fallback of the paper form for logit
  ranges too wide for a shared maximum, and :func:`direct_qna_attention_backward` is the analytic
  backward (the formulas of the kernels) used by the CPU path of the custom op.

Layouts (``N`` queries, ``h`` heads, ``d`` head dim, ``K = k_h * k_w`` window offsets, row-major):

* ``logits`` ``[B, H, W, N, h]``, ``values`` ``[B, H, W, h, d]``
* ``rpb`` (relative position bias) and ``scale`` (attention scale ``a``): ``[K, N, h]``
* output ``[B, H_out, W_out, h, d]``; ``lse`` (log-sum-exp per window) ``[B, H_out, W_out, N, h]``,
  float32 (float64 for float64 inputs), ``-inf`` for a window with no pixel inside the image.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layout import Pair, compute_dtype, output_size

# How far a result stored in each dtype may lie from the exact one, relative to its largest magnitude,
# and still be right: two units in the last place of the 16-bit formats (their own rounding), and for
# float32 the reordering of a window's sums. The tests hold the kernels to it (beside twice the error of
# the reference path at the same precision), the autotuner every candidate config's 16-bit results.
RESULT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

__all__ = [
    "RESULT_TOLERANCE",
    "naive_qna_attention",
    "paper_qna_attention",
    "paper_attention_channels_first",
    "paper_sums_channels_first",
    "paper_out_channels_first",
    "paper_lse_channels_first",
    "logits_channels_first",
    "values_channels_first",
    "shared_max_at_risk",
    "shared_max_at_risk_channels_first",
    "direct_qna_attention",
    "direct_qna_attention_backward",
]


def naive_qna_attention(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> torch.Tensor:
    """The literal definition: gather every window, masked softmax per query, weighted sum.

    Memory grows with ``k_h * k_w`` (every window is materialised); use it as an oracle.
    Computes in the inputs' dtype; pass float64 tensors for an exact reference.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, H, W, N, h = logits.shape
    Ho, Wo = output_size(H, kh, sh, ph), output_size(W, kw, sw, pw)
    dev = logits.device
    ys = torch.arange(Ho, device=dev) * sh - ph  # top-left source row of each output row
    xs = torch.arange(Wo, device=dev) * sw - pw
    z_list, v_list, valid_list = [], [], []
    for u in range(kh):
        for w in range(kw):
            y, x = ys + u, xs + w
            vy, vx = (y >= 0) & (y < H), (x >= 0) & (x < W)
            valid = vy[:, None] & vx[None, :]  # [Ho, Wo]
            yc, xc = y.clamp(0, H - 1), x.clamp(0, W - 1)
            l_o = logits[:, yc][:, :, xc]  # [B, Ho, Wo, N, h]
            v_o = values[:, yc][:, :, xc]  # [B, Ho, Wo, h, d]
            z_list.append(l_o + rpb[u * kw + w])
            v_list.append(v_o)
            valid_list.append(valid)
    z = torch.stack(z_list, dim=3)  # [B, Ho, Wo, K, N, h]
    v = torch.stack(v_list, dim=3)  # [B, Ho, Wo, K, h, d]
    valid = torch.stack(valid_list, dim=2)[None, :, :, :, None, None]  # [1, Ho, Wo, K, 1, 1]
    z = torch.where(valid, z, torch.full_like(z, -math.inf))
    m = z.amax(dim=3, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    p = e / e.sum(dim=3, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    wgt = p if scale is None else p * scale[None, None, None]  # [B, Ho, Wo, K, N, h]
    wgt = wgt.sum(dim=4)  # queries summed after their own normalisation: [B, Ho, Wo, K, h]
    return torch.einsum("byxkj,byxkjt->byxjt", wgt, v)


def _shifted(t: torch.Tensor, u: int, w: int, Ho: int, Wo: int, sh: int, sw: int) -> torch.Tensor:
    """The source pixels of window offset (u, w) for every output pixel, from a padded tensor."""
    return t[:, u : u + sh * (Ho - 1) + 1 : sh, w : w + sw * (Wo - 1) + 1 : sw]


def _pad_hw(t: torch.Tensor, ph: int, pw: int, value: float) -> torch.Tensor:
    """Pad dims 1 and 2 of a ``[B, H, W, a, b]`` tensor."""
    return F.pad(t, (0, 0, 0, 0, pw, pw, ph, ph), value=value)


def direct_qna_attention(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Streaming form with an exact per-window maximum; returns ``(out, lse)``.

    Memory is ``O(output)`` per step; stable for any finite logits.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, H, W, N, h = logits.shape
    Ho, Wo = output_size(H, kh, sh, ph), output_size(W, kw, sw, pw)
    cdt = compute_dtype(logits.dtype)
    lp = _pad_hw(logits.to(cdt), ph, pw, -math.inf)
    vp = _pad_hw(values.to(cdt), ph, pw, 0.0)
    r = rpb.to(cdt)
    offsets = [(u, w) for u in range(kh) for w in range(kw)]
    # the source logits of every offset, as views (no memory), sliced once: an exported graph
    # (ONNX, AOTInductor) then holds K slices, not 3K
    src = [_shifted(lp, u, w, Ho, Wo, sh, sw) for u, w in offsets]
    m = torch.full((B, Ho, Wo, N, h), -math.inf, dtype=cdt, device=logits.device)
    for o in range(len(offsets)):
        m = torch.maximum(m, src[o] + r[o])
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    den = torch.zeros_like(m)
    for o in range(len(offsets)):
        den = den + torch.exp(src[o] + r[o] - m_safe)
    lse = m_safe + torch.log(den)  # -inf for an empty window
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.zeros(B, Ho, Wo, h, values.shape[-1], dtype=cdt, device=logits.device)
    for o, (u, w) in enumerate(offsets):
        p = torch.exp(src[o] + r[o] - lse_safe)
        wgt = (p if scale is None else p * scale[o].to(cdt)).sum(dim=3)  # [B, Ho, Wo, h]
        out = out + wgt[..., None] * _shifted(vp, u, w, Ho, Wo, sh, sw)
    return out.to(values.dtype), lse


def direct_qna_attention_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    lse: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Analytic backward from the saved ``lse`` (``docs/backward.md``): ``(dlogits, dvalues, drpb, dscale)``.

    With ``P = exp(l[src] + r[o] - lse[i])`` and ``t = g[i] . v[src]`` per head:
    ``D[n,i] = sum_o a P t``, ``dz = P (a t - D)``; ``dl[src] += dz``, ``dv[src] += (sum_n a P) g[i]``,
    ``dr[o] += dz``, ``da[o] += P t``. Deterministic (no atomics: plain slice accumulation).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, H, W, N, h = logits.shape
    Ho, Wo = lse.shape[1], lse.shape[2]
    cdt = compute_dtype(logits.dtype)
    lp = _pad_hw(logits.to(cdt), ph, pw, -math.inf)
    vp = _pad_hw(values.to(cdt), ph, pw, 0.0)
    g = grad_out.to(cdt)
    r = rpb.to(cdt)
    a = None if scale is None else scale.to(cdt)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(cdt)
    offsets = [(u, w) for u in range(kh) for w in range(kw)]

    def probs_and_t(o: int, u: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
        p = torch.exp(_shifted(lp, u, w, Ho, Wo, sh, sw) + r[o] - lse_safe)  # [B,Ho,Wo,N,h]
        t = (g * _shifted(vp, u, w, Ho, Wo, sh, sw)).sum(-1)  # [B,Ho,Wo,h]
        return p, t

    D = torch.zeros_like(lse_safe)
    for o, (u, w) in enumerate(offsets):
        p, t = probs_and_t(o, u, w)
        D = D + (p if a is None else p * a[o]) * t[:, :, :, None, :]
    dlp = torch.zeros_like(lp)
    dvp = torch.zeros_like(vp)
    dr = torch.zeros_like(r)
    da = None if a is None else torch.zeros_like(a)
    for o, (u, w) in enumerate(offsets):
        p, t = probs_and_t(o, u, w)
        ap = p if a is None else p * a[o]
        dz = ap * t[:, :, :, None, :] - p * D
        _shifted(dlp, u, w, Ho, Wo, sh, sw).add_(dz)
        _shifted(dvp, u, w, Ho, Wo, sh, sw).add_(ap.sum(3)[..., None] * g)
        dr[o] = dz.sum(dim=(0, 1, 2))
        if da is not None:
            da[o] = (p * t[:, :, :, None, :]).sum(dim=(0, 1, 2))
    dl = dlp[:, ph : ph + H, pw : pw + W]
    dv = dvp[:, ph : ph + H, pw : pw + W]
    return (
        dl.to(logits.dtype),
        dv.to(values.dtype),
        dr.to(rpb.dtype),
        None if da is None else da.to(scale.dtype),
    )


def logits_channels_first(logits: torch.Tensor) -> torch.Tensor:
    """``logits [B, H, W, N, h]`` as the ``[B, h*N, H, W]`` map of :func:`paper_attention_channels_first`
    (channel ``j*N + n``)."""
    B, H, W, N, h = logits.shape
    return logits.permute(0, 4, 3, 1, 2).reshape(B, h * N, H, W)


def values_channels_first(values: torch.Tensor) -> torch.Tensor:
    """``values [B, H, W, h, d]`` as ``[B, h*d, H, W]``."""
    B, H, W, h, d = values.shape
    return values.permute(0, 3, 4, 1, 2).reshape(B, h * d, H, W)


def _per_channel(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[K, N, h]`` table (``rpb``, ``scale``) as ``[h*N, K]``: one row per logits channel ``j*N + n``."""
    K, N, h = t.shape
    return t.to(dtype).permute(2, 1, 0).reshape(h * N, K)


def shared_max_at_risk(
    logits: torch.Tensor, rpb: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair
) -> torch.Tensor:
    """Whether :func:`paper_qna_attention`'s shared maximum would underflow a window (a 0-dim bool tensor).

    The largest term of a window is at least ``exp(maxpool(l) + min r - M - R)`` with ``M`` the maximum
    logit per (image, query, head) and ``R`` the maximum bias per (query, head); the margin keeps it
    far above the smallest normal number (``exp(-87)`` in float32), so the sums keep full precision.
    """
    l = logits_channels_first(logits.to(compute_dtype(logits.dtype)))
    return shared_max_at_risk_channels_first(l, rpb, kernel_size, stride, padding)


def shared_max_at_risk_channels_first(
    l: torch.Tensor, rpb: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair
) -> torch.Tensor:
    """:func:`shared_max_at_risk` of the channels-first logits ``l [B, h*N, H, W]``
    (:func:`paper_attention_channels_first`'s layout)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    r = _per_channel(rpb, l.dtype)  # [h*N, K]
    M = l.amax(dim=(2, 3), keepdim=True)  # [B, h*N, 1, 1]
    if 2 * ph <= kh and 2 * pw <= kw:
        # max-pooling's own padding (never selected); every window then holds a pixel of the image
        wmax = F.max_pool2d(l, (kh, kw), (sh, sw), (ph, pw))
    else:
        wmax = F.max_pool2d(F.pad(l, (pw, pw, ph, ph), value=-math.inf), (kh, kw), (sh, sw))
        wmax = torch.where(wmax == -math.inf, math.inf, wmax)  # a window without a pixel is never at risk
    margin = 60.0 if l.dtype == torch.float32 else 600.0
    lowest = M + (r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True))[:, :, None] - margin
    # the smallest window maximum per channel first: the comparison then runs on [B, h*N, 1, 1] only
    return (wmax.amin(dim=(2, 3), keepdim=True) < lowest).any()


def paper_attention_channels_first(
    l: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulation on channels-first maps, without the exact fallback: ``(out, lse)``.

    ``l [B, h*N, H, W]`` (channel ``j*N + n``: query ``n`` of head ``j``), ``v [B, h*d, H, W]``,
    ``rpb``/``scale`` ``[K, N, h]`` as the op takes them; ``out [B, h*d, Ho, Wo]``, ``lse [B, h*N, Ho, Wo]``.
    In this layout every step is a standard convolution-network operator (no transposes): an exported
    graph runs it like a depthwise convolution. :func:`paper_qna_attention` is the same on the op's layout.
    Its three steps (:func:`paper_sums_channels_first`, :func:`paper_out_channels_first`,
    :func:`paper_lse_channels_first`) are public for the ONNX translation, which places them apart.
    """
    num, den, shift = paper_sums_channels_first(l, v, rpb, scale, kernel_size, stride, padding)
    return paper_out_channels_first(num, den, rpb.shape[2]), paper_lse_channels_first(den, shift)


def paper_sums_channels_first(
    l: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two depthwise convolutions of :func:`paper_attention_channels_first`: ``(num, den, shift)``
    with ``num [B, h*N*d, Ho, Wo]`` (channel ``(j*N + n)*d + t``), ``den [B, h*N, Ho, Wo]`` and the
    stabiliser ``shift = M + R`` ``[B, h*N, 1, 1]`` they were computed under."""
    K, N, h = rpb.shape
    _, hN, H, W = l.shape
    d = v.shape[1] // h
    cdt = l.dtype
    r = _per_channel(rpb, cdt)  # [h*N, K]
    M = l.amax(dim=(2, 3), keepdim=True)  # [B, h*N, 1, 1]
    R = r.amax(dim=1, keepdim=True)  # [h*N, 1]
    E = torch.exp(l - M)  # in (0, 1]
    er = torch.exp(r - R)  # in (0, 1]
    den = F.conv2d(E, er.reshape(hN, 1, *kernel_size), stride=stride, padding=padding, groups=hN)
    # numerator channels (j, n, t): exp-weighted values per query, as in the paper
    Ev = (E.reshape(-1, h, N, 1, H, W) * v.reshape(-1, h, 1, d, H, W)).reshape(-1, hN * d, H, W)
    wn = er if scale is None else er * _per_channel(scale, cdt)
    wn = wn[:, None].expand(hN, d, K).reshape(hN * d, 1, *kernel_size)
    num = F.conv2d(Ev, wn, stride=stride, padding=padding, groups=hN * d)
    return num, den, M + R[:, :, None]


def paper_out_channels_first(num: torch.Tensor, den: torch.Tensor, heads: int) -> torch.Tensor:
    """``out [B, h*d, Ho, Wo]`` from :func:`paper_sums_channels_first`'s ``num`` and ``den``: the sum
    over queries of ``num_n / den_n``."""
    _, hN, Ho, Wo = den.shape
    N = hN // heads
    d = num.shape[1] // hN
    # an empty window has den = num = 0: any positive floor keeps it 0; otherwise den >= tiny already,
    # except a sum that underflowed below the smallest normal number (the exact fallback's inputs)
    inv = 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny)
    out = (num.reshape(-1, heads, N, d, Ho, Wo) * inv.reshape(-1, heads, N, 1, Ho, Wo)).sum(dim=2)
    return out.reshape(-1, heads * d, Ho, Wo)


def paper_lse_channels_first(den: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``lse [B, h*N, Ho, Wo]`` from :func:`paper_sums_channels_first`'s ``den`` and ``shift``."""
    return torch.log(den) + shift


def paper_qna_attention(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: torch.Tensor,
    scale: Optional[torch.Tensor],
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    exact_fallback: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulation: two depthwise convolutions; returns ``(out, lse)``.

    ``den = conv(exp(l - M), exp(r - R))`` and, per query, ``num_n = conv(exp(l - M) * v, a * exp(r - R))``
    with ``M`` the maximum logit per (image, query, head) and ``R`` the maximum bias per (query, head);
    ``out = sum_n num_n / den_n``. Its memory grows with the number of queries (``N * C`` channels).
    Computed channels-first (:func:`paper_attention_channels_first`).

    A shared maximum underflows for windows whose logits lie far below it (a logit range wider than
    ~60 in float32). With ``exact_fallback`` such inputs are detected (window maximum by max-pooling)
    and computed by :func:`direct_qna_attention` instead, so the result is finite wherever the exact
    one is; the benchmarks time the plain formulation (``exact_fallback=False``).
    """
    B, H, W, N, h = logits.shape
    d = values.shape[-1]
    cdt = compute_dtype(logits.dtype)
    l = logits_channels_first(logits.to(cdt))
    if exact_fallback and bool(shared_max_at_risk_channels_first(l, rpb, kernel_size, stride, padding)):
        return direct_qna_attention(logits, values, rpb, scale, kernel_size, stride, padding)
    v = values_channels_first(values.to(cdt))
    out, lse = paper_attention_channels_first(l, v, rpb, scale, kernel_size, stride, padding)
    Ho, Wo = out.shape[2], out.shape[3]
    out = out.reshape(B, h, d, Ho, Wo).permute(0, 3, 4, 1, 2)
    lse = lse.reshape(B, h, N, Ho, Wo).permute(0, 3, 4, 2, 1)
    return out.to(values.dtype), lse
