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
(``timm.create_model("qna_vit_tiny")``).
"""

from __future__ import annotations

import dataclasses
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

__all__ = [
    "QnAViT",
    "QnAViTConfig",
    "MODEL_CONFIGS",
    "create_model",
    "load_flax_params",
    "export_flax_params",
    "export_flax_batch_stats",
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

    def normalized(self) -> "QnAViTConfig":
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


# ----------------------------------------------------------------------------------- building blocks
def _dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
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


def _pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
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


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with a Swin-style relative position bias.

    Input ``[B * n_windows, w*w, C]`` (tokens of each window in row-major order). ``to_qkv`` is packed
    per head as the original: output column ``j*3d + t`` is q (``t < d``), k or v of head ``j``.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (self.heads, 3 * self.head_dim)).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B', heads, L, d]
        bias = self.relative_position_bias().to(q.dtype)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.skip(x) + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _qna_layer(in_features: int, features: int, heads: int, kernel_size: Union[int, Tuple[int, int]],
               stride: int = 1, padding: Optional[int] = None) -> QnA:
    return QnA(in_features, features, heads, kernel_size=kernel_size, stride=stride, padding=padding,
               n_queries=N_QUERIES, attn_scale="normal", normalize_q=True, use_bias=False)


class QnAViTStage(nn.Module):
    """LSA blocks (on windows), then QnA blocks, then an optional down-sampling QnA block."""

    def __init__(self, cfg: QnAViTConfig, s: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        dim, k, ls = cfg.stage_dim(s), cfg.kernel_size[s], cfg.layer_scale
        n_lsa, n_qna = cfg.lsa_layers[s], cfg.qna_layers[s]
        self.window = cfg.lsa_window[s]
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
            B, H, W, C = x.shape
            w = self.window
            x = x.reshape(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(-1, w * w, C)
            for blk in self.lsa_blocks:
                x = blk(x)
            x = x.reshape(B, H // w, W // w, w, w, C).transpose(2, 3).reshape(B, H, W, C)
        for blk in self.qna_blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
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
        return self.conv(_pad_same(x, self.patch_size, self.patch_size))


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
        x = self.act(self.bn(self.conv(_pad_same(x, 7, 2))))
        return F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ClassifierHead(nn.Module):
    """LayerNorm, then a mean pool (``gap``) or one QnA window over the whole map (``qnav1``; ``qnav2``
    adds the mean pool), then dropout and the classifier ``fc``."""

    def __init__(self, dim: int, num_classes: int, head_type: str, heads: int, feat_size: Tuple[int, int],
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.head_type, self.feat_size = head_type, tuple(feat_size)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.qna = _qna_layer(dim, dim, heads, self.feat_size, padding=0) if head_type != "gap" else None
        self.drop = nn.Dropout(drop_rate)
        self.fc = _dense(dim, num_classes, bias=True) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.qna is None:
            x = x.mean(dim=(1, 2))
        else:
            pooled = self.qna(x).flatten(1)  # one output pixel: [B, 1, 1, C] -> [B, C]
            x = pooled + x.mean(dim=(1, 2)) if self.head_type == "qnav2" else pooled
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


# ----------------------------------------------------------------------------------- the model
class QnAViT(nn.Module):
    """QnA-ViT: ``[B, in_chans, H, W]`` images -> ``[B, num_classes]`` logits.

    ``forward_features`` gives the last stage's map channels-last (``[B, h, w, C]``, before the head's
    LayerNorm); ``forward_head`` pools and classifies it. Any input size works for which every LSA
    window divides its stage's feature map (224: maps 56, 28, 14, 7); ``qnav*`` heads also need the
    final map to be the one of ``img_size``.
    """

    def __init__(self, config: Optional[QnAViTConfig] = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else QnAViTConfig()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(QnAViTConfig)})
        if unknown:
            raise TypeError(f"unknown QnAViT option(s) {unknown}")
        cfg = dataclasses.replace(config, **overrides).normalized()
        self.config = cfg
        self.num_classes = cfg.num_classes
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
        # The qnav* heads' window is the final map of img_size, so it must be a valid input size.
        feat = self._check_stage_sizes(*cfg.img_size)[-1] if cfg.head != "gap" else (1, 1)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.head, cfg.qna_heads[-1], feat,
                                   cfg.drop_rate)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (cfg.in_chans,) + tuple(cfg.img_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic", "num_classes": cfg.num_classes,
            "first_conv": "stem.conv", "classifier": "head.fc",
        }

    # ---------------------------------------------------------------- sizes
    def stage_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Feature-map size at the input of every stage, then the final one (``n_stages + 1`` entries)."""
        h, w = self.stem.output_size(height, width)
        sizes = [(h, w)]
        for s in range(self.config.n_stages - 1):
            k = self.config.kernel_size[s]
            h, w = (h + 2 * ((k - 1) // 2) - k) // 2 + 1, (w + 2 * ((k - 1) // 2) - k) // 2 + 1
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
            win = cfg.lsa_window[s]
            if cfg.lsa_layers[s] and (h % win or w % win):
                raise ValueError(
                    f"input size {height}x{width} is not supported: stage {s}'s feature map is {h}x{w}, "
                    f"not divisible by its LSA window {win} (at 224x224 the maps are 56, 28, 14, 7)"
                )
            if s < cfg.n_stages - 1:
                skip = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
                if skip != sizes[s + 1]:
                    raise ValueError(
                        f"input size {height}x{width} is not supported: stage {s}'s down-sampling QnA gives "
                        f"{sizes[s + 1]} but its strided skip gives {skip} (window {cfg.kernel_size[s]})"
                    )
        return sizes

    def _check_input_size(self, height: int, width: int) -> None:
        final = self._check_stage_sizes(height, width)[-1]
        if self.head.qna is not None and tuple(final) != self.head.feat_size:
            raise ValueError(
                f"input size {height}x{width} is not supported by the {self.head_type!r} head: its QnA "
                f"window covers the {self.head.feat_size} final map of img_size {self.config.img_size}, "
                f"this input gives {tuple(final)}"
            )

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> last stage's map ``[B, h, w, C]`` (channels-last)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected input [B, {self.config.in_chans}, H, W] (NCHW), got {tuple(x.shape)}")
        self._check_input_size(x.shape[2], x.shape[3])
        x = self.stem(x).permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features ``[B, h, w, C]`` -> logits ``[B, num_classes]`` (pooled ``[B, C]`` with ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---------------------------------------------------------------- timm conventions
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier with a fresh one for ``num_classes`` outputs (0: pooled features)."""
        if global_pool is not None and global_pool != self.head_type:
            raise ValueError(f"this model's head is {self.head_type!r}; build a new model to change it "
                             f"(got global_pool={global_pool!r})")
        ref = self.head.norm.weight
        fc = _dense(self.num_features, num_classes, bias=True) if num_classes > 0 else nn.Identity()
        self.head.fc = fc.to(device=ref.device, dtype=ref.dtype)
        self.num_classes = num_classes
        self.pretrained_cfg = self.default_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

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
    def load_flax_params(self, params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]] = None) -> None:
        """Same as :func:`load_flax_params`."""
        load_flax_params(self, params, batch_stats)


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
def load_flax_params(model: QnAViT, params: Mapping[str, Any],
                     batch_stats: Optional[Mapping[str, Any]] = None) -> None:
    """Loads an original QnA-ViT parameter tree (nested dicts of arrays, Flax names) into ``model``.

    Every entry is mapped and every shape checked before anything is copied: a missing, unexpected or
    mis-shaped key raises :class:`qna_triton.CheckpointError` naming it, and leaves ``model`` untouched.

    Args:
        model: a :class:`QnAViT` of the checkpoint's configuration (same classes, head, stem, layer scale).
        params: the ``params`` collection of the original train state.
        batch_stats: the ``batch_stats`` collection; needed (only) by the ``resnet`` stem's BatchNorm.
    """
    if not isinstance(model, QnAViT):
        raise TypeError(f"model must be a QnAViT, got {type(model).__name__}")
    entries, stat_entries = _flax_entries(model)
    flat = flatten_tree(params)
    check_tree(flat, {k: _FLAX_SHAPE[kind](t.shape) for k, (t, kind) in entries.items()}, where="params: ")
    flat_stats = flatten_tree(batch_stats) if batch_stats is not None else {}
    if stat_entries and batch_stats is None:
        raise CheckpointError(
            f"batch_stats: missing key {sorted(stat_entries)[0]!r}: the resnet stem's BatchNorm needs the "
            "checkpoint's batch_stats collection"
        )
    check_tree(flat_stats, {k: tuple(t.shape) for k, (t, _) in stat_entries.items()}, where="batch_stats: ")
    for source, table in ((flat, entries), (flat_stats, stat_entries)):
        for key, (tensor, kind) in table.items():
            value = torch.from_numpy(np.array(_TO_TORCH[kind](source[key]), dtype=np.float32))
            tensor.copy_(value)


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


# ----------------------------------------------------------------------------------- factory
def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> QnAViT:
    """Builds a QnA-ViT by name (``qna_vit_tiny``, ``qna_vit_tiny_7x7``, ``qna_vit_small``, ``qna_vit_base``).

    ``overrides`` replace fields of :class:`QnAViTConfig` (e.g. ``drop_path``, ``layer_scale``, ``head``,
    ``stem``, ``img_size``, or the architecture itself).
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_CONFIGS)}")
    return QnAViT(MODEL_CONFIGS[name], num_classes=num_classes, **overrides)


# timm passes these to every entry point; they configure its pretrained-weight machinery.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> QnAViT:
    if pretrained:
        raise ValueError(
            f"no downloadable weights for {name}: convert an original Flax checkpoint with "
            "examples/convert_flax.py and load it (timm: checkpoint_path=...)"
        )
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if "drop_path_rate" in kwargs:  # timm's name for it
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    if "global_pool" in kwargs:
        kwargs["head"] = kwargs.pop("global_pool") or "gap"
    return create_model(name, **kwargs)


def qna_vit_tiny(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT tiny: 15.7M parameters, 2.5 GFLOPs, 81.7% ImageNet top-1 (paper)."""
    return _entrypoint("qna_vit_tiny", pretrained, kwargs)


def qna_vit_tiny_7x7(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT tiny with 7x7 QnA windows: 15.8M parameters, 2.6 GFLOPs, 82.0% top-1 (paper)."""
    return _entrypoint("qna_vit_tiny_7x7", pretrained, kwargs)


def qna_vit_small(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT small: 25.0M parameters, 4.4 GFLOPs, 83.2% top-1 (paper)."""
    return _entrypoint("qna_vit_small", pretrained, kwargs)


def qna_vit_base(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT base: 55.7M parameters, 9.7 GFLOPs, 83.9% top-1 (paper)."""
    return _entrypoint("qna_vit_base", pretrained, kwargs)


try:
    from timm.models import register_model as _timm_register
except Exception:  # timm is optional; a broken install (e.g. a torchvision built for another torch) too
    _timm_register = None
if _timm_register is not None:
    for _fn in (qna_vit_tiny, qna_vit_tiny_7x7, qna_vit_small, qna_vit_base):
        _timm_register(_fn)
