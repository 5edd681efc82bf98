"""QnA-ViT, the hierarchical model of "Learned Queries for Efficient Local Attention" (Arar, Shamir,
Bermano, CVPR 2022), built on :class:`qna_triton.QnA` (docs/spec.md section 2).

The models hold exactly the original Flax parameters (same shapes, same count), so the official
checkpoints load one-to-one: :func:`load_flax_params` maps the original parameter tree onto a model and
:func:`export_flax_params` gives it back. ``examples/convert_flax.py`` turns an original msgpack
checkpoint into a PyTorch one.

Inputs are ``[B, 3, H, W]`` images (NCHW, like every torchvision/timm model); everything after the
stem runs channels-last (``[B, H, W, C]``), the layout of the QnA layer.

Usage (installed with qna-triton, the source in ``examples/qna_vit/``)::

    from qna_vit import create_model, load_flax_params
    model = create_model("qna_vit_tiny")                  # 15,715,560 parameters
    model = create_model("qna_vit_small", num_classes=10, drop_path=0.1, layer_scale=1e-5)

When timm is installed, importing this module registers the four models with timm
(``timm.create_model("qna_vit_tiny")``, ``features_only=True`` for a 4-level feature pyramid); timm
is optional, everything else works without it. Any input size runs (``gap`` head): the LSA windows
pad their maps to a window multiple and mask the padding. ``load_flax_params(..., resize=True)`` and
:func:`load_weights` load a checkpoint of another geometry (other windows, another resolution)
as the original's fine-tuning does (docs/spec.md, section Fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qna_triton import CheckpointError, QnA
from qna_triton.flax_params import check_tree, flatten_tree
from qna_triton.layer import lecun_normal_ as _lecun_normal_
from qna_triton.layout import default_padding, output_size

try:  # timm is optional: its registry, builder and fx leaf lists are used when it imports
    from timm.layers import register_notrace_function as _timm_notrace_function
    from timm.layers import register_notrace_module as _timm_notrace_module
    from timm.models import build_model_with_cfg as _timm_build
    from timm.models import generate_default_cfgs as _timm_default_cfgs
    from timm.models import register_model as _timm_register
except Exception:  # not installed, or a broken install (e.g. a torchvision built for another torch)
    _timm_notrace_function = _timm_notrace_module = _timm_build = _timm_default_cfgs = _timm_register = None

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_tracing

__all__ = [
    "QnAViT",
    "QnAViTConfig",
    "MODEL_CONFIGS",
    "FINETUNE_384",
    "LoadReport",
    "create_model",
    "load_flax_params",
    "load_weights",
    "resize_state_dict",
    "resize_table",
    "export_flax_params",
    "export_flax_batch_stats",
    "fx_tracer_kwargs",
    "symbolic_trace",
    "qna_vit_tiny",
    "qna_vit_tiny_7x7",
    "qna_vit_small",
    "qna_vit_base",
]

HEAD_TYPES = ("gap", "qnav1", "qnav2")
STEM_TYPES = ("patch", "resnet")
N_QUERIES = 2  # every QnA layer of the paper's models, the classification heads included
LN_EPS = 1e-6  # Flax's LayerNorm default, not PyTorch's 1e-5
BN_EPS = 1e-5  # Flax's BatchNorm default (resnet stem only)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class QnAViTConfig:
    """Architecture of a QnA-ViT; per-stage tuples have one entry per stage.

    Stage ``s`` runs ``lsa_layers[s]`` windowed self-attention blocks, then ``qna_layers[s]`` QnA blocks,
    then (every stage but the last) one down-sampling QnA block doubling the width and the heads.

    Attributes:
        base_dim: width of stage 0 (stage ``s`` is ``base_dim * 2**s`` wide).
        qna_layers, qna_heads, kernel_size: QnA blocks, heads and window ``k`` per stage.
        lsa_layers, lsa_heads, lsa_window: local self-attention blocks, heads and window per stage.
        drop_path: stochastic-depth rate of the last block (linearly spaced from 0 over all blocks).
        layer_scale: initial value of CaiT-style layer scales, or None for none (the paper's models).
        head: ``gap`` (LayerNorm, mean pool), ``qnav1`` (LayerNorm, one QnA window over the whole map)
            or ``qnav2`` (``qnav1`` plus the mean pool as a residual).
        stem: ``patch`` (4x4 conv, stride 4) or ``resnet`` (7x7 conv stride 2, BatchNorm, GELU, max-pool).
        num_classes: classifier outputs; 0 gives the pooled features.
        in_chans: input channels.
        img_size: training resolution ``(H, W)``; fixes the window of the ``qnav*`` heads and is the
            default input size reported to timm. ``gap`` models take any valid size.
        drop_rate: dropout on the pooled features before the classifier (not in the original; 0).
    """

    base_dim: int = 64
    qna_layers: Tuple[int, ...] = (2, 3, 2, 0)
    qna_heads: Tuple[int, ...] = (8, 16, 32, 64)
    kernel_size: Tuple[int, ...] = (3, 3, 3, 3)
    lsa_layers: Tuple[int, ...] = (0, 0, 4, 2)
    lsa_heads: Tuple[int, ...] = (2, 4, 8, 16)
    lsa_window: Tuple[int, ...] = (7, 7, 14, 7)
    drop_path: float = 0.0
    layer_scale: Optional[float] = None
    head: str = "gap"
    stem: str = "patch"
    num_classes: int = 1000
    in_chans: int = 3
    img_size: Tuple[int, int] = (224, 224)
    drop_rate: float = 0.0

    @property
    def n_stages(self) -> int:
        return len(self.qna_layers)

    def stage_dim(self, s: int) -> int:
        return self.base_dim * 2 ** s

    def normalized(self) -> QnAViTConfig:
        """The config with ints broadcast to per-stage tuples, after checking every field."""
        n = len(self.qna_layers) if _is_seq(self.qna_layers) else 0
        if n < 1:
            raise ValueError(f"qna_layers must be a non-empty sequence of ints, got {self.qna_layers!r}")
        fields = {}
        for name in ("qna_layers", "qna_heads", "kernel_size", "lsa_layers", "lsa_heads", "lsa_window"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = (value,) * n
            if not _is_seq(value) or len(value) != n:
                raise ValueError(f"{name} must be an int or {n} ints (one per stage), got {value!r}")
            minimum = 0 if name.endswith("_layers") else 1
            for v in value:
                if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                    raise ValueError(f"{name} must hold ints >= {minimum}, got {value!r}")
            fields[name] = tuple(value)
        img = self.img_size
        img = (img, img) if isinstance(img, int) and not isinstance(img, bool) else img
        if not _is_seq(img) or len(img) != 2 or not all(isinstance(v, int) and v >= 1 for v in img):
            raise ValueError(f"img_size must be an int or a pair of positive ints, got {self.img_size!r}")
        fields["img_size"] = tuple(img)
        cfg = dataclasses.replace(self, **fields)
        for name in ("base_dim", "in_chans"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(cfg.num_classes, bool) or not isinstance(cfg.num_classes, int) or cfg.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {cfg.num_classes!r}")
        if not 0.0 <= float(cfg.drop_path) < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {cfg.drop_path!r}")
        if not 0.0 <= float(cfg.drop_rate) < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {cfg.drop_rate!r}")
        if cfg.layer_scale is not None and not isinstance(cfg.layer_scale, (int, float)):
            raise ValueError(f"layer_scale must be a float or None, got {cfg.layer_scale!r}")
        if cfg.head not in HEAD_TYPES:
            raise ValueError(f"head must be one of {HEAD_TYPES}, got {cfg.head!r}")
        if cfg.stem not in STEM_TYPES:
            raise ValueError(f"stem must be one of {STEM_TYPES}, got {cfg.stem!r}")
        for s in range(n):
            dim, last = cfg.stage_dim(s), s == n - 1
            if (cfg.qna_layers[s] > 0 or not last) and dim % cfg.qna_heads[s]:
                raise ValueError(f"stage {s}: qna_heads {cfg.qna_heads[s]} does not divide the width {dim}")
            if cfg.lsa_layers[s] > 0 and dim % cfg.lsa_heads[s]:
                raise ValueError(f"stage {s}: lsa_heads {cfg.lsa_heads[s]} does not divide the width {dim}")
        if cfg.head != "gap" and cfg.stage_dim(n - 1) % cfg.qna_heads[-1]:
            raise ValueError(f"head {cfg.head!r}: qna_heads[-1] = {cfg.qna_heads[-1]} does not divide the "
                             f"final width {cfg.stage_dim(n - 1)}")
        return cfg


def _is_seq(value: Any) -> bool:
    return isinstance(value, (tuple, list))


MODEL_CONFIGS: Dict[str, QnAViTConfig] = {
    "qna_vit_tiny": QnAViTConfig(
        base_dim=64, qna_layers=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64), kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 4, 2), lsa_heads=(2, 4, 8, 16), lsa_window=(7, 7, 14, 7), drop_path=0.05),
    "qna_vit_tiny_7x7": QnAViTConfig(
        base_dim=64, qna_layers=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64), kernel_size=(7, 7, 7, 7),
        lsa_layers=(0, 0, 4, 2), lsa_heads=(2, 4, 8, 16), lsa_window=(7, 7, 14, 7), drop_path=0.05),
    "qna_vit_small": QnAViTConfig(
        base_dim=64, qna_layers=(2, 3, 6, 0), qna_heads=(8, 16, 32, 64), kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 12, 2), lsa_heads=(2, 4, 8, 16), lsa_window=(7, 7, 14, 7), drop_path=0.2),
    "qna_vit_base": QnAViTConfig(
        base_dim=96, qna_layers=(2, 3, 6, 0), qna_heads=(6, 12, 24, 48), kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 12, 2), lsa_heads=(3, 6, 12, 24), lsa_window=(7, 7, 14, 7), drop_path=0.5),
}


# The original's fine-tuning geometry (configs/imagenet_qna_finetune.py): 384 px, whose maps 96, 48, 24,
# 12 the LSA windows tile as the 224 ones tile 56, 28, 14, 7 (global attention in stages 2 and 3).
FINETUNE_384: Dict[str, Any] = dict(img_size=(384, 384), lsa_window=(12, 12, 24, 12))


# ----------------------------------------------------------------------------------- building blocks
def _dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # skip_init builds on the CPU unless told: pass the default device (a torch.device context, e.g. meta)
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias,
                                     device=torch.get_default_device())
    _lecun_normal_(layer.weight, in_features)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _notrace(fn: Callable) -> Callable:
    """Marks a shape-dependent helper as a leaf for ``torch.fx`` symbolic tracing (timm's list, when timm
    imports; :func:`fx_tracer_kwargs` for plain ``torch.fx`` / torchvision tracers): under tracing its
    inputs' shapes are proxies, so its Python arithmetic on them cannot be traced through. The name
    must not start with ``_``: fx only wraps public module-level names."""
    if _timm_notrace_function is not None:
        _timm_notrace_function(fn)
    _FX_LEAF_FUNCTIONS.append(fn)
    return fn


_FX_LEAF_FUNCTIONS: List[Callable] = []


def fx_tracer_kwargs() -> Dict[str, Any]:
    """``tracer_kwargs`` for torchvision's ``create_feature_extractor`` / ``get_graph_node_names`` tracing
    a QnA-ViT without timm's lists: the QnA layer (a custom op behind input checks) and the
    shape-dependent helpers stay single graph nodes."""
    return {"leaf_modules": [QnA], "autowrap_functions": list(_FX_LEAF_FUNCTIONS)}


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QnA) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` for a QnA-ViT (or any module holding QnA layers), with the leaves of
    :func:`fx_tracer_kwargs`."""
    tracer = _Tracer(autowrap_functions=tuple(_FX_LEAF_FUNCTIONS))
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


if _timm_notrace_module is not None:
    _timm_notrace_module(QnA)  # as timm leafs its own custom-op layers


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


class DropPath(nn.Module):
    """Stochastic depth: zeroes a residual branch per sample (``x.shape[0]``) with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); the original's ``LayerScale``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Dense(C -> 4C) -> GELU (tanh approximation, Flax's default) -> Dense(4C -> C)."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = _dense(dim, dim * ratio, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = _dense(dim * ratio, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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

    def __init__(self, dim: int, mixer: nn.Module, out_dim: Optional[int] = None,
                 skip: Optional[nn.Module] = None, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mixer = mixer
        self.ls1 = LayerScale(out_dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.skip = skip if skip is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if skip is None else nn.Identity()
        self.norm2 = nn.LayerNorm(out_dim, eps=LN_EPS)
        self.mlp = Mlp(out_dim)
        self.ls2 = LayerScale(out_dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask``: the LSA windows' padding mask (LSA blocks only)."""
        h = self.norm1(x)
        h = self.mixer(h) if key_mask is None else self.mixer(h, key_mask)
        x = self.skip(x) + self.drop_path1(self.ls1(h))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _qna_layer(in_features: int, features: int, heads: int, kernel_size: Union[int, Tuple[int, int]],
               stride: int = 1, padding: Optional[int] = None) -> QnA:
    return QnA(in_features, features, heads, kernel_size=kernel_size, stride=stride, padding=padding,
               n_queries=N_QUERIES, attn_scale="normal", normalize_q=True, use_bias=False)


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
                dim, _qna_layer(dim, 2 * dim, 2 * cfg.qna_heads[s], k, stride=2), out_dim=2 * dim,
                skip=StridedProjection(dim, 2 * dim), drop_path=drop_path[n_lsa + n_qna], layer_scale=ls,
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

    def __init__(self, dim: int, num_classes: int, head_type: str, heads: int, feat_size: Tuple[int, int],
                 drop_rate: float = 0.0) -> None:
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


def _take_indices(n: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's convention: None takes all ``n`` features, an int the last ``indices``, a sequence those
    indices (negative from the end); returns them and the largest."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices: last-n ({indices}) is out of range (1 to {n})")
        take = list(range(n - indices, n))
    else:
        take = [n + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < n]
        if not take or bad:
            raise ValueError(f"indices {list(indices)} out of range for {n} features")
    return take, max(take)


def _feature_module(cfg: QnAViTConfig, s: int) -> str:
    """The module whose output is stage ``s``'s feature, for timm's hook and fx feature wrappers: the
    stage's last QnA block (the stage's own name would also cover, under fx, its down-sampling block,
    which the model runs after the stage), or the stage itself where nothing follows it."""
    if cfg.qna_layers[s]:
        return f"stages.{s}.qna_blocks.{cfg.qna_layers[s] - 1}"
    return f"stages.{s}"


# ----------------------------------------------------------------------------------- the model
class QnAViT(nn.Module):
    """QnA-ViT: ``[B, in_chans, H, W]`` images -> ``[B, num_classes]`` logits.

    ``forward_features`` gives the last stage's map channels-last (``[B, h, w, C]``, ``output_fmt``
    ``'NHWC'``, before the head's LayerNorm); ``forward_head`` pools and classifies it. Any input size
    runs with the ``gap`` head (the LSA windows pad their maps and mask the padding); the ``qnav*``
    heads need the final map of ``img_size``. ``forward_intermediates`` and ``feature_info`` give the
    4-level pyramid (strides 4, 8, 16, 32) of timm's feature-extraction API.

    Besides the :class:`QnAViTConfig` fields, the constructor takes timm's names: ``drop_path_rate``
    (``drop_path``), ``global_pool`` (``'avg'`` / ``'gap'``, ``''`` for no pooling, ``'qnav1'``,
    ``'qnav2'``), and ``device`` / ``dtype`` to build on.
    """

    output_fmt = "NHWC"

    def __init__(self, config: Optional[QnAViTConfig] = None, *, global_pool: Optional[str] = None,
                 drop_path_rate: Optional[float] = None, device: Any = None, dtype: Optional[torch.dtype] = None,
                 **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else QnAViTConfig()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(QnAViTConfig)})
        if unknown:
            raise TypeError(f"unknown QnAViT option(s) {unknown}")
        if drop_path_rate is not None:
            overrides["drop_path"] = drop_path_rate
        pool = None if global_pool is None else _pool_type(global_pool)
        if pool in ("qnav1", "qnav2"):
            overrides["head"] = pool
        elif pool == "gap" and overrides.get("head", config.head) != "gap":
            raise ValueError(f"global_pool={global_pool!r} needs the 'gap' head, got head="
                             f"{overrides.get('head', config.head)!r}")
        cfg = dataclasses.replace(config, **overrides).normalized()
        if device is not None:
            with torch.device(device):
                self._build(cfg)
        else:
            self._build(cfg)
        if pool == "":
            self.head.global_pool, self.head.qna = "", None
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, cfg: QnAViTConfig) -> None:
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.head_type = cfg.head
        self.num_features = self.head_hidden_size = cfg.stage_dim(cfg.n_stages - 1)
        self.stem = PatchStem(cfg.in_chans, cfg.base_dim) if cfg.stem == "patch" else ResNetStem(cfg.in_chans,
                                                                                                  cfg.base_dim)
        n_blocks = sum(cfg.lsa_layers) + sum(cfg.qna_layers) + cfg.n_stages - 1
        rates = np.linspace(0.0, float(cfg.drop_path), n_blocks).tolist()  # network order
        stages, offset = [], 0
        for s in range(cfg.n_stages):
            n = cfg.lsa_layers[s] + cfg.qna_layers[s] + (s < cfg.n_stages - 1)
            stages.append(QnAViTStage(cfg, s, rates[offset:offset + n]))
            offset += n
        self.stages = nn.ModuleList(stages)
        self.grad_checkpointing = False
        # Both stems reduce by 4, each stage but the last by 2 more: the pyramid of strides 4, 8, 16, 32.
        self.feature_info = [dict(num_chs=cfg.stage_dim(s), reduction=4 * 2 ** s, module=_feature_module(cfg, s))
                             for s in range(cfg.n_stages)]
        # The qnav* heads' window is the final map of img_size, so it must be a valid input size.
        feat = self._check_stage_sizes(*cfg.img_size)[-1] if cfg.head != "gap" else (1, 1)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.head, cfg.qna_heads[-1], feat,
                                   cfg.drop_rate)
        # timm's builder replaces this with the registry's full pretrained_cfg (same keys and more).
        self.pretrained_cfg = self.default_cfg = _default_cfg(cfg)

    # ---------------------------------------------------------------- sizes
    def stage_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Feature-map size at the input of every stage, then the final one (``n_stages + 1`` entries)."""
        h, w = self.stem.output_size(height, width)
        sizes = [(h, w)]
        for s in range(self.config.n_stages - 1):
            k = self.config.kernel_size[s]  # the stride-2 QnA block between stages, default padding
            (ph, pw) = default_padding((k, k))
            h, w = output_size(h, k, 2, ph), output_size(w, k, 2, pw)
            sizes.append((h, w))
        sizes.append(sizes[-1])
        return sizes

    def _check_stage_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """:meth:`stage_sizes`, raising ValueError (naming the input size) where the stages cannot run."""
        cfg = self.config
        sizes = self.stage_sizes(height, width)
        for s in range(cfg.n_stages):
            h, w = sizes[s]
            if min(h, w) < 1:
                raise ValueError(f"input size {height}x{width} is too small: stage {s} has no pixels")
            if s < cfg.n_stages - 1:
                skip = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
                if skip != sizes[s + 1]:
                    raise ValueError(
                        f"input size {height}x{width} is not supported: stage {s}'s down-sampling QnA gives "
                        f"{sizes[s + 1]} but its strided skip gives {skip} (window {cfg.kernel_size[s]})"
                    )
        return sizes

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected input [B, {self.config.in_chans}, H, W] (NCHW), got {tuple(x.shape)}")
        height, width = x.shape[2], x.shape[3]
        final = self._check_stage_sizes(height, width)[-1]
        if self.head.qna is not None and tuple(final) != self.head.feat_size:
            raise ValueError(
                f"input size {height}x{width} is not supported by the {self.head_type!r} head: its QnA "
                f"window covers the {self.head.feat_size} final map of img_size {self.config.img_size}, "
                f"this input gives {tuple(final)}"
            )

    # ---------------------------------------------------------------- forward
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_fx_tracing():  # under symbolic tracing the shapes are proxies: eager checks only
            self._check_input(x)
        return self.stem(x).permute(0, 2, 3, 1)

    def _downsample(self, stage: QnAViTStage, x: torch.Tensor) -> torch.Tensor:
        return _run(stage.downsample, self.grad_checkpointing, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> last stage's map ``[B, h, w, C]`` (channels-last)."""
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
            if stage.downsample is not None:
                x = self._downsample(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features ``[B, h, w, C]`` -> logits ``[B, num_classes]`` (pooled ``[B, C]`` with ``pre_logits``;
        ``[B, h, w, ...]`` without pooling)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stage features (``feature_info``: strides 4, 8, 16, 32) on the way to ``forward_features``.

        Args:
            x: images ``[B, in_chans, H, W]``.
            indices: stages to return: None all, an int the last ``n``, a sequence those (negative from the end).
            norm: apply the head's LayerNorm to the last stage's feature (as before pooling).
            stop_early: stop after the last requested stage (the returned final map is that stage's).
            output_fmt: ``'NCHW'`` (default, for dense heads) or ``'NHWC'`` for the intermediates.
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final map [B, h, w, C] as forward_features, intermediates)``, or the intermediates alone.
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))  # timm passes its Format enum
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = _take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x = self._stem(x)
        intermediates = []
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                feat = self.head.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if fmt == "NCHW" else feat)
            if stage.downsample is not None and not (stop_early and i == max_index):
                x = self._downsample(stage, x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages (and down-sampling) after the last of ``indices``, the head's LayerNorm
        (``prune_norm``, or when stages are dropped) and the classifier and pooling (``prune_head``), as
        timm's feature wrappers do; returns the kept indices for :meth:`forward_intermediates`."""
        take, max_index = _take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.stages[max_index].downsample = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.head.norm = nn.Identity()  # sized for, and only applied to, the last stage
        if prune_head:
            self.reset_classifier(0, "")
        elif prune_end:
            self.reset_classifier(self.num_classes, "gap")  # the old classifier was sized for the last stage
        return take

    # ---------------------------------------------------------------- timm conventions
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier with a fresh one for ``num_classes`` outputs (0: none), and the pooling
        when ``global_pool`` is given (``'avg'``/``'gap'``, ``''`` none, ``'qnav1'``/``'qnav2'`` on a model
        built with a QnA head; leaving a QnA head drops its layer)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        head = self.head
        if global_pool is not None:
            pool = _pool_type(global_pool)
            if pool in ("qnav1", "qnav2") and head.qna is None:
                raise ValueError(f"global_pool={global_pool!r} needs a QnA head: build the model with "
                                 f"head={pool!r} (this head is {head.global_pool!r})")
            if pool in ("gap", ""):
                head.qna = None
            head.global_pool = pool
        ref = self.stem.conv.weight
        if num_classes > 0:
            fc = torch.nn.utils.skip_init(nn.Linear, self.num_features, num_classes, device=ref.device,
                                          dtype=ref.dtype)
            _lecun_normal_(fc.weight, self.num_features)
            nn.init.zeros_(fc.bias)
        else:
            fc = nn.Identity()
        head.fc = fc.train(self.training)
        self.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's API): less memory, one more forward."""
        self.grad_checkpointing = bool(enable)
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> Set[str]:
        """Parameter names exempt from weight decay: relative-position tables, attention scales, norms
        and biases (the paper's recipe)."""
        exempt_leaf = {"relative_position_bias_table", "rpe_bias", "attn_scale_weights", "attn_scale_pos",
                       "bias", "Wk_b"}
        names = set()
        for module_name, module in self.named_modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.BatchNorm2d))
            for leaf, _ in module.named_parameters(recurse=False):
                if is_norm or leaf in exempt_leaf:
                    names.add(f"{module_name}.{leaf}" if module_name else leaf)
        return names

    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[int, ...]]:
        """Parameter name -> sortable depth ordinal, for timm's layer-wise learning-rate decay: the stem,
        then each stage's blocks in network order (LSA, QnA, down-sampling; whole stages if ``coarse``),
        then the head."""
        kinds = {"lsa_blocks": 0, "qna_blocks": 1, "downsample": 2}

        def ordinal(name: str) -> Tuple[int, ...]:
            if name.startswith("stem."):
                return (0,)
            m = re.match(r"stages\.(\d+)\.(lsa_blocks|qna_blocks|downsample)\.(\d+)?", name)
            if m is None:
                return (2,)
            if coarse:
                return (1, int(m.group(1)))
            return (1, int(m.group(1)), kinds[m.group(2)], int(m.group(3) or 0))

        return ordinal

    @torch.no_grad()
    def load_flax_params(self, params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]] = None,
                         resize: bool = False) -> LoadReport:
        """Same as :func:`load_flax_params`."""
        return load_flax_params(self, params, batch_stats, resize=resize)


