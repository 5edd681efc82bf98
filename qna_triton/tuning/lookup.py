"""Tuned configs: where the files are, which entry serves a problem, and the caches.

The file ``<sanitised GPU name>.json`` is read from the user folder (:func:`user_config_dir`, where the
autotuner writes; searched first) and then from the shipped folder ``qna_triton/configs/`` inside the
package; the first valid file wins. No file: None (the caller takes the heuristic), with one warning
per process and GPU. A corrupted, truncated or wrong-schema file: a warning naming the file and the
reason, and the next folder. Invalid entries are dropped with a warning naming the file.

Matching a problem to an entry (first rule that differs decides, so it is a lexicographic order):

1. ``kernel`` must match; ``dtype`` should match, else an entry of the other 16-bit dtype is used
   (float16 <-> bfloat16), else none.
2. nearest ``head_dim``, then nearest ``heads``, then nearest ``queries`` (distance ``|log2 a/b|``;
   entries more than a factor 4 away in any of the three are never used),
3. nearest ``stride`` (``|log2 sh/sh'| + |log2 sw/sw'|``),
4. nearest ``window`` (``|kh - kh'| + |kw - kw'|``),
5. nearest size ``bucket`` (``|log4 b/b'|``); a remaining tie goes to the entry with the smaller
   fields, compared in the order window, stride, heads, head_dim, queries, bucket.

The chosen entry is then adapted to the problem without ever changing results (tiles only change
speed): ``block_h`` is capped at ``next_pow2(heads)``, and if the per-program tile of the problem
(``block_p * block_h * (next_pow2(queries) + next_pow2(head_dim))``) outgrows the one the entry was
measured with, ``block_p`` (down to 8) and then ``block_h`` are halved until it fits, so a borrowed
entry cannot ask for more registers than were proven to compile.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import triton

from .config import (
    BUCKET_BASE,
    DTYPES,
    KERNELS,
    ConfigFileError,
    ConfigTable,
    EntryKey,
    KernelConfig,
    config_file_name,
    has_banded_form,
    read_config_file,
    size_bucket,
    tile_footprint,
)
from .heuristics import heuristic_config

CONFIG_DIR_ENV = "QNA_TRITON_CONFIG_DIR"
DISABLE_ENV = "QNA_TRITON_DISABLE_TUNED"
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# A borrowed entry is used only within this factor of the tuned heads / head_dim / queries.
_MAX_RATIO_LOG2 = 2.0
_SIXTEEN_BIT = ("float16", "bfloat16")

_warned: set = set()


def warn_once(tag: str, message: str) -> None:
    if tag in _warned:
        return
    _warned.add(tag)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def user_config_dir() -> Path:
    """The user's folder of tuned configs, where the autotuner writes and the look-up searches first:
    ``$QNA_TRITON_CONFIG_DIR`` if set, else ``$XDG_CACHE_HOME/qna_triton/configs`` (``~/.cache/...``
    when unset). Never inside the installed package, which may be read-only and is replaced on upgrade."""
    env = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(cache)) / "qna_triton" / "configs"


def config_dirs() -> Tuple[str, ...]:
    """Folders searched for config files, in order: :func:`user_config_dir`, then the shipped
    ``qna_triton/configs``."""
    return _dirs_for(str(user_config_dir()))


@functools.lru_cache(maxsize=16)
def _dirs_for(user: str) -> Tuple[str, ...]:
    user, shipped = user.strip(), str(SHIPPED_CONFIG_DIR)
    if not user:
        return (shipped,)
    user = os.path.abspath(os.path.expanduser(user))
    return (user,) if user == shipped else (user, shipped)


def tuned_disabled() -> bool:
    """``QNA_TRITON_DISABLE_TUNED`` is set: every problem takes the heuristic."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=64)
def _load_table(gpu_name: str, dirs: Tuple[str, ...]) -> Optional[ConfigTable]:
    """The first valid config file for ``gpu_name`` in ``dirs`` (warnings for bad ones), or None."""
    name = config_file_name(gpu_name)
    found_any = False
    for d in dirs:
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            continue
        found_any = True
        try:
            table = read_config_file(path)
        except ConfigFileError as e:
            warn_once(
                f"bad:{path}",
                f"qna_triton: ignoring kernel config file {path}: it {e}. "
                "Falling back to the next config folder or the heuristic configs; "
                "re-run `python -m qna_triton.autotune` to regenerate it.",
            )
            continue
        if table.invalid:
            shown = "; ".join(f"{k!r}: {v}" for k, v in list(table.invalid.items())[:3])
            more = f" (and {len(table.invalid) - 3} more)" if len(table.invalid) > 3 else ""
            warn_once(
                f"invalid:{path}",
                f"qna_triton: kernel config file {path} has {len(table.invalid)} "
                f"invalid entries, ignored: {shown}{more}",
            )
        return table
    if not found_any:
        warn_once(
            f"missing:{gpu_name}",
            f"qna_triton: no tuned kernel configs for GPU {gpu_name!r} (looked "
            f"for {name} in {list(dirs)}); using heuristic configs. Run "
            "`python -m qna_triton.autotune` to tune this GPU (or set "
            f"{DISABLE_ENV}=1 to silence this).",
        )
    return None


