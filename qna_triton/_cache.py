"""The hot path's caches: what a call would otherwise recompute from its arguments' shapes (validation,
the kernels' layout constants, the chosen configs and launch descriptions), filed under a key of
everything the result depends on.

A key holds the tensors' :func:`tensor_key` (shape, strides, dtype, device), the geometry, and
:func:`settings`, the values of the environment variables that steer the choices: changing one takes
effect at the next call, as reading them on every call did. What is neither in a key nor in the
environment (a tuned config file written, a kernel variant found not to compile) empties every cache
through :func:`clear_all` (``qna_triton.tuning.clear_cache`` calls it).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Hashable, Optional, Tuple

import torch

__all__ = ["KeyedCache", "settings", "tensor_key", "clear_all", "SETTINGS"]

# Every environment variable a call's choices read: the backend, the interpreter, a forced algorithm,
# the tuned-config switch and the folders the config files are looked up in (the user folder falls
# back to $XDG_CACHE_HOME, then to ~).
SETTINGS = (
    "QNA_TRITON_BACKEND",
    "TRITON_INTERPRET",
    "QNA_TRITON_ALGO",
    "QNA_TRITON_DISABLE_TUNED",
    "QNA_TRITON_CONFIG_DIR",
    "XDG_CACHE_HOME",
    "HOME",
)

# ``os.environ.get`` costs about a microsecond a name (the key's encoding, and a KeyError for an unset
# one); the dict behind ``os.environ``, which every assignment to ``os.environ`` updates, answers in
# tens of nanoseconds. Its raw values are only compared, never interpreted.
_RAW = getattr(os.environ, "_data", None)
_RAW_KEYS = tuple(map(os.environ.encodekey, SETTINGS)) if _RAW is not None else ()


def settings() -> Tuple[Any, ...]:
    """The current values of :data:`SETTINGS` (None where unset), as a key."""
    if _RAW is not None:
        return tuple(map(_RAW.get, _RAW_KEYS))
    return tuple(map(os.environ.get, SETTINGS))


def tensor_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a cached result may depend on of a tensor: shape, strides, dtype, device (None for None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class KeyedCache:
    """A bounded dict of cached results (emptied when full: the keys of a process are few)."""

    _all: list = []

    def __init__(self, name: str, size: int = 1024) -> None:
        self.name, self.size = name, size
        self._data: Dict[Hashable, Any] = {}
        KeyedCache._all.append(self)

    def get(self, key: Optional[Hashable]) -> Any:
        """The entry of ``key``, or None (also for a None key, or one that cannot be hashed, such as
        symbolic sizes)."""
        if key is None:
            return None
        try:
            return self._data.get(key)
        except TypeError:
            return None

    def put(self, key: Optional[Hashable], value: Any) -> Any:
        """Files ``value`` under ``key`` (nothing for a None or unhashable key); returns ``value``."""
        if key is not None:
            if len(self._data) >= self.size:
                self._data.clear()
            try:
                self._data[key] = value
            except TypeError:
                pass
        return value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def clear_all() -> None:
    """Empties every :class:`KeyedCache`."""
    for cache in KeyedCache._all:
        cache.clear()