# ----------------------------------------------------------------------------------- original checkpoints
# How one original array maps onto one PyTorch tensor:
#   copy  - same layout
#   dense - Flax Dense kernel [in, out] <-> nn.Linear weight [out, in]
#   conv  - Flax Conv kernel HWIO <-> nn.Conv2d weight OIHW
#   skip  - the 1x1 stride-2 Conv kernel [1, 1, C, C_out] <-> StridedProjection's nn.Linear weight
_TO_TORCH = {
    "copy": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "skip": lambda a: a[0, 0].T,
}
_TO_FLAX = {
    "copy": lambda t: t,
    "dense": lambda t: t.t(),
    "conv": lambda t: t.permute(2, 3, 1, 0),
    "skip": lambda t: t.t()[None, None],
}
_FLAX_SHAPE = {
    "copy": lambda s: tuple(s),
    "dense": lambda s: (s[1], s[0]),
    "conv": lambda s: (s[2], s[3], s[1], s[0]),
    "skip": lambda s: (1, 1, s[1], s[0]),
}

Entry = Tuple[torch.Tensor, str]


def _qna_entries(prefix: str, layer: QnA) -> Dict[str, Entry]:
    entries: Dict[str, Entry] = {}
    for key, shape in layer.flax_param_shapes().items():
        owner, _, leaf = key.rpartition("/")
        if owner in ("to_v", "to_out"):
            linear = getattr(layer, owner)
            entry = (linear.weight, "dense") if leaf == "kernel" else (linear.bias, "copy")
        else:
            entry = (getattr(layer, key), "copy")  # query, Wk, Wk_b, rpe_bias, attn_scale_*: Flax layouts
        if _FLAX_SHAPE[entry[1]](entry[0].shape) != tuple(shape):
            raise RuntimeError(f"internal: QnA parameter {key!r} does not map onto the layer ({shape})")
        entries[f"{prefix}/{key}"] = entry
    return entries


