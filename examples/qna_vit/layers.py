"""QnA-ViT's building blocks on ``[B, H, W, C]`` maps: 'SAME' padding, LSA windows and their attention, the
LSA/QnA block, the stage, the two stems and the classification head, each with the original's (Flax)
initialisation and parameter shapes.

The generic layers are timm's: :class:`~timm.layers.DropPath`, :class:`~timm.layers.LayerScale` and
:class:`~timm.layers.Mlp` (re-initialised as Flax's by :func:`mlp`). The head stays ours: timm's heads
have no QnA pooling (the ``qnav1``/``qnav2`` heads)."""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp

from qna_triton import QnA
from qna_triton.layer import lecun_normal_ as _lecun_normal_

from .config import BN_EPS, LN_EPS, N_QUERIES, QnAViTConfig
from .fx import _notrace


def _dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # skip_init builds on the CPU unless told: pass the default device (a torch.device context, e.g. meta)
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=torch.get_default_device())
    _lecun_normal_(layer.weight, in_features)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _same_pads(size: int, k: int, s: int) -> Tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding of one axis: ``ceil(size / s)`` outputs, extra pixel at the end."""
    total = max((_ceil_div(size, s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@_notrace
def pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """Pads an NCHW tensor for a 'SAME' window; PyTorch's own padding is symmetric, 'SAME' is not."""
    (top, bottom), (left, right) = _same_pads(x.shape[-2], k, s), _same_pads(x.shape[-1], k, s)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


def mlp(dim: int, ratio: int = 4) -> Mlp:
    """timm's :class:`~timm.layers.Mlp` as the original's ``MlpBlock``: Dense(C -> 4C) -> GELU (tanh
    approximation, Flax's default) -> Dense(4C -> C), both denses re-initialised as Flax's (LeCun normal
    weights, zero biases) rather than PyTorch's default."""
    block = Mlp(dim, dim * ratio, act_layer=functools.partial(nn.GELU, approximate="tanh"))
    for fc in (block.fc1, block.fc2):
        _lecun_normal_(fc.weight, fc.in_features)
        nn.init.zeros_(fc.bias)
    return block


class StridedProjection(nn.Module):
    """Skip path of a down-sampling block: the original's 1x1 conv, stride 2, no bias (every second
    pixel, then ``C -> C_out``), on ``[B, H, W, C]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = _dense(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x[:, ::2, ::2])


@_notrace
def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * n_windows, w*w, C]``: row-major windows (batch-major), the map padded
    with zeros at the bottom and right to a multiple of ``w`` (a map smaller than the window becomes
    one padded window: global attention)."""
    B, H, W, C = x.shape
    ph, pw = (-H) % window, (-W) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    nh, nw = (H + ph) // window, (W + pw) // window
    return x.reshape(B, nh, window, nw, window, C).transpose(2, 3).reshape(-1, window * window, C)


@_notrace
def window_merge(windows: torch.Tensor, like: torch.Tensor, window: int) -> torch.Tensor:
    """Inverse of :func:`window_partition` for a map shaped like ``like``, the padding cropped off."""
    B, H, W, _ = like.shape
    nh, nw = _ceil_div(H, window), _ceil_div(W, window)
    x = windows.reshape(B, nh, nw, window, window, -1).transpose(2, 3).reshape(B, nh * window, nw * window, -1)
    return x[:, :H, :W] if (nh * window, nw * window) != (H, W) else x


@_notrace
def window_key_mask(x: torch.Tensor, window: int) -> torch.Tensor:
    """Additive key mask ``[n_windows, w*w]`` (0 for image pixels, -inf for padding) of the windows of
    ``x`` ``[B, H, W, C]``; an empty tensor when the windows tile the map exactly (nothing to mask)."""
    _, H, W, _ = x.shape
    ph, pw = (-H) % window, (-W) % window
    if not (ph or pw):
        return x.new_zeros((0,))
    valid = torch.zeros(H + ph, W + pw, dtype=torch.bool, device=x.device)
    valid[:H, :W] = True
    nh, nw = (H + ph) // window, (W + pw) // window
    valid = valid.reshape(nh, window, nw, window).transpose(1, 2).reshape(nh * nw, window * window)
    return torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))


