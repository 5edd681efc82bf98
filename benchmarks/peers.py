"""The peers QnA is compared with, written here in plain PyTorch.

* Neighbourhood self-attention through FlexAttention: every pixel attends to the ``k_h x k_w`` window
  centred on it (the same window, padding and masking as QnA: offsets outside the image are masked),
  with a learned relative-position bias per window offset and head. Tokens are the image flattened row
  by row, ``q, k, v`` are ``[B, heads, H*W, d]``.
* Swin-style window attention: non-overlapping ``k x k`` windows (the image zero-padded to a multiple
  of ``k``, as Swin pads), attention inside each through ``F.scaled_dot_product_attention`` with a
  relative-position bias.
* :class:`FlexNeighborhoodAttention`: the neighbourhood-attention *layer* (qkv projection, attention,
  output projection) for the layer-level comparison with :class:`qna_triton.QnA`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FLEX_MIN_HEAD_DIM",
    "neighbourhood_block_mask",
    "flex_neighbourhood_attention",
    "swin_window_attention",
    "dense_neighbourhood_attention",
    "FlexNeighborhoodAttention",
]

# FlexAttention's CUDA kernels use tl.dot, which needs an inner size of at least 16.
FLEX_MIN_HEAD_DIM = 16


def _window(kh: int, kw: int) -> Tuple[int, int]:
    """Padding of the centred window (QnA's default): offsets ``-p .. k-1-p`` per axis."""
    return (kh - 1) // 2, (kw - 1) // 2


def _mask_mod(width: int, kh: int, kw: int) -> Callable:
    ph, pw = _window(kh, kw)

    def mask_mod(b, h, q_idx, kv_idx):
        dr = kv_idx // width - q_idx // width
        dc = kv_idx % width - q_idx % width
        return (dr >= -ph) & (dr <= kh - 1 - ph) & (dc >= -pw) & (dc <= kw - 1 - pw)

    return mask_mod


def neighbourhood_block_mask(height: int, width: int, kh: int, kw: int, device: torch.device):
    """FlexAttention block mask of the 2-D sliding window on row-major tokens (built once per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = height * width
    return create_block_mask(_mask_mod(width, kh, kw), None, None, n, n, device=device)


def flex_neighbourhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    block_mask,
    width: int,
    kh: int,
    kw: int,
    pad_head_dim_to: int = 0,
) -> torch.Tensor:
    """Neighbourhood attention ``[B, heads, H*W, d]`` -> same shape, ``bias [heads, k_h*k_w]``.

    ``pad_head_dim_to`` zero-pads ``d`` (FlexAttention's CUDA path needs ``d >= 16``); zero columns
    leave ``q·k`` and the kept output columns unchanged, and the softmax scale stays ``1/sqrt(d)``.
    """
    from torch.nn.attention.flex_attention import flex_attention

    ph, pw = _window(kh, kw)
    d = q.shape[-1]

    def score_mod(score, b, h, q_idx, kv_idx):
        # masked pairs are evaluated too (whole blocks, or vmapped in eager): clamp into the table
        dr = (kv_idx // width - q_idx // width).clamp(-ph, kh - 1 - ph)
        dc = (kv_idx % width - q_idx % width).clamp(-pw, kw - 1 - pw)
        return score + bias[h, (dr + ph) * kw + (dc + pw)]

    if pad_head_dim_to > d:
        pad = (0, pad_head_dim_to - d)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0 / math.sqrt(d))
    return out[..., :d] if out.shape[-1] != d else out


def dense_neighbourhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, height: int, width: int, kh: int, kw: int
) -> torch.Tensor:
    """The same function as :func:`flex_neighbourhood_attention` by a dense masked softmax (tests only)."""
    ph, pw = _window(kh, kw)
    n = height * width
    idx = torch.arange(n, device=q.device)
    dr = idx[None, :] // width - idx[:, None] // width
    dc = idx[None, :] % width - idx[:, None] % width
    inside = (dr >= -ph) & (dr <= kh - 1 - ph) & (dc >= -pw) & (dc <= kw - 1 - pw)
    offset = (dr.clamp(-ph, kh - 1 - ph) + ph) * kw + dc.clamp(-pw, kw - 1 - pw) + pw
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, offset]
    s = s.masked_fill(~inside, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _relative_index(kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """Swin's table index ``[K, K]`` for a ``kh x kw`` window (``(2kh-1)(2kw-1)`` relative offsets)."""
    r, c = torch.meshgrid(torch.arange(kh, device=device), torch.arange(kw, device=device), indexing="ij")
    r, c = r.flatten(), c.flatten()
    return (r[:, None] - r[None, :] + kh - 1) * (2 * kw - 1) + (c[:, None] - c[None, :] + kw - 1)


def swin_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, kh: int, kw: int
) -> torch.Tensor:
    """Non-overlapping ``kh x kw`` window attention of ``[B, H, W, heads, d]`` tensors (Swin, unshifted).

    The image is zero-padded to a multiple of the window and the padded tokens take part unmasked, as
    Swin does; ``table [(2kh-1)(2kw-1), heads]`` is Swin's relative-position bias. Returns ``[B, H, W,
    heads, d]``.
    """
    B, H, W, h, d = q.shape
    Hp, Wp = -(-H // kh) * kh, -(-W // kw) * kw
    nh, nw = Hp // kh, Wp // kw

    def partition(t: torch.Tensor) -> torch.Tensor:
        if (Hp, Wp) != (H, W):
            t = F.pad(t, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        t = t.view(B, nh, kh, nw, kw, h, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(B * nh * nw, h, kh * kw, d)

    bias = table[_relative_index(kh, kw, q.device)].permute(2, 0, 1).to(q.dtype)  # [heads, K, K]
    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=bias)
    out = out.view(B, nh, nw, h, kh, kw, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, h, d)
    return out[:, :H, :W] if (Hp, Wp) != (H, W) else out


class FlexNeighborhoodAttention(nn.Module):
    """A neighbourhood self-attention layer: ``[B, H, W, C]`` -> ``[B, H, W, C]``.

    Fused qkv projection (``C -> 3C``), FlexAttention over the ``k x k`` neighbourhood with a relative
    position bias per offset and head, output projection; no biases (as the QnA layers it is compared
    with). ``compile`` compiles the attention (FlexAttention runs its fused kernels only compiled).
    """

    def __init__(self, dim: int, heads: int, kernel_size: int, compile: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim, self.heads, self.head_dim, self.kernel_size = dim, heads, dim // heads, kernel_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rpb = nn.Parameter(torch.randn(heads, kernel_size * kernel_size) * 0.02)
        self._masks: Dict[tuple, object] = {}
        self._attn = (
            torch.compile(flex_neighbourhood_attention, dynamic=False) if compile else flex_neighbourhood_attention
        )

    def block_mask(self, height: int, width: int, device: torch.device):
        key = (height, width, str(device))
        if key not in self._masks:  # a model builds it once per resolution, outside the step
            self._masks[key] = neighbourhood_block_mask(height, width, self.kernel_size, self.kernel_size, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h, d, k = self.heads, self.head_dim, self.kernel_size
        q, kk, v = self.qkv(x).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        pad = FLEX_MIN_HEAD_DIM if (x.is_cuda and d < FLEX_MIN_HEAD_DIM) else 0
        out = self._attn(q, kk, v, self.rpb, self.block_mask(H, W, x.device), W, k, k, pad)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))