def _norm_entries(prefix: str, norm: nn.Module) -> Dict[str, Entry]:
    return {f"{prefix}/scale": (norm.weight, "copy"), f"{prefix}/bias": (norm.bias, "copy")}


def _block_entries(prefix: str, block: Block) -> Dict[str, Entry]:
    e = _norm_entries(f"{prefix}/LayerNorm_0", block.norm1)
    mixer = block.mixer
    if isinstance(mixer, QnA):
        e.update(_qna_entries(f"{prefix}/FusedKQnA_0", mixer))
    else:
        m = f"{prefix}/MultiHeadSelfAttention_0"
        e[f"{m}/to_qkv/kernel"] = (mixer.to_qkv.weight, "dense")
        e[f"{m}/to_out/kernel"] = (mixer.to_out.weight, "dense")
        e[f"{m}/RelativePositionalEmbedding_0/rpe_bias"] = (mixer.relative_position_bias_table, "copy")
    if isinstance(block.skip, StridedProjection):
        e[f"{prefix}/Conv_0/kernel"] = (block.skip.proj.weight, "skip")
    if isinstance(block.ls1, LayerScale):
        e[f"{prefix}/LayerScale_0/scale_param"] = (block.ls1.gamma, "copy")
        e[f"{prefix}/LayerScale_1/scale_param"] = (block.ls2.gamma, "copy")
    e.update(_norm_entries(f"{prefix}/LayerNorm_1", block.norm2))
    for i, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
        e[f"{prefix}/MlpBlock_0/Dense_{i}/kernel"] = (fc.weight, "dense")
        e[f"{prefix}/MlpBlock_0/Dense_{i}/bias"] = (fc.bias, "copy")
    return e


