"""QnA-ViT, the hierarchical model of "Learned Queries for Efficient Local Attention" (Arar, Shamir,
Bermano, CVPR 2022), built on :class:`qna_triton.QnA` (docs/spec.md section 2).

The models hold exactly the original Flax parameters (same shapes, same count), so the official
checkpoints load one-to-one: :func:`load_flax_params` maps the original parameter tree onto a model and
:func:`export_flax_params` gives it back (both in :mod:`qna_vit.flax`). ``examples/convert_flax.py``
turns an original msgpack checkpoint into a PyTorch one.

Inputs are ``[B, 3, H, W]`` images (NCHW, like every torchvision/timm model); everything after the
stem runs channels-last (``[B, H, W, C]``), the layout of the QnA layer.

Usage (installed with qna-triton, the source in ``examples/qna_vit/``)::

    from qna_vit import create_model, load_flax_params
    model = create_model("qna_vit_tiny")                  # 15,715,560 parameters
    model = create_model("qna_vit_small", num_classes=10, drop_path=0.1, layer_scale=1e-5)

Importing this module registers the four models with timm (``timm.create_model("qna_vit_tiny")``,
``features_only=True`` for a 4-level feature pyramid); qna_vit requires timm (the ``vit`` extra:
``pip install "qna-triton[vit]"``), whose generic layers it builds on. Any input size runs (``gap`` head): the LSA windows
pad their maps to a window multiple and mask the padding. ``load_flax_params(..., resize=True)`` and
:func:`load_weights` load a checkpoint of another geometry (other windows, another resolution)
as the original's fine-tuning does (docs/spec.md, section Fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from qna_triton.layer import lecun_normal_ as _lecun_normal_
from qna_triton.layout import default_padding, output_size

from .config import IMAGENET_MEAN, IMAGENET_STD, MODEL_CONFIGS, QnAViTConfig
from .layers import ClassifierHead, PatchStem, QnAViTStage, ResNetStem, _ceil_div, _pool_type, _run

if TYPE_CHECKING:
    from .resize import LoadReport

from timm.models import build_model_with_cfg as _timm_build
from timm.models import generate_default_cfgs as _timm_default_cfgs
from timm.models import register_model as _timm_register
from timm.models._features import feature_take_indices

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_tracing


def _take_indices(n: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` (None: all ``n`` features, an int: the last ``indices``, a sequence:
    those, negative from the end), with a ValueError naming the argument where timm asserts."""
    try:
        return feature_take_indices(n, indices)
    except AssertionError as e:
        raise ValueError(f"indices {indices!r}: {e}") from None


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

    def __init__(
        self,
        config: Optional[QnAViTConfig] = None,
        *,
        global_pool: Optional[str] = None,
        drop_path_rate: Optional[float] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        **overrides: Any,
    ) -> None:
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
            raise ValueError(
                f"global_pool={global_pool!r} needs the 'gap' head, got head={overrides.get('head', config.head)!r}"
            )
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
        self.stem = (
            PatchStem(cfg.in_chans, cfg.base_dim) if cfg.stem == "patch" else ResNetStem(cfg.in_chans, cfg.base_dim)
        )
        n_blocks = sum(cfg.lsa_layers) + sum(cfg.qna_layers) + cfg.n_stages - 1
        rates = np.linspace(0.0, float(cfg.drop_path), n_blocks).tolist()  # network order
        stages, offset = [], 0
        for s in range(cfg.n_stages):
            n = cfg.lsa_layers[s] + cfg.qna_layers[s] + (s < cfg.n_stages - 1)
            stages.append(QnAViTStage(cfg, s, rates[offset : offset + n]))
            offset += n
        self.stages = nn.ModuleList(stages)
        self.grad_checkpointing = False
        # Both stems reduce by 4, each stage but the last by 2 more: the pyramid of strides 4, 8, 16, 32.
        self.feature_info = [
            dict(num_chs=cfg.stage_dim(s), reduction=4 * 2**s, module=_feature_module(cfg, s))
            for s in range(cfg.n_stages)
        ]
        # The qnav* heads' window is the final map of img_size, so it must be a valid input size.
        feat = self._check_stage_sizes(*cfg.img_size)[-1] if cfg.head != "gap" else (1, 1)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.head, cfg.qna_heads[-1], feat, cfg.drop_rate)
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
        stages = self.stages[: max_index + 1] if stop_early else self.stages
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

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the stages (and down-sampling) after the last of ``indices``, the head's LayerNorm
        (``prune_norm``, or when stages are dropped) and the classifier and pooling (``prune_head``), as
        timm's feature wrappers do; returns the kept indices for :meth:`forward_intermediates`."""
        take, max_index = _take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
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
                raise ValueError(
                    f"global_pool={global_pool!r} needs a QnA head: build the model with "
                    f"head={pool!r} (this head is {head.global_pool!r})"
                )
            if pool in ("gap", ""):
                head.qna = None
            head.global_pool = pool
        ref = self.stem.conv.weight
        if num_classes > 0:
            fc = torch.nn.utils.skip_init(nn.Linear, self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
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
        exempt_leaf = {
            "relative_position_bias_table",
            "rpe_bias",
            "attn_scale_weights",
            "attn_scale_pos",
            "bias",
            "Wk_b",
        }
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
    def load_flax_params(
        self, params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]] = None, resize: bool = False
    ) -> LoadReport:
        """Same as :func:`qna_vit.flax.load_flax_params`."""
        from .flax import load_flax_params  # qna_vit.flax builds on this module

        return load_flax_params(self, params, batch_stats, resize=resize)


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
        url="",
        input_size=(cfg.in_chans,) + tuple(cfg.img_size),
        pool_size=final,
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=cfg.num_classes,
        first_conv="stem.conv",
        classifier="head.fc",
        fixed_input_size=cfg.head != "gap",
        **_PAPER,
    )


