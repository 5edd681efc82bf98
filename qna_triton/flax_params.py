"""The QnA layer's original (Flax) parameters: the tree helpers (nested dicts of arrays, keys joined by
``/``), the layer's parameter names and shapes, and loading them into a :class:`qna_triton.QnA`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from .layer import QnA


class CheckpointError(ValueError):
    """A parameter tree does not fit the module: names the offending key."""


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
    """``{"to_v": {"kernel": a}}`` -> ``{"to_v/kernel": a}``; keys that already contain ``/`` are kept."""
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"expected a nested dict of arrays, got {type(tree).__name__}")
    flat: Dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def check_tree(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple], where: str = "") -> None:
    """Raises :class:`CheckpointError` naming the first missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise CheckpointError(f"{where}missing key {missing[0]!r} (missing: {missing})")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}unexpected key {unexpected[0]!r} (unexpected: {unexpected})")
    for key, shape in expected.items():
        got = tuple(flat[key].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{where}key {key!r} has shape {got}, expected {tuple(shape)}")
        if not np.issubdtype(flat[key].dtype, np.floating):
            raise CheckpointError(f"{where}key {key!r} has dtype {flat[key].dtype}, expected a float array")


def qna_param_shapes(layer: QnA) -> Dict[str, tuple]:
    """The original (Flax) QnA layer's parameter names (``/``-joined) and shapes for this configuration."""
    N, h, d, K = layer.n_queries, layer.heads, layer.head_dim, layer.kernel_size[0] * layer.kernel_size[1]
    C, Cin, Co = layer.features, layer.in_features, layer.out_features
    shapes: Dict[str, tuple] = {
        "query": (N, C),
        "Wk": (Cin, C),
        "rpe_bias": (K, N * h),
        "to_v/kernel": (Cin, C),
        "to_out/kernel": (C, Co),
    }
    if layer.use_bias:
        shapes.update({"Wk_b": (h, d), "to_v/bias": (C,), "to_out/bias": (Co,)})
    if layer.attn_scale_weights is not None:
        shapes["attn_scale_weights"] = tuple(layer.attn_scale_weights.shape)
    if layer.attn_scale_pos is not None:
        shapes["attn_scale_pos"] = tuple(layer.attn_scale_pos.shape)
    return shapes


@torch.no_grad()
def load_qna_params(layer: QnA, tree: Mapping[str, Any]) -> None:
    """Loads the original layer's parameter sub-tree (nested dicts of arrays, Flax names).

    Every key and shape is checked before anything is copied: a missing, unexpected or mis-shaped
    entry raises :class:`qna_triton.CheckpointError` naming the key, and leaves ``layer`` untouched.
    """
    flat = flatten_tree(tree)
    check_tree(flat, qna_param_shapes(layer))
    targets = {
        "query": (layer.query, False),
        "Wk": (layer.Wk, False),
        "rpe_bias": (layer.rpe_bias, False),
        "to_v/kernel": (layer.to_v.weight, True),
        "to_out/kernel": (layer.to_out.weight, True),
        "Wk_b": (layer.Wk_b, False),
        "to_v/bias": (layer.to_v.bias, False),
        "to_out/bias": (layer.to_out.bias, False),
        "attn_scale_weights": (layer.attn_scale_weights, False),
        "attn_scale_pos": (layer.attn_scale_pos, False),
    }
    for key, array in flat.items():
        param, transpose = targets[key]
        value = torch.from_numpy(np.ascontiguousarray(array))
        param.copy_(value.t() if transpose else value)