def _flax_entries(model: QnAViT) -> Tuple[Dict[str, Entry], Dict[str, Entry]]:
    """Every original parameter (and batch statistic) name with its tensor and layout mapping."""
    params: Dict[str, Entry] = {}
    stats: Dict[str, Entry] = {}
    stem = model.stem
    if isinstance(stem, PatchStem):
        params["StemBlock_0/conv_1x1/kernel"] = (stem.conv.weight, "conv")
    else:
        params["StemBlock_0/conv_7x7/kernel"] = (stem.conv.weight, "conv")
        params.update(_norm_entries("StemBlock_0/BatchNorm_0", stem.bn))
        stats["StemBlock_0/BatchNorm_0/mean"] = (stem.bn.running_mean, "copy")
        stats["StemBlock_0/BatchNorm_0/var"] = (stem.bn.running_var, "copy")
    for s, stage in enumerate(model.stages):
        # Flax names a stage's LSA and QnA halves as two modules with the same stage index; a half
        # without parameters does not appear in the tree at all.
        for i, blk in enumerate(stage.lsa_blocks):
            params.update(_block_entries(f"LSAStage_{s}/MSA_Block_{i + 1}", blk))
        for i, blk in enumerate(stage.qna_blocks):
            params.update(_block_entries(f"QnAStage_{s}/QnA_Block_{i + 1}", blk))
        if stage.downsample is not None:
            name = f"QnAStage_{s}/QnA_Block_{len(stage.qna_blocks) + 1}_stride_2"
            params.update(_block_entries(name, stage.downsample))
    head = model.head
    params.update(_norm_entries("ClassificationHead_0/LayerNorm_0", head.norm))
    if head.qna is not None:
        params.update(_qna_entries("ClassificationHead_0/FusedKQnA_0", head.qna))
    if isinstance(head.fc, nn.Linear):
        params["ClassificationHead_0/head_logits/kernel"] = (head.fc.weight, "dense")
        params["ClassificationHead_0/head_logits/bias"] = (head.fc.bias, "copy")
    return params, stats


