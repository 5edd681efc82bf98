"""QnA-ViT's architecture: :class:`QnAViTConfig`, the paper's four models (:data:`MODEL_CONFIGS`), the
fine-tuning geometry and the constants the original fixes (Flax's norm epsilons, ImageNet statistics)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

HEAD_TYPES = ("gap", "qnav1", "qnav2")
STEM_TYPES = ("patch", "resnet")
N_QUERIES = 2  # every QnA layer of the paper's models, the classification heads included
LN_EPS = 1e-6  # Flax's LayerNorm default, not PyTorch's 1e-5
BN_EPS = 1e-5  # Flax's BatchNorm default (resnet stem only)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        return self.base_dim * 2**s

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
            raise ValueError(
                f"head {cfg.head!r}: qna_heads[-1] = {cfg.qna_heads[-1]} does not divide the "
                f"final width {cfg.stage_dim(n - 1)}"
            )
        return cfg


def _is_seq(value: Any) -> bool:
    return isinstance(value, (tuple, list))


MODEL_CONFIGS: Dict[str, QnAViTConfig] = {
    "qna_vit_tiny": QnAViTConfig(
        base_dim=64,
        qna_layers=(2, 3, 2, 0),
        qna_heads=(8, 16, 32, 64),
        kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 4, 2),
        lsa_heads=(2, 4, 8, 16),
        lsa_window=(7, 7, 14, 7),
        drop_path=0.05,
    ),
    "qna_vit_tiny_7x7": QnAViTConfig(
        base_dim=64,
        qna_layers=(2, 3, 2, 0),
        qna_heads=(8, 16, 32, 64),
        kernel_size=(7, 7, 7, 7),
        lsa_layers=(0, 0, 4, 2),
        lsa_heads=(2, 4, 8, 16),
        lsa_window=(7, 7, 14, 7),
        drop_path=0.05,
    ),
    "qna_vit_small": QnAViTConfig(
        base_dim=64,
        qna_layers=(2, 3, 6, 0),
        qna_heads=(8, 16, 32, 64),
        kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 12, 2),
        lsa_heads=(2, 4, 8, 16),
        lsa_window=(7, 7, 14, 7),
        drop_path=0.2,
    ),
    "qna_vit_base": QnAViTConfig(
        base_dim=96,
        qna_layers=(2, 3, 6, 0),
        qna_heads=(6, 12, 24, 48),
        kernel_size=(3, 3, 3, 3),
        lsa_layers=(0, 0, 12, 2),
        lsa_heads=(3, 6, 12, 24),
        lsa_window=(7, 7, 14, 7),
        drop_path=0.5,
    ),
}


# The original's fine-tuning geometry (configs/imagenet_qna_finetune.py): 384 px, whose maps 96, 48, 24,
# 12 the LSA windows tile as the 224 ones tile 56, 28, 14, 7 (global attention in stages 2 and 3).
FINETUNE_384: Dict[str, Any] = dict(img_size=(384, 384), lsa_window=(12, 12, 24, 12))
