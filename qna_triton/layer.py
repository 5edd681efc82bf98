"""``QnA``: the layer as an ``nn.Module`` (parameters, projections, attention-scale modes)."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._validation import IntOrPair, as_pair, check_window
from .export import route
from .flax_params import load_qna_params, qna_param_shapes
from .layout import default_padding

__all__ = ["QnA", "ATTN_SCALE_MODES"]

ATTN_SCALE_MODES = ("normal", "normal_elementwise", "ones", "posneg", "avg", "none")


def lecun_normal_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax's default kernel init (``Dense``, ``Conv``), in place: a unit normal truncated to [-2, 2],
    rescaled to variance ``1 / fan_in`` (``docs/spec.md`` 1.2). Used by the layer and the QnA-ViT models.

    Sampled by redrawing the out-of-range values (about 5%): exact, and much faster on CPU than
    ``nn.init.trunc_normal_``'s inverse-CDF transform, which dominated building the large models.
    """
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of the unit normal truncated to [-2, 2]
    if t.is_meta:  # a model built on the meta device (timm's structure checks) has no values to draw
        return t
    with torch.no_grad():
        flat = t.view(-1).normal_()
        redraw = (flat.abs() > 2.0).nonzero().squeeze(1)
        while redraw.numel():
            values = torch.randn(redraw.numel(), dtype=t.dtype, device=t.device)
            flat[redraw] = values
            redraw = redraw[values.abs() > 2.0]
        return t.mul_(std)