def flax_param_shapes(model: QnAViT) -> Dict[str, Tuple[int, ...]]:
    """The original parameter names (``/``-joined) and shapes of ``model``'s configuration."""
    params, _ = _flax_entries(model)
    return {k: _FLAX_SHAPE[kind](t.shape) for k, (t, kind) in params.items()}


@torch.no_grad()
def export_flax_params(model: QnAViT) -> Dict[str, Any]:
    """``model``'s parameters as the original nested parameter tree (float32 numpy arrays, Flax layouts);
    the inverse of :func:`load_flax_params`."""
    params, _ = _flax_entries(model)
    return _unflatten({k: _TO_FLAX[kind](t.detach()) for k, (t, kind) in params.items()})


@torch.no_grad()
def export_flax_batch_stats(model: QnAViT) -> Dict[str, Any]:
    """The original ``batch_stats`` collection of ``model`` (empty unless it has the ``resnet`` stem)."""
    _, stats = _flax_entries(model)
    return _unflatten({k: t.detach() for k, (t, _) in stats.items()})


def _unflatten(flat: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for key, t in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(t.float().cpu().numpy())
    return tree


# ----------------------------------------------------------------------------------- fine-tuning
# Tables the original's fine-tuning resizes when their shape changes (docs/spec.md, section Fine-tuning):
# QnA relative-position biases [k*k, N*h] and attention scales [1, 1, k*k, N*h], LSA relative-position
# tables [(2w-1)^2, heads]; the same names and layouts in the Flax tree and in the state dict.
_TABLE_LEAVES = ("rpe_bias", "attn_scale_weights", "relative_position_bias_table")
_FLAX_CLASSIFIER = ("ClassificationHead_0/head_logits/kernel", "ClassificationHead_0/head_logits/bias")
_TORCH_CLASSIFIER = ("head.fc.weight", "head.fc.bias")


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (the kernel of ``jax.image.resize``'s 'bicubic')."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _resize_matrix(n: int, m: int) -> np.ndarray:
    """``[m, n]`` weights resampling ``n`` samples to ``m`` as ``jax.image.resize(..., 'bicubic')``:
    half-pixel centres, the kernel stretched by ``1 / scale`` when shrinking (antialiasing), each row
    normalised over the taps inside the input (no edge padding)."""
    scale = m / n
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(m, dtype=np.float64) + 0.5) / scale - 0.5
    w = _keys_cubic((np.arange(n, dtype=np.float64)[None, :] - centres[:, None]) / kernel_scale)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(np.abs(total) > 1000 * np.finfo(np.float64).eps, w / np.where(total != 0, total, 1.0), 0.0)
    inside = (centres >= -0.5) & (centres <= n - 0.5)
    return np.where(inside[:, None], w, 0.0)


def resize_table(table: Any, size: Tuple[int, int]) -> np.ndarray:
    """Resizes ``table`` ``[H, W, ...]`` to ``[size[0], size[1], ...]`` exactly as
    ``jax.image.resize(table, (*size, ...), 'bicubic')`` does (separable over the two leading axes,
    antialiased when shrinking, the trailing axes untouched); computed in float64."""
    a = np.asarray(table, dtype=np.float64)
    if a.ndim < 2 or len(size) != 2 or min(size) < 1:
        raise ValueError(f"resize_table needs a [H, W, ...] table and a positive (H', W'), got {a.shape}, {size}")
    a = np.tensordot(_resize_matrix(a.shape[0], size[0]), a, axes=(1, 0))
    a = np.moveaxis(np.tensordot(_resize_matrix(a.shape[1], size[1]), a, axes=(1, 1)), 0, 1)
    return a


def _square_side(n: int) -> Optional[int]:
    s = math.isqrt(n)
    return s if s * s == n else None


def _resize_leaf(name: str, value: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """A position or attention-scale table resized to ``shape`` as the original's fine-tuning: viewed as
    ``[s, s, C]`` (``[s*s, C]`` tables and ``[1, 1, s*s, C]`` scales), resized, viewed back."""
    old = tuple(value.shape)
    sides = None
    if len(old) == len(shape) == 2 or (len(old) == len(shape) == 4 and old[:2] == shape[:2] == (1, 1)):
        sides = (_square_side(old[-2]), _square_side(shape[-2]))
    if sides is None or None in sides or old[-1] != shape[-1]:
        raise CheckpointError(f"parameter {name!r}: cannot resize {old} to {shape} (a table [s*s, C] or "
                              f"[1, 1, s*s, C] with the same last axis)")
    (s, t), c = sides, old[-1]
    out = resize_table(value.reshape(s, s, c), (t, t))
    return out.reshape(shape)


@dataclass
class LoadReport:
    """What a (resizing) load did, by parameter name: copied as is, resized from the checkpoint's shape
    to the model's, kept as newly initialised (a classifier for another class count, or one the
    checkpoint lacks), and checkpoint entries left out (the classifier of a model built without one)."""

    loaded: List[str] = dataclasses.field(default_factory=list)
    resized: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    initialised: List[str] = dataclasses.field(default_factory=list)
    dropped: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)}, resized {len(self.resized)}, newly initialised "
                 f"{len(self.initialised)}, dropped {len(self.dropped)}"]
        lines += [f"  resized {k}: {a} -> {b}" for k, (a, b) in self.resized.items()]
        lines += [f"  newly initialised {k}" for k in self.initialised]
        lines += [f"  dropped {k}" for k in self.dropped]
        return "\n".join(lines)


