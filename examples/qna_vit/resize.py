"""Fitting a checkpoint to a model of another geometry as the original's fine-tuning does (docs/spec.md,
section Fine-tuning): :func:`resize_table`, a port of ``jax.image.resize(..., 'bicubic')``, the load plan and
its :class:`LoadReport`, and :func:`load_weights` / :func:`resize_state_dict` for our own checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from qna_triton import CheckpointError

from .model import QnAViT

# Tables the original's fine-tuning resizes when their shape changes (docs/spec.md, section Fine-tuning):
# QnA relative-position biases [k*k, N*h] and attention scales [1, 1, k*k, N*h], LSA relative-position
# tables [(2w-1)^2, heads]; the same names and layouts in the Flax tree and in the state dict.
_TABLE_LEAVES = ("rpe_bias", "attn_scale_weights", "relative_position_bias_table")
# The classifier a resizing load may leave newly initialised (another class count).
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
        raise CheckpointError(
            f"parameter {name!r}: cannot resize {old} to {shape} (a table [s*s, C] or "
            f"[1, 1, s*s, C] with the same last axis)"
        )
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
        lines = [
            f"loaded {len(self.loaded)}, resized {len(self.resized)}, newly initialised "
            f"{len(self.initialised)}, dropped {len(self.dropped)}"
        ]
        lines += [f"  resized {k}: {a} -> {b}" for k, (a, b) in self.resized.items()]
        lines += [f"  newly initialised {k}" for k in self.initialised]
        lines += [f"  dropped {k}" for k in self.dropped]
        return "\n".join(lines)


def _plan_load(
    expected: Mapping[str, Tuple[int, ...]],
    given: Mapping[str, Tuple[int, ...]],
    classifier: Sequence[str],
    resize: bool,
    where: str,
) -> LoadReport:
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
                raise CheckpointError(
                    f"{where}parameter {key!r} has shape {old}, expected {new}: a table "
                    "is resized over its positions only, its last axis must match"
                )
            report.resized[key] = (old, new)
        else:
            hint = "" if resize else " (resize=True resizes position and attention-scale tables)"
            raise CheckpointError(f"{where}key {key!r} has shape {old}, expected {new}{hint}")
    return report


def resize_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """A QnA-ViT state dict (ours: converted or trained) fitted to ``model``'s geometry: mismatched
    position and attention-scale tables resized as :func:`load_flax_params` with ``resize=True`` does,
    the model's own (fresh) classifier kept where the class count differs. Returns the complete state
    dict for ``model`` and the :class:`LoadReport`; anything else mismatched raises CheckpointError."""
    own = model.state_dict()
    report = _plan_load(
        {k: tuple(v.shape) for k, v in own.items()},
        {k: tuple(v.shape) for k, v in state_dict.items()},
        _TORCH_CLASSIFIER,
        True,
        "",
    )
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


def load_weights(
    model: QnAViT, checkpoint: Union[str, os.PathLike[str], Mapping[str, Any]], resize: bool = True
) -> LoadReport:
    """Loads one of our checkpoints (``examples/convert_flax.py``'s or ``examples/train.py``'s file, or a
    bare state dict) into ``model``; with ``resize`` (default) from another geometry, as
    :func:`resize_state_dict`. Returns the :class:`LoadReport`."""
    if not isinstance(model, QnAViT):
        raise TypeError(f"model must be a QnAViT, got {type(model).__name__}")
    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, Mapping)
        else checkpoint
    )
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("expected a state dict, or a checkpoint holding one under 'model' or 'state_dict'")
    if resize:
        state, report = resize_state_dict(state, model)
    else:
        own = model.state_dict()
        report = _plan_load(
            {k: tuple(v.shape) for k, v in own.items()},
            {k: tuple(v.shape) for k, v in state.items()},
            _TORCH_CLASSIFIER,
            False,
            "",
        )
    model.load_state_dict(state)
    return report
