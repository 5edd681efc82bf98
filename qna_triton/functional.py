"""Public functional API of the QnA core op."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._validation import IntOrPair, as_pair, check_core_inputs
from .export import route
from .layout import default_padding

__all__ = ["qna_attention"]


def qna_attention(
    logits: torch.Tensor,
    values: torch.Tensor,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    kernel_size: IntOrPair = 3,
    stride: IntOrPair = 1,
    padding: Optional[IntOrPair] = None,
) -> torch.Tensor:
    """QnA's local attention with learned queries, from precomputed logits (``docs/spec.md`` 1.3, step 4).

    For output pixel ``(Y, X)``, head ``j`` and window offset ``(u, w)`` the source pixel is
    ``(y, x) = (Y*s_h + u - p_h, X*s_w + w - p_w)``; offsets outside the image are masked (they add
    nothing to numerator or denominator)::

        out[b,Y,X,j,:] = sum_n  sum_{u,w} a[o,n,j] e[n,j] v[b,y,x,j,:]  /  sum_{u,w} e[n,j]
        e[n,j] = exp(logits[b,y,x,n,j] + rpb[o,n,j]),   o = u*k_w + w

    Every query is normalised over its window on its own, then the queries are summed. The result is
    computed stably (no overflow for any finite logits); a window with no pixel inside the image gives 0.

    Args:
        logits: ``[B, H, W, N, h]``: query-key logits per pixel, query ``n`` and head ``j``.
        values: ``[B, H, W, h, d]``: values per pixel and head; same dtype and device as ``logits``.
            Any strides are accepted (e.g. views split off one fused projection).
        rpb: ``[k_h*k_w, N, h]`` relative position bias (offset index ``u*k_w + w``); None means 0.
        scale: ``[k_h*k_w, N, h]`` attention scale ``a`` on the numerator; None means 1.
        kernel_size: window ``k`` or ``(k_h, k_w)``, each >= 1.
        stride: ``s`` or ``(s_h, s_w)``, each >= 1.
        padding: ``p`` or ``(p_h, p_w)``, each >= 0; None means ``(k - 1) // 2`` per axis.

    Returns:
        ``[B, H_out, W_out, h, d]`` in the dtype of ``values``, with
        ``H_out = floor((H + 2 p_h - k_h) / s_h) + 1`` (likewise ``W_out``).
    """
    # an int of the usual range is its pair (as_pair, whose checks it passes, is the slower way there)
    ks = (
        (kernel_size, kernel_size)
        if type(kernel_size) is int and kernel_size >= 1
        else as_pair(kernel_size, "kernel_size", 1)
    )
    st = (stride, stride) if type(stride) is int and stride >= 1 else as_pair(stride, "stride", 1)
    pd = default_padding(ks) if padding is None else as_pair(padding, "padding", 0)
    if ops.plain_eager(logits, values, rpb, scale):  # checked once per key of the inputs
        return ops.eager_call(False, logits, values, rpb, scale, ks, st, pd)(logits, values, rpb, scale)[0]
    check_core_inputs(logits, values, rpb, scale, ks, st, pd)
    if rpb is None:
        rpb = logits.new_zeros((ks[0] * ks[1],) + tuple(logits.shape[3:]))
    out, _ = route(ops.attention)(logits, values, rpb, scale, list(ks), list(st), list(pd))
    return out
