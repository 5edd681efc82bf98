"""Kernel launch configurations: tuned per-GPU tables first, a heuristic default otherwise.

* :mod:`.config`: the configuration type (:class:`KernelConfig`), the key of a tuned entry
  (:class:`EntryKey`) and the config file format (:func:`read_config_file`, :func:`write_config_file`);
* :mod:`.heuristics`: the defaults without a tuned entry, and the compiler-report thresholds they
  rest on;
* :mod:`.lookup`: the config folders (``QNA_TRITON_CONFIG_DIR`` / the user cache first, then the
  shipped ``qna_triton/configs``), the matching of a problem to a tuned entry, the caches;
* :mod:`.selection`: :func:`select_config`, the one function that decides which config and algorithm
  run (a forced algorithm, else the tuned entry, else the default), and :func:`get_config`, its
  launch-time form on tensors.

``QNA_TRITON_DISABLE_TUNED=1`` gives the defaults for every tensor; CPU tensors (the Triton
interpreter) always get them, silently. Every look-up is cached (parsed files per GPU and folder
list, results per key of small ints and strings), so a call after the first costs a few integer
operations and a dictionary hit.
"""

from __future__ import annotations

from .. import _cache
from . import config, heuristics, lookup, selection, targets
from .config import (
    ALGOS,
    BANDED_KERNELS,
    DTYPES,
    KERNELS,
    SCHEMA_VERSION,
    ConfigFileError,
    ConfigTable,
    EntryKey,
    KernelConfig,
    check_banded_tiles,
    config_file_name,
    has_banded_form,
    read_config_file,
    sanitize_gpu_name,
    size_bucket,
    tile_footprint,
    validate_config,
    write_config_file,
)
from .heuristics import (
    BANDED_MIN_AREA,
    MAX_ELEMS_PER_THREAD,
    banded_config,
    default_config,
    halo_chunk,
    heuristic_config,
)
from .lookup import (
    CONFIG_DIR_ENV,
    DISABLE_ENV,
    SHIPPED_CONFIG_DIR,
    _adapt,
    _lookup_cached,
    config_dirs,
    lookup_config,
    tuned_config,
    user_config_dir,
)
from .selection import ALGO_ENV, Target, _algo_override, _heuristic_for, get_config, kernel_algorithm, select_config
from .targets import TARGETS, GPUArch, device_target, target_for_capability, target_named

__all__ = [
    "KernelConfig",
    "heuristic_config",
    "get_config",
    "select_config",
    "Target",
    "KERNELS",
    "EntryKey",
    "ConfigTable",
    "ConfigFileError",
    "SCHEMA_VERSION",
    "DTYPES",
    "CONFIG_DIR_ENV",
    "DISABLE_ENV",
    "SHIPPED_CONFIG_DIR",
    "user_config_dir",
    "sanitize_gpu_name",
    "size_bucket",
    "config_dirs",
    "config_file_name",
    "read_config_file",
    "write_config_file",
    "validate_config",
    "lookup_config",
    "tuned_config",
    "tile_footprint",
    "clear_cache",
    "ALGOS",
    "ALGO_ENV",
    "banded_config",
    "kernel_algorithm",
    "default_config",
    "check_banded_tiles",
    "BANDED_KERNELS",
    "has_banded_form",
    "halo_chunk",
    "BANDED_MIN_AREA",
    "MAX_ELEMS_PER_THREAD",
    "TARGETS",
    "GPUArch",
    "target_named",
    "target_for_capability",
    "device_target",
]


def clear_cache() -> None:
    """Forgets parsed files, cached look-ups, issued warnings and the launches described with them (after
    writing a config file in this process, or in tests)."""
    for cache in (heuristic_config, *lookup.CACHES, *selection.CACHES):
        cache.cache_clear()
    lookup._warned.clear()
    _cache.clear_all()  # the launches described with what was chosen