@_notrace
def window_attn_mask(bias: torch.Tensor, key_mask: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The relative-position bias ``[heads, L, L]`` plus the padding mask of every window, as the
    ``[B * n_windows, heads, L, L]`` attention mask of ``windows`` (the bias alone without padding)."""
    if key_mask.numel() == 0:
        return bias
    n_windows = key_mask.shape[0]
    mask = bias.unsqueeze(0) + key_mask.to(bias.dtype)[:, None, None, :]
    return mask.repeat(windows.shape[0] // n_windows, 1, 1, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with a Swin-style relative position bias.

    Input ``[B * n_windows, w*w, C]`` (tokens of each window in row-major order), optionally with the
    additive key mask of :func:`window_key_mask` (padded tokens are never attended to). ``to_qkv`` is
    packed per head as the original: output column ``j*3d + t`` is q (``t < d``), k or v of head ``j``.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim, self.window = dim, heads, dim // heads, window
        self.to_qkv = _dense(dim, 3 * dim, bias=False)
        self.to_out = _dense(dim, dim, bias=False)
        # The original initialises the table to zeros (its rpe_init is the bias init).
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        r, c = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        r, c = r.flatten(), c.flatten()
        index = (r[:, None] - r[None, :] + window - 1) * (2 * window - 1) + (c[:, None] - c[None, :] + window - 1)
        self.register_buffer("relative_position_index", index, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """``B[j, i, i']`` as ``[heads, w*w, w*w]``."""
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (self.heads, 3 * self.head_dim)).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B', heads, L, d]
        bias = self.relative_position_bias().to(q.dtype)
        if key_mask is not None:
            bias = window_attn_mask(bias, key_mask, x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return f"{self.dim}, heads={self.heads}, window={self.window}"


class Block(nn.Module):
    """Pre-norm block: ``x = skip(x) + mixer(LN(x))``, then ``x = x + MLP(LN(x))``.

    ``skip`` is the identity except in down-sampling blocks (a :class:`StridedProjection`); there, as in
    the original, stochastic depth only drops the MLP branch, since the mixer branch carries the
    down-sampled signal.
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        out_dim: Optional[int] = None,
        skip: Optional[nn.Module] = None,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mixer = mixer
        self.ls1 = LayerScale(out_dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.skip = skip if skip is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if skip is None else nn.Identity()
        self.norm2 = nn.LayerNorm(out_dim, eps=LN_EPS)
        self.mlp = mlp(out_dim)
        self.ls2 = LayerScale(out_dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask``: the LSA windows' padding mask (LSA blocks only)."""
        h = self.norm1(x)
        h = self.mixer(h) if key_mask is None else self.mixer(h, key_mask)
        x = self.skip(x) + self.drop_path1(self.ls1(h))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _qna_layer(
    in_features: int,
    features: int,
    heads: int,
    kernel_size: Union[int, Tuple[int, int]],
    stride: int = 1,
    padding: Optional[int] = None,
) -> QnA:
    return QnA(
        in_features,
        features,
        heads,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        n_queries=N_QUERIES,
        attn_scale="normal",
        normalize_q=True,
        use_bias=False,
    )


def _run(module: nn.Module, checkpointed: bool, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)``, under activation checkpointing when asked (and gradients are recorded)."""
    if checkpointed and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class QnAViTStage(nn.Module):
    """LSA blocks (on windows), then QnA blocks, then an optional down-sampling QnA block.

    ``forward`` runs the blocks at the stage's resolution and returns that map (the stage's feature,
    stride ``4 * 2**s``); the model applies ``downsample`` after it. The down-sampling block belongs
    to the stage as in the original's parameter tree (``QnA_Block_{n+1}_stride_2``).
    """

    def __init__(self, cfg: QnAViTConfig, s: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        dim, k, ls = cfg.stage_dim(s), cfg.kernel_size[s], cfg.layer_scale
        n_lsa, n_qna = cfg.lsa_layers[s], cfg.qna_layers[s]
        self.window = cfg.lsa_window[s]
        self.grad_checkpointing = False
        self.lsa_blocks = nn.ModuleList(
            Block(dim, WindowAttention(dim, cfg.lsa_heads[s], self.window), drop_path=drop_path[i], layer_scale=ls)
            for i in range(n_lsa)
        )
        self.qna_blocks = nn.ModuleList(
            Block(dim, _qna_layer(dim, dim, cfg.qna_heads[s], k), drop_path=drop_path[n_lsa + i], layer_scale=ls)
            for i in range(n_qna)
        )
        self.downsample: Optional[Block] = None
        if s < cfg.n_stages - 1:
            self.downsample = Block(
                dim,
                _qna_layer(dim, 2 * dim, 2 * cfg.qna_heads[s], k, stride=2),
                out_dim=2 * dim,
                skip=StridedProjection(dim, 2 * dim),
                drop_path=drop_path[n_lsa + n_qna],
                layer_scale=ls,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.lsa_blocks):
            # Partition once per stage, as the original (so stochastic depth drops per window there).
            # A map that the windows do not tile is padded, the padding masked as keys, then cropped.
            key_mask = window_key_mask(x, self.window)
            windows = window_partition(x, self.window)
            for blk in self.lsa_blocks:
                windows = _run(blk, self.grad_checkpointing, windows, key_mask)
            x = window_merge(windows, x, self.window)
        for blk in self.qna_blocks:
            x = _run(blk, self.grad_checkpointing, x)
        return x


class PatchStem(nn.Module):
    """``patch_size`` x ``patch_size`` conv, stride ``patch_size``, 'SAME' padding, no bias."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=False)
        _lecun_normal_(self.conv.weight, in_chans * patch_size * patch_size)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        return _ceil_div(h, self.patch_size), _ceil_div(w, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_same(x, self.patch_size, self.patch_size))


class ResNetStem(nn.Module):
    """7x7 conv stride 2 'SAME' (no bias) -> BatchNorm -> GELU (tanh) -> 3x3 max-pool stride 2 'SAME'."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=2, bias=False)
        _lecun_normal_(self.conv.weight, in_chans * 49)
        self.bn = nn.BatchNorm2d(dim, eps=BN_EPS, momentum=0.1)  # Flax momentum 0.9 = PyTorch 0.1
        self.act = nn.GELU(approximate="tanh")

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        return _ceil_div(_ceil_div(h, 2), 2), _ceil_div(_ceil_div(w, 2), 2)  # conv, then max-pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(pad_same(x, 7, 2))))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


# timm's global_pool names -> this model's pooling: 'avg' is the mean pool of the 'gap' head, '' none.
_POOL_ALIASES = {"avg": "gap", "gap": "gap", "": "", "qnav1": "qnav1", "qnav2": "qnav2"}


def _pool_type(global_pool: str) -> str:
    if global_pool not in _POOL_ALIASES:
        raise ValueError(f"global_pool must be one of {sorted(_POOL_ALIASES)}, got {global_pool!r}")
    return _POOL_ALIASES[global_pool]


class ClassifierHead(nn.Module):
    """LayerNorm, then a mean pool (``gap``), one QnA window over the whole map (``qnav1``; ``qnav2``
    adds the mean pool) or no pooling (``''``), then dropout and the classifier ``fc`` (per pixel on
    an unpooled map)."""

    def __init__(
        self, dim: int, num_classes: int, head_type: str, heads: int, feat_size: Tuple[int, int], drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.head_type, self.feat_size = head_type, tuple(feat_size)
        self.global_pool = head_type
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.qna = _qna_layer(dim, dim, heads, self.feat_size, padding=0) if head_type != "gap" else None
        self.drop = nn.Dropout(drop_rate)
        self.fc = _dense(dim, num_classes, bias=True) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool == "gap":
            x = x.mean(dim=(1, 2))
        elif self.global_pool in ("qnav1", "qnav2"):
            pooled = self.qna(x).flatten(1)  # one output pixel: [B, 1, 1, C] -> [B, C]
            x = pooled + x.mean(dim=(1, 2)) if self.global_pool == "qnav2" else pooled
        x = self.drop(x)
        return x if pre_logits else self.fc(x)