def nearest_entry(table: ConfigTable, want: EntryKey) -> Optional[EntryKey]:
    """The entry of ``table`` used for ``want`` under the module's matching rule, or None."""
    best, best_rank = None, None
    for key in table.by_kernel.get(want.kernel, ()):
        if key.dtype == want.dtype:
            tier = 0
        elif key.dtype in _SIXTEEN_BIT and want.dtype in _SIXTEEN_BIT:
            tier = 1
        else:
            continue
        dims = [
            abs(math.log2(a / b))
            for a, b in ((key.head_dim, want.head_dim), (key.heads, want.heads), (key.n_queries, want.n_queries))
        ]
        if max(dims) > _MAX_RATIO_LOG2:
            continue
        rank = (
            tier,
            *dims,
            abs(math.log2(key.sh / want.sh)) + abs(math.log2(key.sw / want.sw)),
            abs(key.kh - want.kh) + abs(key.kw - want.kw),
            abs(math.log(key.bucket / want.bucket, BUCKET_BASE)),
        )
        if best_rank is None or rank < best_rank:
            best, best_rank = key, rank
    return best


def _adapt(entry: EntryKey, cfg: KernelConfig, want: EntryKey) -> KernelConfig:
    """Caps a borrowed entry's tile to the problem and to the tile it was measured with (a banded
    entry's tile does not grow with heads or queries: kept as measured; a banded main backward entry is
    not borrowed for a stride it has no banded form at: the heuristic then)."""
    if cfg.algo == "banded":
        if not has_banded_form(want.kernel, (want.sh, want.sw)):
            return heuristic_config(want.kernel, want.heads, want.head_dim)
        return cfg
    bp, bh = cfg.block_p, min(cfg.block_h, triton.next_power_of_2(want.heads))
    limit = tile_footprint(cfg, entry.n_queries, entry.head_dim)
    while tile_footprint(KernelConfig(bp, bh), want.n_queries, want.head_dim) > limit:
        if bp > 8:
            bp //= 2
        elif bh > 1:
            bh //= 2
        else:
            break
    return KernelConfig(bp, bh, cfg.num_warps, cfg.num_stages)


@functools.lru_cache(maxsize=4096)
def _lookup_cached(
    kernel: str,
    dtype: str,
    kh: int,
    kw: int,
    sh: int,
    sw: int,
    heads: int,
    head_dim: int,
    n_queries: int,
    bucket: int,
    gpu_name: str,
    dirs: Tuple[str, ...],
) -> Tuple[Optional[KernelConfig], Optional[EntryKey]]:
    # plain ints and strings as the cache key: a hit costs one tuple hash
    if dtype not in DTYPES or min(kh, kw, sh, sw, heads, head_dim, n_queries) < 1:
        return None, None
    table = _load_table(gpu_name, dirs)
    if table is None:
        return None, None
    want = EntryKey(kernel, dtype, kh, kw, sh, sw, heads, head_dim, n_queries, bucket)
    hit = nearest_entry(table, want)
    if hit is None:
        return None, None
    return _adapt(hit, table.entries[hit], want), hit


def tuned_config(
    kernel: str,
    gpu_name: str,
    dtype: str,
    heads: int,
    head_dim: int,
    n_queries: int,
    ks: Tuple[int, int],
    st: Tuple[int, int],
    pixels: int,
    dirs: Optional[Sequence[str]] = None,
) -> Tuple[Optional[KernelConfig], Optional[EntryKey]]:
    """The tuned config for a problem on ``gpu_name`` and the entry it came from, or ``(None, None)``
    (no file or no entry close enough; ``QNA_TRITON_DISABLE_TUNED``). ``pixels`` is ``B * H_out *
    W_out``; ``dirs`` defaults to :func:`config_dirs`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if tuned_disabled():
        return None, None
    return _lookup_cached(
        kernel,
        dtype,
        int(ks[0]),
        int(ks[1]),
        int(st[0]),
        int(st[1]),
        int(heads),
        int(head_dim),
        int(n_queries),
        size_bucket(int(pixels)),
        gpu_name,
        tuple(dirs) if dirs is not None else config_dirs(),
    )


def lookup_config(
    kernel: str,
    gpu_name: str,
    dtype: str,
    heads: int,
    head_dim: int,
    n_queries: int,
    ks: Tuple[int, int],
    st: Tuple[int, int],
    pixels: int,
    dirs: Optional[Sequence[str]] = None,
) -> Tuple[KernelConfig, Optional[EntryKey]]:
    """:func:`tuned_config`, with the direct algorithm's :func:`heuristic_config` where no entry
    serves (the entry then None)."""
    cfg, hit = tuned_config(kernel, gpu_name, dtype, heads, head_dim, n_queries, ks, st, pixels, dirs)
    return (cfg, hit) if cfg is not None else (heuristic_config(kernel, heads, head_dim), None)


CACHES = (_load_table, _lookup_cached, _dirs_for)