class QnA(nn.Module):
    """QnA local attention with learned queries (Arar, Shamir, Bermano, CVPR 2022).

    Input ``[B, H, W, in_features]`` (channels-last) -> ``[B, H_out, W_out, out_features]``.
    On CUDA the layer is one fused projection (logits and values), the fused Triton kernel and the
    output projection; on CPU the same op runs its PyTorch reference.

    Args:
        in_features: input channels ``C_in``.
        features: attention width ``C = heads * head_dim``.
        heads: number of heads; must divide ``features``.
        kernel_size: window ``k`` or ``(k_h, k_w)``.
        stride: ``s`` or ``(s_h, s_w)``.
        padding: ``p`` or ``(p_h, p_w)``; None means ``(k - 1) // 2``.
        n_queries: learned queries ``N`` per head.
        attn_scale: one of ``normal`` (paper), ``normal_elementwise``, ``ones``, ``posneg``, ``avg``, ``none``.
        normalize_q: L2-normalise each query before the ``1/sqrt(d)`` scaling.
        use_bias: biases on the key, value and output projections.
        out_features: output channels; None means ``features``.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        heads: int,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: Optional[IntOrPair] = None,
        n_queries: int = 2,
        attn_scale: str = "normal",
        normalize_q: bool = True,
        use_bias: bool = False,
        out_features: Optional[int] = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("features", features),
            ("heads", heads),
            ("n_queries", n_queries),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if features % heads:
            raise ValueError(f"heads ({heads}) must divide features ({features})")
        if out_features is not None and (not isinstance(out_features, int) or out_features < 1):
            raise ValueError(f"out_features must be a positive int or None, got {out_features!r}")
        if attn_scale not in ATTN_SCALE_MODES:
            raise ValueError(f"attn_scale must be one of {ATTN_SCALE_MODES}, got {attn_scale!r}")
        self.in_features, self.features, self.heads = in_features, features, heads
        self.head_dim = features // heads
        self.n_queries = n_queries
        self.kernel_size = as_pair(kernel_size, "kernel_size", 1)
        self.stride = as_pair(stride, "stride", 1)
        self.padding = default_padding(self.kernel_size) if padding is None else as_pair(padding, "padding", 0)
        self.attn_scale = attn_scale
        self.normalize_q = bool(normalize_q)
        self.use_bias = bool(use_bias)
        self.out_features = features if out_features is None else out_features
        N, h, d, K = n_queries, heads, self.head_dim, self.kernel_size[0] * self.kernel_size[1]

        # Flax layouts for the query-side parameters (they are folded, never used as a Linear).
        self.query = nn.Parameter(torch.empty(N, features))
        self.Wk = nn.Parameter(torch.empty(in_features, features))
        self.Wk_b = nn.Parameter(torch.zeros(h, d)) if use_bias else None
        self.to_v = nn.Linear(in_features, features, bias=use_bias)
        self.to_out = nn.Linear(features, self.out_features, bias=use_bias)
        self.rpe_bias = nn.Parameter(torch.zeros(K, N * h))
        self.attn_scale_weights: Optional[nn.Parameter] = None
        self.attn_scale_pos: Optional[nn.Parameter] = None
        if attn_scale == "normal":
            self.attn_scale_weights = nn.Parameter(torch.empty(1, 1, K, N * h))
        elif attn_scale == "normal_elementwise":
            self.attn_scale_weights = nn.Parameter(torch.empty(1, 1, 1, N * h))
        elif attn_scale == "ones":
            self.attn_scale_pos = nn.Parameter(torch.empty(1, 1, K, N, h))
        elif attn_scale in ("posneg", "avg"):
            if attn_scale == "posneg":
                col = torch.arange(N * h, dtype=torch.float32)
                fixed = torch.where(col < N * h / 2, 1.0, -1.0)
            else:
                fixed = torch.full((N * h,), 1.0 / N)
            self.register_buffer("fixed_scale", fixed.reshape(1, N, h).expand(K, N, h).clone(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation as the original: LeCun-normal projections, truncated-normal queries."""
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, 0.0, 1.0, -2.0, 2.0).mul_(math.sqrt(1.0 / self.head_dim))
            lecun_normal_(self.Wk, self.in_features)
            lecun_normal_(self.to_v.weight, self.in_features)
            lecun_normal_(self.to_out.weight, self.features)
            for b in (self.Wk_b, self.to_v.bias, self.to_out.bias):
                if b is not None:
                    b.zero_()
            self.rpe_bias.zero_()
            if self.attn_scale_weights is not None:
                nn.init.normal_(self.attn_scale_weights, 0.0, 0.02)
            if self.attn_scale_pos is not None:
                self.attn_scale_pos.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.features}, heads={self.heads}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, n_queries={self.n_queries}, "
            f"attn_scale={self.attn_scale!r}, normalize_q={self.normalize_q}, use_bias={self.use_bias}, "
            f"out_features={self.out_features}"
        )

    def scale_tensor(self) -> Optional[torch.Tensor]:
        """The attention scale ``a`` as ``[k_h*k_w, N, h]`` for the core op (None for mode ``none``)."""
        K, N, h = self.kernel_size[0] * self.kernel_size[1], self.n_queries, self.heads
        if self.attn_scale == "normal":
            return self.attn_scale_weights.reshape(K, N, h)
        if self.attn_scale == "normal_elementwise":
            return self.attn_scale_weights.reshape(1, N, h).expand(K, N, h)
        if self.attn_scale == "ones":
            return self.attn_scale_pos.reshape(K, N, h)
        if self.attn_scale in ("posneg", "avg"):
            return self.fixed_scale
        return None

    def fused_projection_weight(self) -> tuple:
        """``(weight [h*N + C, C_in], bias or None)`` of the one projection giving logits and values.

        The queries are folded into ``W_k`` (``C_in x h*N``), so keys are never formed. The logits
        rows are query-minor (row ``j*N + n``: query ``n`` of head ``j``), the layout
        :func:`qna_triton.layout.split_packed` reads and the kernels load fastest.
        """
        N, h, d = self.n_queries, self.heads, self.head_dim
        q = self.query.reshape(N, h, d)
        if self.normalize_q:
            q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + 1e-6)
        q = q / math.sqrt(d)
        wq = torch.einsum("cjt,njt->jnc", self.Wk.reshape(self.in_features, h, d), q)
        weight = torch.cat([wq.reshape(N * h, self.in_features), self.to_v.weight], dim=0)
        if not self.use_bias:
            return weight, None
        bq = torch.einsum("jt,njt->jn", self.Wk_b, q).reshape(N * h)
        return weight, torch.cat([bq, self.to_v.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must have shape [B, H, W, C_in] (channels-last), got {tuple(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} channels (last dim), expected in_features={self.in_features}")
        if x.device != self.query.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {self.query.device}")
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        if not autocast and x.dtype != self.query.dtype:
            raise TypeError(f"x dtype {x.dtype} differs from the layer's parameter dtype {self.query.dtype}")
        B, H, W, _ = x.shape
        Ho, Wo = check_window((H, W), self.kernel_size, self.stride, self.padding)
        N, h = self.n_queries, self.heads
        weight, bias = self.fused_projection_weight()
        qv = F.linear(x, weight, bias)  # [B, H, W, h*N + C]: logits and values in one pass over x
        out, _ = route(ops.attention_packed)(
            qv,
            self.rpe_bias.reshape(-1, N, h),
            self.scale_tensor(),
            list(self.kernel_size),
            list(self.stride),
            list(self.padding),
        )
        return self.to_out(out.reshape(B, Ho, Wo, self.features))

    # ------------------------------------------------------------------ original checkpoints
    def flax_param_shapes(self) -> Dict[str, tuple]:
        """The original layer's parameter names (``/``-joined) and shapes for this configuration
        (:func:`qna_triton.flax_params.qna_param_shapes`)."""
        return qna_param_shapes(self)

    def load_flax_params(self, tree: Mapping[str, Any]) -> None:
        """Loads the original layer's parameter sub-tree (nested dicts of arrays, Flax names); every key and
        shape is checked first (:func:`qna_triton.flax_params.load_qna_params`)."""
        load_qna_params(self, tree)
