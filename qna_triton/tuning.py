"""Kernel launch configurations: tuned per-GPU tables first, a heuristic default otherwise.

Run-time lookup (:func:`get_config`, called by the launchers inside the opaque custom op, so never
inside a traced graph):

* CPU tensors (the Triton interpreter) always get :func:`heuristic_config`, silently.
* ``QNA_TRITON_DISABLE_TUNED=1`` gives the heuristic for every tensor.
* Otherwise the file ``<sanitised GPU name>.json`` (``torch.cuda.get_device_name``, lower-cased,
  every run of other characters than letters and digits turned into ``_``) is read from the user
  folder (:func:`user_config_dir`: ``QNA_TRITON_CONFIG_DIR``, else ``$XDG_CACHE_HOME/qna_triton/configs``,
  where the autotuner writes; searched first) and then from the shipped folder ``qna_triton/configs/``
  inside the package; the first valid file wins. No file: the heuristic, with one warning per
  process and GPU. A corrupted, truncated or wrong-schema file: a warning naming the file and the
  reason, and the next folder (then the heuristic). Invalid entries are dropped with a warning naming
  the file; the valid ones are kept.

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

The file format (``schema_version`` 1) is documented in ``qna_triton/configs/README.md``;
:func:`read_config_file` and :func:`write_config_file` are its reader and writer. Every look-up is
cached (parsed files per GPU and folder list, results per key of small ints and strings), so a call
after the first costs a few integer operations and a dictionary hit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import triton

from .reference import output_size

__all__ = [
    "KernelConfig", "heuristic_config", "get_config", "KERNELS", "EntryKey", "ConfigTable", "ConfigFileError",
    "SCHEMA_VERSION", "DTYPES", "CONFIG_DIR_ENV", "DISABLE_ENV", "SHIPPED_CONFIG_DIR", "user_config_dir", "sanitize_gpu_name",
    "size_bucket", "config_dirs", "config_file_name", "read_config_file", "write_config_file",
    "validate_config", "lookup_config", "tile_footprint", "clear_cache", "ALGOS", "ALGO_ENV", "banded_config",
    "kernel_algorithm", "default_config", "check_banded_tiles", "BANDED_KERNELS", "has_banded_form", "halo_chunk",
]

KERNELS = ("fwd", "bwd_delta", "bwd")
SCHEMA_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
BUCKET_BASE = 4
CONFIG_DIR_ENV = "QNA_TRITON_CONFIG_DIR"
DISABLE_ENV = "QNA_TRITON_DISABLE_TUNED"
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# float32 elements of the largest per-program tile (pixels x heads x head-dim) at 4 warps: keeps every
# kernel under ~128-240 registers without spills on sm_80/sm_90 (python -m qna_triton.kernels.aot)
_TILE_BUDGET = {"fwd": 1024, "bwd_delta": 1024, "bwd": 512}
# most channels (heads x head-dim) of one pixel in a program
_CHANNEL_BUDGET = {"fwd": 128, "bwd_delta": 128, "bwd": 32}
# The main backward kernel on one warp: its per-offset sums over the tile's pixels (drpb, dscale) then
# stay inside the warp, and its [pixels, queries, heads] tiles are not spread over idle threads. By the
# compiler report (sm_90, bf16, 2 queries) 1.3x to 2.8x fewer instructions per (pixel, offset, head)
# than on 4 warps at every head shape of docs/kernels.md (16 x 8: 135 against 244), with no spills; the
# backward's grid is sized to the programs the SM holds at once, so fewer warps per program do not
# leave a second, partial wave. Not yet timed; the autotuner times 2 and 4 warps next to it.
_HEURISTIC_WARPS = {"fwd": 4, "bwd_delta": 4, "bwd": 1}

# Hard limits of a valid entry: powers of two, and far below Triton's 2^20-element tensor limit.
_MAX_BLOCK_P = 4096
_MAX_BLOCK_H = 1024
_MAX_WARPS = 32
_MAX_STAGES = 8
_MAX_TILE = 1 << 17
# banded forward: output columns / rows per program (tensor-core operands need at least 16)
_MAX_BANDED_BLOCK = 128
# The heuristic takes the banded kernels from these window areas up (where the direct algorithm is bound
# by CUDA-core arithmetic, docs/kernels.md), on GPUs with tensor cores for bf16/tf32 (sm_80 and later).
# Forward: 7 x 7 for bfloat16; 11 x 11 for float16/float32, whose float32 operands cost more per product.
# Delta: its products are split into three (float32-accurate sums, see kernels.banded_blocks), so it
# costs about twice the forward per window row and only pays from 11 x 11 (bfloat16) / 15 x 15. Main
# backward kernel (stride 1): ~1400 / k_w thread-instructions per (pixel, offset, head) at head dim 8
# against ~135 for the direct one on one warp (_HEURISTIC_WARPS): a tie at 11 columns, 1.3x fewer at
# 13, 1.4x at 15, but less than 1.25x from 18 to 26 columns, where a second 32-column halo chunk is
# mostly padding; so by window width (_banded_bwd_pays: 13 to 17 columns and from 27 on; its count does
# not depend on the window's height), for bfloat16 and float16 (both take split bfloat16
# products) and head dims up to BANDED_BWD_MAX_HEAD_DIM (beyond, and for float32's tf32x3 operands, its
# default tile spills; the autotuner still times it there); its halo is processed in 32-column chunks,
# so any window width fits. These come from the compiler report's instructions per window row, not yet
# from timings.
BANDED_MIN_AREA = {
    "fwd": {torch.bfloat16: 49, torch.float16: 121, torch.float32: 121},
    "bwd_delta": {torch.bfloat16: 121, torch.float16: 225, torch.float32: 225},
    "bwd": {torch.bfloat16: 1, torch.float16: 1},  # by window width instead: _banded_bwd_pays
}
BANDED_BWD_MAX_HEAD_DIM = 16
BANDED_MIN_CAPABILITY = (8, 0)
# The banded main backward kernel's default tile spills 140-210 bytes on sm_80 (its split products'
# operands all live in registers with mma.sync; sm_90's warpgroup products read them from shared
# memory: at most 24 bytes), so the heuristic takes it from sm_90 on; the autotuner times it on sm_80.
BANDED_BWD_MIN_CAPABILITY = (9, 0)
ALGO_ENV = "QNA_TRITON_ALGO"
# A borrowed entry is used only within this factor of the tuned heads / head_dim / queries.
_MAX_RATIO_LOG2 = 2.0

# Devices whose kernels are compiled: tuned tables apply. CPU tensors run the Triton interpreter, where
# speed is meaningless, so they always take the heuristic.
_TUNED_DEVICE_TYPES = ("cuda",)
_TORCH_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_SIXTEEN_BIT = ("float16", "bfloat16")
_KEY_RE = re.compile(
    r"^kernel=(?P<kernel>[a-z_]+);dtype=(?P<dtype>[a-z0-9]+);window=(?P<kh>\d+)x(?P<kw>\d+);"
    r"stride=(?P<sh>\d+)x(?P<sw>\d+);heads=(?P<heads>\d+);head_dim=(?P<head_dim>\d+);"
    r"queries=(?P<n_queries>\d+);bucket=(?P<bucket>\d+)$"
)
_CONFIG_FIELDS = ("block_p", "block_h", "num_warps", "num_stages")


ALGOS = ("direct", "banded")
# kernels with a banded form: the forward, the backward's delta (the same window sum, dotted with the
# output gradient) and, for stride 1, the main backward kernel (kernels/banded_bwd.py)
BANDED_KERNELS = ("fwd", "bwd_delta", "bwd")


def has_banded_form(kernel: str, stride: Tuple[int, int]) -> bool:
    """Whether ``kernel`` has a banded (tensor-core) form at this stride: the main backward kernel
    only at stride 1 (its tiles are of source pixels, each read by one output per window offset)."""
    return kernel in BANDED_KERNELS and (kernel != "bwd" or tuple(int(s) for s in stride) == (1, 1))


@dataclass(frozen=True)
class KernelConfig:
    """Tile and launch parameters of one kernel: ``block_p`` pixels x ``block_h`` heads per program.

    Every kernel has two algorithms (``docs/kernels.md``): ``"direct"`` (the window loop on CUDA cores,
    tiles of ``block_p x block_h``) and ``"banded"`` (banded matrix products on tensor cores, one head
    and ``block_r`` rows x ``block_w`` columns of pixels per program, output pixels for the forward and
    the delta, source pixels for the main backward kernel, which has it at stride 1 only;
    ``block_p``/``block_h`` unused)."""

    block_p: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1
    algo: str = "direct"
    block_w: int = 0
    block_r: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.algo == "direct":  # schema-1 files written before the banded forward stay identical
            for name in ("algo", "block_w", "block_r"):
                d.pop(name)
        return d


@functools.lru_cache(maxsize=1024)
def heuristic_config(kernel: str, heads: int, head_dim: int) -> KernelConfig:
    """A safe default: all heads of a pixel in one program when they fit, pixels fill the rest."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    budget = _TILE_BUDGET[kernel]
    bd = triton.next_power_of_2(head_dim)
    bh = max(1, min(triton.next_power_of_2(heads), _CHANNEL_BUDGET[kernel] // bd))
    bp = max(8, min(128, budget // (bh * bd)))
    return KernelConfig(block_p=bp, block_h=bh, num_warps=_HEURISTIC_WARPS[kernel], num_stages=1)


def check_banded_tiles(block_w: Any, block_r: Any) -> None:
    """A banded forward's tiles are tensor-core operands: powers of two from 16 to ``_MAX_BANDED_BLOCK``
    (ValueError naming the field otherwise). Used by the file reader and by the launcher."""
    for name, v in (("block_w", block_w), ("block_r", block_r)):
        if isinstance(v, bool) or not isinstance(v, int) or not _is_pow(v, 2) or not 16 <= v <= _MAX_BANDED_BLOCK:
            raise ValueError(f"{name} of a banded config must be a power of two in [16, {_MAX_BANDED_BLOCK}], "
                             f"got {v!r}")


def default_config(kernel: str, heads: int, head_dim: int, ks: Tuple[int, int], st: Tuple[int, int],
                   dtype: torch.dtype, tensor_cores: bool) -> KernelConfig:
    """The config used without a tuned entry: :func:`heuristic_config`, except that the forward and the
    delta kernel of a window from ``BANDED_MIN_AREA`` up, on a GPU with bf16/tf32 ``tensor_cores``, take
    the banded algorithm (:func:`banded_config`)."""
    if (has_banded_form(kernel, st) and tensor_cores
            and ks[0] * ks[1] >= BANDED_MIN_AREA[kernel].get(dtype, 1 << 30)
            and (kernel != "bwd" or (head_dim <= BANDED_BWD_MAX_HEAD_DIM and _banded_bwd_pays(ks[1])))):
        return banded_config(ks, head_dim, dtype, st, kernel)
    return heuristic_config(kernel, heads, head_dim)


def halo_chunk(halo: int) -> int:
    """Columns per chunk of the banded main backward kernel's halo (``block_w + k_w - 1`` output
    columns): 32 (16 for a halo of 16). Not 16 to pad less: by the compiler report a 16-column chunk
    costs ~80 % of a 32-column one (its ``[16, W]`` products leave most of 8 warps idle), so three of
    them (46 columns at k = 31) cost more than two of 32; two 32-column chunks unrolled together spill."""
    return 32 if halo > 16 else 16


def _banded_bwd_pays(kw: int) -> bool:
    """Whether the banded main backward kernel (its default 16-column tile) issues at least 1.25x fewer
    instructions per (pixel, offset, head) than the direct one (135 on one warp), by the compiler report
    (sm_90, bf16, head dim 8): ~700 per halo chunk and window row (+50 from the second chunk on), times
    2 queries, over the row's ``kw`` offsets."""
    halo = 16 + kw - 1
    chunks = triton.cdiv(halo, halo_chunk(halo))
    return 2 * (700 * chunks + 50 * (chunks > 1)) / kw * 1.25 <= 135


def banded_config(window: Tuple[int, int], head_dim: int = 8, dtype: torch.dtype = torch.bfloat16,
                  stride: Tuple[int, int] = (1, 1), kernel: str = "fwd") -> KernelConfig:
    """The banded kernels' default: 16 x 16 pixels (output pixels; source pixels for the main backward
    kernel) of one head per program, on 4 warps; on 8 once the operands grow (a halo row beyond 32
    pixels, float32 operands for float16/float32 inputs, head dims beyond 32 in the forward and beyond 8
    in the delta, whose split products hold twice the operands; always for the main backward kernel),
    by the compiler report's registers and spills (``python -m qna_triton.kernels.aot``)."""
    if not has_banded_form(kernel, stride):
        raise ValueError(f"kernel must be one of {BANDED_KERNELS} (those with a banded form; bwd at stride 1 "
                         f"only), got {kernel!r} at stride {tuple(stride)}")
    halo = triton.next_power_of_2(15 * int(stride[1]) + int(window[1]))  # (block_w - 1) * s + k
    # the main backward kernel holds twice the delta's operands (two products per window row): 8 warps
    small = (halo <= 32 and head_dim <= {"fwd": 32, "bwd_delta": 8}.get(kernel, 0)
             and dtype == torch.bfloat16)
    return KernelConfig(block_p=1, block_h=1, num_warps=4 if small else 8, num_stages=1, algo="banded",
                        block_w=16, block_r=16)


_algo_forced: Optional[str] = None


@contextlib.contextmanager
def kernel_algorithm(algo: str) -> Iterator[None]:
    """Within the block, every kernel with a banded form (``has_banded_form``: the forward, the
    backward's delta and, at stride 1, the main backward kernel) runs ``algo`` (``"direct"``,
    ``"banded"`` or ``"auto"``) whatever ``QNA_TRITON_ALGO`` says: e.g. to compare the two algorithms
    in one process."""
    global _algo_forced
    if algo not in ("auto",) + ALGOS:
        raise ValueError(f"algo must be one of auto, direct, banded; got {algo!r}")
    previous, _algo_forced = _algo_forced, algo
    try:
        yield
    finally:
        _algo_forced = previous


def _algo_override() -> str:
    """:func:`kernel_algorithm` if active, else ``QNA_TRITON_ALGO``: ``auto`` (default: the tuned
    entry, else the heuristic), ``direct`` or ``banded`` (forces the algorithm of every kernel with a
    banded form, on any device; the interpreter included)."""
    if _algo_forced is not None:
        return _algo_forced
    value = os.environ.get(ALGO_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto",) + ALGOS:
        raise ValueError(f"{ALGO_ENV} must be one of auto, direct, banded; got {value!r}")
    return value


def tile_footprint(config: KernelConfig, n_queries: int, head_dim: int) -> int:
    """float32 elements one program holds per live tile pair (``[P, N, H]`` plus ``[P, H, D]``):
    the quantity registers grow with."""
    bn, bd = triton.next_power_of_2(n_queries), triton.next_power_of_2(head_dim)
    return config.block_p * config.block_h * (bn + bd)


# ----------------------------------------------------------------------------------- keys
def sanitize_gpu_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"`` (safe as a file name)."""
    out = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return out or "unknown_gpu"


def config_file_name(gpu_name: str) -> str:
    return sanitize_gpu_name(gpu_name) + ".json"


def size_bucket(pixels: int) -> int:
    """The size bucket of ``pixels`` output pixels (``B * H_out * W_out``): the largest power of 4
    not above it (1 for empty problems)."""
    if pixels < 1:
        return 1
    return 1 << (2 * ((int(pixels).bit_length() - 1) // 2))


def _is_pow(value: int, base: int) -> bool:
    while value > 1 and value % base == 0:
        value //= base
    return value == 1


@dataclass(frozen=True, order=True)
class EntryKey:
    """What a tuned entry is keyed by; :meth:`to_str` is its key in the JSON file."""

    kernel: str
    dtype: str
    kh: int
    kw: int
    sh: int
    sw: int
    heads: int
    head_dim: int
    n_queries: int
    bucket: int

    def to_str(self) -> str:
        return (f"kernel={self.kernel};dtype={self.dtype};window={self.kh}x{self.kw};stride={self.sh}x{self.sw};"
                f"heads={self.heads};head_dim={self.head_dim};queries={self.n_queries};bucket={self.bucket}")

    @classmethod
    def from_str(cls, text: str) -> "EntryKey":
        """Parses and checks a key string (ValueError saying what is wrong)."""
        m = _KEY_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError("key does not have the form kernel=..;dtype=..;window=KHxKW;stride=SHxSW;"
                             "heads=..;head_dim=..;queries=..;bucket=..")
        g = m.groupdict()
        key = cls(kernel=g["kernel"], dtype=g["dtype"], **{k: int(v) for k, v in g.items()
                                                             if k not in ("kernel", "dtype")})
        key.check()
        return key

    def check(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r} is not one of {KERNELS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        for name in ("kh", "kw", "sh", "sw", "heads", "head_dim", "n_queries", "bucket"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_pow(self.bucket, BUCKET_BASE):
            raise ValueError(f"bucket {self.bucket} is not a power of {BUCKET_BASE}")


def validate_config(value: Any, kernel: Optional[str] = None,
                    stride: Optional[Tuple[int, int]] = None) -> KernelConfig:
    """A ``{"block_p", "block_h", "num_warps", "num_stages"}`` mapping (plus ``algo``, ``block_w``,
    ``block_r`` for a banded entry) as a checked KernelConfig; ``kernel`` (at ``stride``), when given,
    must have the entry's algorithm."""
    if not isinstance(value, Mapping):
        raise ValueError(f"config must be an object, got {type(value).__name__}")
    missing = [f for f in _CONFIG_FIELDS if f not in value]
    if missing:
        raise ValueError(f"config lacks {missing}")
    limits = {"block_p": _MAX_BLOCK_P, "block_h": _MAX_BLOCK_H, "num_warps": _MAX_WARPS}
    for name in _CONFIG_FIELDS:
        v = value[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        if name in limits and (not _is_pow(v, 2) or v > limits[name]):
            raise ValueError(f"{name} must be a power of two <= {limits[name]}, got {v}")
    if value["num_stages"] > _MAX_STAGES:
        raise ValueError(f"num_stages must be <= {_MAX_STAGES}, got {value['num_stages']}")
    cfg = KernelConfig(*(int(value[f]) for f in _CONFIG_FIELDS))
    if cfg.block_p * cfg.block_h > _MAX_TILE:
        raise ValueError(f"block_p * block_h = {cfg.block_p * cfg.block_h} exceeds {_MAX_TILE}")
    algo = value.get("algo", "direct")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if algo == "banded":
        if kernel is not None and not has_banded_form(kernel, stride or (1, 1)):
            raise ValueError(f"algo 'banded' exists for {BANDED_KERNELS} only (bwd at stride 1), not for "
                             f"{kernel!r} at stride {tuple(stride or (1, 1))}")
        check_banded_tiles(value.get("block_w"), value.get("block_r"))
        cfg = KernelConfig(cfg.block_p, cfg.block_h, cfg.num_warps, cfg.num_stages, "banded",
                           int(value["block_w"]), int(value["block_r"]))
    return cfg


# ----------------------------------------------------------------------------------- files
class ConfigFileError(ValueError):
    """A config file that cannot be used at all (unreadable, not JSON, wrong schema)."""


@dataclass
class ConfigTable:
    """A parsed, validated config file."""

    path: str
    metadata: Dict[str, Any]
    entries: Dict[EntryKey, KernelConfig]
    raw_entries: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    skipped: Dict[str, Any] = field(default_factory=dict)
    invalid: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_kernel: Dict[str, List[EntryKey]] = {}
        for key in sorted(self.entries):
            self._by_kernel.setdefault(key.kernel, []).append(key)

    def nearest(self, want: EntryKey) -> Optional[EntryKey]:
        """The entry used for ``want`` under the module's matching rule, or None."""
        best, best_rank = None, None
        for key in self._by_kernel.get(want.kernel, ()):
            if key.dtype == want.dtype:
                tier = 0
            elif key.dtype in _SIXTEEN_BIT and want.dtype in _SIXTEEN_BIT:
                tier = 1
            else:
                continue
            dims = [abs(math.log2(a / b)) for a, b in ((key.head_dim, want.head_dim), (key.heads, want.heads),
                                                      (key.n_queries, want.n_queries))]
            if max(dims) > _MAX_RATIO_LOG2:
                continue
            rank = (
                tier, *dims,
                abs(math.log2(key.sh / want.sh)) + abs(math.log2(key.sw / want.sw)),
                abs(key.kh - want.kh) + abs(key.kw - want.kw),
                abs(math.log(key.bucket / want.bucket, BUCKET_BASE)),
            )
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        return best


def read_config_file(path: os.PathLike) -> ConfigTable:
    """Reads and validates a config file. Raises :class:`ConfigFileError` when the file is unusable;
    invalid entries are left out and listed in ``ConfigTable.invalid`` (key -> reason)."""
    path = str(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"cannot be read ({e})") from e
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"is not valid JSON (corrupted or truncated? {e})") from e
    if not isinstance(data, dict):
        raise ConfigFileError(f"must hold a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ConfigFileError(f"has schema_version {version!r}; this qna_triton reads {SCHEMA_VERSION}")
    metadata, raw, skipped = data.get("metadata"), data.get("entries"), data.get("skipped", {})
    if not isinstance(metadata, dict):
        raise ConfigFileError("has no 'metadata' object")
    if not isinstance(raw, dict):
        raise ConfigFileError("has no 'entries' object")
    if not isinstance(skipped, dict):
        raise ConfigFileError("has a 'skipped' field that is not an object")
    entries: Dict[EntryKey, KernelConfig] = {}
    kept: Dict[str, Dict[str, Any]] = {}
    invalid: Dict[str, str] = {}
    for text, value in raw.items():
        try:
            key = EntryKey.from_str(text)
            if not isinstance(value, dict):
                raise ValueError(f"entry must be an object, got {type(value).__name__}")
            cfg = validate_config(value.get("config"), key.kernel, (key.sh, key.sw))
        except ValueError as e:
            invalid[str(text)] = str(e)
            continue
        entries[key] = cfg
        kept[text] = value
    return ConfigTable(path, metadata, entries, kept, dict(skipped), invalid)


def write_config_file(path: os.PathLike, metadata: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]],
                      skipped: Optional[Mapping[str, Any]] = None) -> None:
    """Writes a schema-1 config file atomically (a reader never sees half a file); every entry is
    validated first, so the writer cannot produce a file the reader rejects."""
    for text, value in entries.items():
        key = EntryKey.from_str(text)
        validate_config(value.get("config"), key.kernel, (key.sh, key.sw))
    data = {
        "schema_version": SCHEMA_VERSION,
        "metadata": dict(metadata),
        "entries": {k: dict(entries[k]) for k in sorted(entries)},
        "skipped": {k: (skipped or {})[k] for k in sorted(skipped or {})},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------- look-up
_warned: set = set()


def _warn_once(tag: str, message: str) -> None:
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


def _tuned_disabled() -> bool:
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
            _warn_once(f"bad:{path}", f"qna_triton: ignoring kernel config file {path}: it {e}. "
                                      "Falling back to the next config folder or the heuristic configs; "
                                      "re-run `python -m qna_triton.autotune` to regenerate it.")
            continue
        if table.invalid:
            shown = "; ".join(f"{k!r}: {v}" for k, v in list(table.invalid.items())[:3])
            more = f" (and {len(table.invalid) - 3} more)" if len(table.invalid) > 3 else ""
            _warn_once(f"invalid:{path}", f"qna_triton: kernel config file {path} has {len(table.invalid)} "
                                          f"invalid entries, ignored: {shown}{more}")
        return table
    if not found_any:
        _warn_once(f"missing:{gpu_name}", f"qna_triton: no tuned kernel configs for GPU {gpu_name!r} (looked "
                                          f"for {name} in {list(dirs)}); using heuristic configs. Run "
                                          "`python -m qna_triton.autotune` to tune this GPU (or set "
                                          f"{DISABLE_ENV}=1 to silence this).")
    return None


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
def _lookup_cached(kernel: str, dtype: str, kh: int, kw: int, sh: int, sw: int, heads: int, head_dim: int,
                   n_queries: int, bucket: int, gpu_name: str,
                   dirs: Tuple[str, ...]) -> Tuple[KernelConfig, Optional[EntryKey]]:
    # plain ints and strings as the cache key: a hit costs one tuple hash
    heuristic = heuristic_config(kernel, heads, head_dim)
    if dtype not in DTYPES or min(kh, kw, sh, sw, heads, head_dim, n_queries) < 1:
        return heuristic, None
    table = _load_table(gpu_name, dirs)
    if table is None:
        return heuristic, None
    want = EntryKey(kernel, dtype, kh, kw, sh, sw, heads, head_dim, n_queries, bucket)
    hit = table.nearest(want)
    if hit is None:
        return heuristic, None
    return _adapt(hit, table.entries[hit], want), hit


def lookup_config(kernel: str, gpu_name: str, dtype: str, heads: int, head_dim: int, n_queries: int,
                  ks: Tuple[int, int], st: Tuple[int, int], pixels: int,
                  dirs: Optional[Sequence[str]] = None) -> Tuple[KernelConfig, Optional[EntryKey]]:
    """The config for a problem on ``gpu_name`` and the tuned entry it came from (None: heuristic).

    ``pixels`` is ``B * H_out * W_out``. Honours ``QNA_TRITON_DISABLE_TUNED``; ``dirs`` defaults to
    :func:`config_dirs`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if _tuned_disabled():
        return heuristic_config(kernel, heads, head_dim), None
    return _lookup_cached(kernel, dtype, int(ks[0]), int(ks[1]), int(st[0]), int(st[1]), int(heads),
                          int(head_dim), int(n_queries), size_bucket(int(pixels)), gpu_name,
                          tuple(dirs) if dirs is not None else config_dirs())


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_config(
    kernel: str, logits: torch.Tensor, values: torch.Tensor, ks: Tuple[int, int], st: Tuple[int, int],
    pd: Optional[Tuple[int, int]] = None,
) -> KernelConfig:
    """The configuration to launch ``kernel`` with for this problem (``logits [B,H,W,N,h]``,
    ``values [B,H,W,h,d]``). ``pd`` is the padding; None assumes the QnA default ``(k - 1) // 2``.

    Only speed depends on the answer: every config computes the same result up to float rounding.
    """
    heads, head_dim = logits.shape[4], values.shape[4]
    device = logits.device
    algo = _algo_override() if has_banded_form(kernel, st) else "direct"
    if algo == "banded":
        if device.type == "cuda":
            cap = _device_capability(device)
            if cap < BANDED_MIN_CAPABILITY:
                raise RuntimeError(f"the banded kernels ({ALGO_ENV} / kernel_algorithm) need bf16/tf32 tensor "
                                   f"cores (sm_80 or later); this GPU is sm_{cap[0]}{cap[1]}")
        return banded_config(ks, head_dim, values.dtype, st, kernel)
    if algo == "direct" and has_banded_form(kernel, st):
        cfg = _get_config(kernel, logits, values, ks, st, pd, heads, head_dim, device)
        return cfg if cfg.algo == "direct" else heuristic_config(kernel, heads, head_dim)
    return _get_config(kernel, logits, values, ks, st, pd, heads, head_dim, device)


def _get_config(kernel, logits, values, ks, st, pd, heads, head_dim, device) -> KernelConfig:
    if device.type not in _TUNED_DEVICE_TYPES or _tuned_disabled():
        return _heuristic_for(kernel, heads, head_dim, ks, device, values.dtype, st)
    B, H, W, N = logits.shape[:4]
    if pd is None:
        pd = ((ks[0] - 1) // 2, (ks[1] - 1) // 2)
    Ho, Wo = output_size(H, ks[0], st[0], pd[0]), output_size(W, ks[1], st[1], pd[1])
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    # straight to the cache with the ints at hand: this runs on every kernel launch
    cfg, hit = _lookup_cached(kernel, _TORCH_DTYPE_NAMES.get(logits.dtype, ""), ks[0], ks[1], st[0], st[1], heads,
                              head_dim, N, size_bucket(B * Ho * Wo), _gpu_name(index), config_dirs())
    return cfg if hit is not None else _heuristic_for(kernel, heads, head_dim, ks, device, values.dtype, st)


def _heuristic_for(kernel: str, heads: int, head_dim: int, ks: Tuple[int, int], device: torch.device,
                   dtype: torch.dtype = torch.bfloat16, st: Tuple[int, int] = (1, 1)) -> KernelConfig:
    """:func:`default_config` for ``device`` (tensor cores: a CUDA device of ``BANDED_MIN_CAPABILITY``;
    the capability is asked only when the banded forward would be chosen)."""
    cfg = default_config(kernel, heads, head_dim, ks, st, dtype, tensor_cores=True)
    if cfg.algo == "banded":
        need = BANDED_BWD_MIN_CAPABILITY if kernel == "bwd" else BANDED_MIN_CAPABILITY
        if not (device.type == "cuda" and _device_capability(device) >= need):
            return heuristic_config(kernel, heads, head_dim)
    return cfg


def _device_capability(device: torch.device) -> Tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def clear_cache() -> None:
    """Forgets parsed files, cached look-ups and issued warnings (after writing a config file in this
    process, or in tests)."""
    for cache in _CACHES:
        cache.cache_clear()
    _warned.clear()


_CACHES = (heuristic_config, _load_table, _lookup_cached, _gpu_name, _dirs_for, _capability)