default_cfgs = _timm_default_cfgs({name: _default_cfg(cfg.normalized()) for name, cfg in MODEL_CONFIGS.items()})


def _weight_source(kwargs: Mapping[str, Any]) -> bool:
    cfgs = [kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")]
    return any(
        isinstance(c, Mapping) and any(c.get(k) for k in ("file", "url", "state_dict", "hf_hub_id")) for c in cfgs
    )


def _entrypoint(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """Builds ``name`` through timm's ``build_model_with_cfg`` (its pretrained_cfg,
    ``pretrained_cfg_overlay``, ``features_only`` wrappers, ``pretrained=True`` from a converted file,
    tables resized to the model)."""
    if pretrained and not _weight_source(kwargs):
        raise ValueError(
            f"no downloadable weights for {name}: convert an original Flax checkpoint with "
            "examples/convert_flax.py and load it (timm: pretrained_cfg_overlay=dict(file=...), or "
            "checkpoint_path=...)"
        )
    # getter: the pyramid from forward_intermediates (NCHW); 'hook' and 'fx' also work, 'list' does not
    # (the stages are not a sequence of children: each is followed by its down-sampling block).
    feature_cfg = dict(
        feature_cls="getter",
        out_indices=tuple(range(MODEL_CONFIGS[name].n_stages)),
        **kwargs.pop("feature_cfg", None) or {},
    )
    cls = kwargs.get("feature_cls", feature_cfg["feature_cls"])
    if kwargs.get("features_only") and cls == "fx":
        cfg = dataclasses.replace(
            MODEL_CONFIGS[name], **{k: v for k, v in kwargs.items() if k in QnAViTConfig.__dataclass_fields__}
        ).normalized()
        if any(not cfg.qna_layers[s] for s in range(cfg.n_stages - 1)):
            raise ValueError(
                "feature_cls='fx' needs a QnA block ending every stage but the last (its "
                "feature node); use the default 'getter' or 'hook'"
            )
    from .resize import checkpoint_filter_fn  # qna_vit.resize builds on this module

    return _timm_build(
        functools.partial(QnAViT, MODEL_CONFIGS[name]),
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


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


for _fn in (qna_vit_tiny, qna_vit_tiny_7x7, qna_vit_small, qna_vit_base):
    _timm_register(_fn)