def _plan_load(expected: Mapping[str, Tuple[int, ...]], given: Mapping[str, Tuple[int, ...]],
               classifier: Sequence[str], resize: bool, where: str) -> LoadReport:
    """Matches a checkpoint's names and shapes to the model's; raises CheckpointError naming the first
    entry that fits neither as is, nor as a resizable table, nor as the classifier (``resize`` only)."""
    report = LoadReport()
    optional = set(classifier) if resize else set()
    missing = sorted(set(expected) - set(given) - optional)
    if missing:
        raise CheckpointError(f"{where}missing key {missing[0]!r} (missing: {missing})")
    unexpected = sorted(set(given) - set(expected) - optional)
    if unexpected:
        raise CheckpointError(f"{where}unexpected key {unexpected[0]!r} (unexpected: {unexpected})")
    report.initialised = sorted(optional & (set(expected) - set(given)))
    report.dropped = sorted(optional & (set(given) - set(expected)))
    for key in sorted(set(expected) & set(given)):
        old, new = tuple(given[key]), tuple(expected[key])
        if old == new:
            report.loaded.append(key)
        elif key in optional:
            report.initialised.append(key)
        elif resize and key.rsplit("/", 1)[-1].rsplit(".", 1)[-1] in _TABLE_LEAVES:
            if old[-1:] != new[-1:]:
                raise CheckpointError(f"{where}parameter {key!r} has shape {old}, expected {new}: a table "
                                      "is resized over its positions only, its last axis must match")
            report.resized[key] = (old, new)
        else:
            hint = "" if resize else " (resize=True resizes position and attention-scale tables)"
            raise CheckpointError(f"{where}key {key!r} has shape {old}, expected {new}{hint}")
    return report


