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
    "shared_max_at_risk",
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


def _depthwise(x: torch.Tensor, weight: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair) -> torch.Tensor:
    """Depthwise correlation of ``[B, H, W, c]`` with ``weight [K, c]`` (row-major window) -> ``[B, Ho, Wo, c]``."""
    c = weight.shape[1]
    wt = weight.t().reshape(c, 1, *kernel_size)
    y = F.conv2d(x.permute(0, 3, 1, 2), wt, stride=stride, padding=padding, groups=c)
    return y.permute(0, 2, 3, 1)


def shared_max_at_risk(
    logits: torch.Tensor, rpb: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair
) -> torch.Tensor:
    """Whether :func:`paper_qna_attention`'s shared maximum would underflow a window (a 0-dim bool tensor).

    The largest term of a window is at least ``exp(maxpool(l) + min r - M - R)`` with ``M`` the maximum
    logit per (image, query, head) and ``R`` the maximum bias per (query, head); the margin keeps it
    far above the smallest normal number (``exp(-87)`` in float32), so the sums keep full precision.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, H, W, N, h = logits.shape
    cdt = compute_dtype(logits.dtype)
    l = logits.to(cdt).reshape(B, H, W, N * h)
    r = rpb.to(cdt).reshape(kh * kw, N * h)
    M = l.amax(dim=(1, 2), keepdim=True)
    R = r.amax(dim=0, keepdim=True)
    lpad = F.pad(l.permute(0, 3, 1, 2), (pw, pw, ph, ph), value=-math.inf)
    wmax = F.max_pool2d(lpad, (kh, kw), (sh, sw)).permute(0, 2, 3, 1)
    margin = 60.0 if cdt == torch.float32 else 600.0
    return (torch.isfinite(wmax) & (wmax + r.amin(0) - M - R < -margin)).any()


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

    A shared maximum underflows for windows whose logits lie far below it (a logit range wider than
    ~60 in float32). With ``exact_fallback`` such inputs are detected (window maximum by max-pooling)
    and computed by :func:`direct_qna_attention` instead, so the result is finite wherever the exact
    one is; the benchmarks time the plain formulation (``exact_fallback=False``).
    """
    kh, kw = kernel_size
    B, H, W, N, h = logits.shape
    d = values.shape[-1]
    cdt = compute_dtype(logits.dtype)
    l = logits.to(cdt).reshape(B, H, W, N * h)
    v = values.to(cdt)
    r = rpb.to(cdt).reshape(kh * kw, N * h)
    M = l.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1, N*h]
    R = r.amax(dim=0, keepdim=True)  # [1, N*h]
    if exact_fallback and bool(shared_max_at_risk(logits, rpb, kernel_size, stride, padding)):
        return direct_qna_attention(logits, values, rpb, scale, kernel_size, stride, padding)
    E = torch.exp(l - M)  # [B, H, W, N*h], in (0, 1]
    er = torch.exp(r - R)  # [K, N*h], in (0, 1]
    den = _depthwise(E, er, kernel_size, stride, padding)  # [B, Ho, Wo, N*h]
    # numerator channels (n, j, t): exp-weighted values per query, as in the paper
    Ev = (E.reshape(B, H, W, N, h, 1) * v[:, :, :, None]).reshape(B, H, W, N * h * d)
    wn = er if scale is None else er * scale.to(cdt).reshape(kh * kw, N * h)
    wn = wn[:, :, None].expand(kh * kw, N * h, d).reshape(kh * kw, N * h * d)
    num = _depthwise(Ev, wn, kernel_size, stride, padding)  # [B, Ho, Wo, N*h*d]
    Ho, Wo = num.shape[1], num.shape[2]
    num = num.reshape(B, Ho, Wo, N, h, d)
    den5 = den.reshape(B, Ho, Wo, N, h)
    safe = torch.where(den5 > 0, den5, torch.ones_like(den5))
    out = (num / safe[..., None]).sum(dim=3)
    lse = torch.log(den5) + M.reshape(B, 1, 1, N, h) + R.reshape(1, 1, 1, N, h)
    return out.to(values.dtype), lse
