"""Helpers for original (Flax) parameter trees: nested dicts of arrays, keys joined by ``/``."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np


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