@torch.no_grad()
def load_flax_params(model: QnAViT, params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]] = None,
                     resize: bool = False) -> LoadReport:
    """Loads an original QnA-ViT parameter tree (nested dicts of arrays, Flax names) into ``model``.

    Every entry is mapped and every shape checked before anything is copied: a missing, unexpected or
    mis-shaped key raises :class:`qna_triton.CheckpointError` naming it, and leaves ``model`` untouched.

    With ``resize=True`` (fine-tuning from a checkpoint of another geometry: other LSA windows, another
    QnA window, another resolution for a ``qnav*`` head) every position and attention-scale table whose
    shape differs is resized as the original does (:func:`resize_table`), and a classifier for another
    class count (or absent on either side) is left newly initialised; anything else mismatched still
    raises.

    Args:
        model: a :class:`QnAViT` of the checkpoint's architecture (depths, widths, stem, layer scale).
        params: the ``params`` collection of the original train state.
        batch_stats: the ``batch_stats`` collection; needed (only) by the ``resnet`` stem's BatchNorm.
        resize: resize mismatched tables and allow a new classifier.

    Returns:
        A :class:`LoadReport` of what was loaded, resized and newly initialised.
    """
    if not isinstance(model, QnAViT):
        raise TypeError(f"model must be a QnAViT, got {type(model).__name__}")
    entries, stat_entries = _flax_entries(model)
    flat = flatten_tree(params)
    expected = {k: _FLAX_SHAPE[kind](t.shape) for k, (t, kind) in entries.items()}
    report = _plan_load(expected, {k: v.shape for k, v in flat.items()}, _FLAX_CLASSIFIER, resize, "params: ")
    for key in report.loaded + list(report.resized):
        if not np.issubdtype(flat[key].dtype, np.floating):
            raise CheckpointError(f"params: key {key!r} has dtype {flat[key].dtype}, expected a float array")
    flat_stats = flatten_tree(batch_stats) if batch_stats is not None else {}
    if stat_entries and batch_stats is None:
        raise CheckpointError(
            f"batch_stats: missing key {sorted(stat_entries)[0]!r}: the resnet stem's BatchNorm needs the "
            "checkpoint's batch_stats collection"
        )
    check_tree(flat_stats, {k: tuple(t.shape) for k, (t, _) in stat_entries.items()}, where="batch_stats: ")
    values = {k: flat[k] for k in report.loaded}
    values.update({k: _resize_leaf(k, flat[k], new) for k, (_, new) in report.resized.items()})
    for source, table in ((values, entries), (flat_stats, stat_entries)):
        for key, value in source.items():
            tensor, kind = table[key]
            tensor.copy_(torch.from_numpy(np.array(_TO_TORCH[kind](value), dtype=np.float32)))
    return report


def resize_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, torch.Tensor],
                                                                                          LoadReport]:
    """A QnA-ViT state dict (ours: converted or trained) fitted to ``model``'s geometry: mismatched
    position and attention-scale tables resized as :func:`load_flax_params` with ``resize=True`` does,
    the model's own (fresh) classifier kept where the class count differs. Returns the complete state
    dict for ``model`` and the :class:`LoadReport`; anything else mismatched raises CheckpointError."""
    own = model.state_dict()
    report = _plan_load({k: tuple(v.shape) for k, v in own.items()},
                        {k: tuple(v.shape) for k, v in state_dict.items()}, _TORCH_CLASSIFIER, True, "")
    out = {k: own[k] for k in report.initialised}
    out.update({k: state_dict[k] for k in report.loaded})
    for key, (_, new) in report.resized.items():
        value = state_dict[key].detach().to("cpu", torch.float64).numpy()
        out[key] = torch.from_numpy(_resize_leaf(key, value, new)).to(own[key].dtype)
    return out, report


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: ``pretrained=True`` with a converted checkpoint
    (``pretrained_cfg_overlay=dict(file=...)``) resizes its tables to the model, as fine-tuning does."""
    return resize_state_dict(state_dict, model)[0]


def load_weights(model: QnAViT, checkpoint: Union[str, os.PathLike[str], Mapping[str, Any]],
                    resize: bool = True) -> LoadReport:
    """Loads one of our checkpoints (``examples/convert_flax.py``'s or ``examples/train.py``'s file, or a
    bare state dict) into ``model``; with ``resize`` (default) from another geometry, as
    :func:`resize_state_dict`. Returns the :class:`LoadReport`."""
    if not isinstance(model, QnAViT):
        raise TypeError(f"model must be a QnAViT, got {type(model).__name__}")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True) if not isinstance(checkpoint, Mapping) \
        else checkpoint
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("expected a state dict, or a checkpoint holding one under 'model' or 'state_dict'")
    if resize:
        state, report = resize_state_dict(state, model)
    else:
        own = model.state_dict()
        report = _plan_load({k: tuple(v.shape) for k, v in own.items()},
                            {k: tuple(v.shape) for k, v in state.items()}, _TORCH_CLASSIFIER, False, "")
    model.load_state_dict(state)
    return report


# ----------------------------------------------------------------------------------- factory
def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> QnAViT:
    """Builds a QnA-ViT by name (``qna_vit_tiny``, ``qna_vit_tiny_7x7``, ``qna_vit_small``, ``qna_vit_base``).

    ``overrides`` replace fields of :class:`QnAViTConfig` (e.g. ``drop_path``, ``layer_scale``, ``head``,
    ``stem``, ``img_size``, or the architecture itself; ``**FINETUNE_384`` for the fine-tuning geometry),
    or are :class:`QnAViT`'s timm-style options (``global_pool``, ``drop_path_rate``, ``device``, ``dtype``).
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_CONFIGS)}")
    model = QnAViT(MODEL_CONFIGS[name], num_classes=num_classes, **overrides)
    model.pretrained_cfg["architecture"] = name
    return model


_PAPER = dict(paper_ids="arXiv:2112.11435", paper_name="Learned Queries for Efficient Local Attention")


def _default_cfg(cfg: QnAViTConfig) -> Dict[str, Any]:
    """The model's pretrained_cfg (timm's keys): the ImageNet evaluation transform of the paper's
    recipe, the final map of ``img_size`` as ``pool_size``, and the first conv and classifier names."""
    final = _ceil_div(cfg.img_size[0], 32), _ceil_div(cfg.img_size[1], 32)
    return dict(
        url="", input_size=(cfg.in_chans,) + tuple(cfg.img_size), pool_size=final, crop_pct=0.875,
        crop_mode="center", interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_classes=cfg.num_classes, first_conv="stem.conv", classifier="head.fc",
        fixed_input_size=cfg.head != "gap", **_PAPER,
    )


default_cfgs = (_timm_default_cfgs({name: _default_cfg(cfg.normalized()) for name, cfg in MODEL_CONFIGS.items()})
                if _timm_default_cfgs is not None else {})

# timm passes these to every entry point; they configure its pretrained-weight machinery.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg")


def _weight_source(kwargs: Mapping[str, Any]) -> bool:
    cfgs = [kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")]
    return any(isinstance(c, Mapping) and any(c.get(k) for k in ("file", "url", "state_dict", "hf_hub_id"))
               for c in cfgs)


def _entrypoint(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """Builds ``name`` through timm's ``build_model_with_cfg`` when timm imports (its pretrained_cfg,
    ``pretrained_cfg_overlay``, ``features_only`` wrappers, ``pretrained=True`` from a converted file,
    tables resized to the model), else directly."""
    if pretrained and not _weight_source(kwargs):
        raise ValueError(
            f"no downloadable weights for {name}: convert an original Flax checkpoint with "
            "examples/convert_flax.py and load it (timm: pretrained_cfg_overlay=dict(file=...), or "
            "checkpoint_path=...)"
        )
    if _timm_build is None:
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        given = [k for k in _FEATURE_KWARGS if kwargs.pop(k, None)]
        if given or pretrained:
            raise ValueError(f"{given or ['pretrained']} need timm (pip install timm); without it use "
                             "forward_intermediates() and load_weights()")
        return QnAViT(MODEL_CONFIGS[name], **kwargs)
    # getter: the pyramid from forward_intermediates (NCHW); 'hook' and 'fx' also work, 'list' does not
    # (the stages are not a sequence of children: each is followed by its down-sampling block).
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(MODEL_CONFIGS[name].n_stages)),
                       **kwargs.pop("feature_cfg", None) or {})
    cls = kwargs.get("feature_cls", feature_cfg["feature_cls"])
    if kwargs.get("features_only") and cls == "fx":
        cfg = dataclasses.replace(MODEL_CONFIGS[name], **{k: v for k, v in kwargs.items()
                                                          if k in QnAViTConfig.__dataclass_fields__}).normalized()
        if any(not cfg.qna_layers[s] for s in range(cfg.n_stages - 1)):
            raise ValueError("feature_cls='fx' needs a QnA block ending every stage but the last (its "
                             "feature node); use the default 'getter' or 'hook'")
    return _timm_build(functools.partial(QnAViT, MODEL_CONFIGS[name]), name, pretrained,
                       pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)


def qna_vit_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """QnA-ViT tiny: 15.7M parameters, 2.5 GFLOPs, 81.7% ImageNet top-1 (paper)."""
    return _entrypoint("qna_vit_tiny", pretrained, kwargs)


def qna_vit_tiny_7x7(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """QnA-ViT tiny with 7x7 QnA windows: 15.8M parameters, 2.6 GFLOPs, 82.0% top-1 (paper)."""
    return _entrypoint("qna_vit_tiny_7x7", pretrained, kwargs)


def qna_vit_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """QnA-ViT small: 25.0M parameters, 4.4 GFLOPs, 83.2% top-1 (paper)."""
    return _entrypoint("qna_vit_small", pretrained, kwargs)


def qna_vit_base(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """QnA-ViT base: 55.7M parameters, 9.7 GFLOPs, 83.9% top-1 (paper)."""
    return _entrypoint("qna_vit_base", pretrained, kwargs)


if _timm_register is not None:
    for _fn in (qna_vit_tiny, qna_vit_tiny_7x7, qna_vit_small, qna_vit_base):
        _timm_register(_fn)
