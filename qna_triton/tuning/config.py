"""The configuration type, the key of a tuned entry, and the config file format (``schema_version``
1, documented in ``qna_triton/configs/README.md``): its reader and its writer."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import triton

KERNELS = ("fwd", "bwd_delta", "bwd")
ALGOS = ("direct", "banded")
# kernels with a banded form: the forward, the backward's delta (the same window sum, dotted with the
# output gradient) and, for stride 1, the main backward kernel (kernels/banded_bwd.py)
BANDED_KERNELS = ("fwd", "bwd_delta", "bwd")
DTYPES = ("float16", "bfloat16", "float32")
SCHEMA_VERSION = 1
BUCKET_BASE = 4

# Hard limits of a valid entry: powers of two, and far below Triton's 2^20-element tensor limit.
_MAX_BLOCK_P = 4096
_MAX_BLOCK_H = 1024
_MAX_WARPS = 32
_MAX_STAGES = 8
_MAX_TILE = 1 << 17
# banded kernels: columns / rows of pixels per program (tensor-core operands need at least 16)
_MAX_BANDED_BLOCK = 128
_CONFIG_FIELDS = ("block_p", "block_h", "num_warps", "num_stages")
_KEY_RE = re.compile(
    r"^kernel=(?P<kernel>[a-z_]+);dtype=(?P<dtype>[a-z0-9]+);window=(?P<kh>\d+)x(?P<kw>\d+);"
    r"stride=(?P<sh>\d+)x(?P<sw>\d+);heads=(?P<heads>\d+);head_dim=(?P<head_dim>\d+);"
    r"queries=(?P<n_queries>\d+);bucket=(?P<bucket>\d+)$"
)


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


def tile_footprint(config: KernelConfig, n_queries: int, head_dim: int) -> int:
    """float32 elements one program holds per live tile pair (``[P, N, H]`` plus ``[P, H, D]``):
    the quantity registers grow with."""
    bn, bd = triton.next_power_of_2(n_queries), triton.next_power_of_2(head_dim)
    return config.block_p * config.block_h * (bn + bd)


def check_banded_tiles(block_w: Any, block_r: Any) -> None:
    """A banded kernel's tiles are tensor-core operands: powers of two from 16 to ``_MAX_BANDED_BLOCK``
    (ValueError naming the field otherwise). Used by the file reader and by the launcher."""
    for name, v in (("block_w", block_w), ("block_r", block_r)):
        if isinstance(v, bool) or not isinstance(v, int) or not _is_pow(v, 2) or not 16 <= v <= _MAX_BANDED_BLOCK:
            raise ValueError(
                f"{name} of a banded config must be a power of two in [16, {_MAX_BANDED_BLOCK}], got {v!r}"
            )


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
        return (
            f"kernel={self.kernel};dtype={self.dtype};window={self.kh}x{self.kw};stride={self.sh}x{self.sw};"
            f"heads={self.heads};head_dim={self.head_dim};queries={self.n_queries};bucket={self.bucket}"
        )

    @classmethod
    def from_str(cls, text: str) -> EntryKey:
        """Parses and checks a key string (ValueError saying what is wrong)."""
        m = _KEY_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(
                "key does not have the form kernel=..;dtype=..;window=KHxKW;stride=SHxSW;"
                "heads=..;head_dim=..;queries=..;bucket=.."
            )
        g = m.groupdict()
        key = cls(
            kernel=g["kernel"], dtype=g["dtype"], **{k: int(v) for k, v in g.items() if k not in ("kernel", "dtype")}
        )
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


def validate_config(value: Any, kernel: Optional[str] = None, stride: Optional[Tuple[int, int]] = None) -> KernelConfig:
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
            raise ValueError(
                f"algo 'banded' exists for {BANDED_KERNELS} only (bwd at stride 1), not for "
                f"{kernel!r} at stride {tuple(stride or (1, 1))}"
            )
        check_banded_tiles(value.get("block_w"), value.get("block_r"))
        cfg = KernelConfig(
            cfg.block_p,
            cfg.block_h,
            cfg.num_warps,
            cfg.num_stages,
            "banded",
            int(value["block_w"]),
            int(value["block_r"]),
        )
    return cfg


# ----------------------------------------------------------------------------------- files
def sanitize_gpu_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"`` (safe as a file name)."""
    out = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return out or "unknown_gpu"


def config_file_name(gpu_name: str) -> str:
    return sanitize_gpu_name(gpu_name) + ".json"


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
        self.by_kernel: Dict[str, Tuple[EntryKey, ...]] = {}
        for key in sorted(self.entries):
            self.by_kernel[key.kernel] = self.by_kernel.get(key.kernel, ()) + (key,)


def read_config_file(path: os.PathLike) -> ConfigTable:
    """Reads and validates a config file. Raises :class:`ConfigFileError` when the file is unusable;
    invalid entries are left out and listed in ``ConfigTable.invalid`` (key -> reason)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
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


def write_config_file(
    path: os.PathLike,
    metadata: Mapping[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    skipped: Optional[Mapping[str, Any]] = None,
) -> None:
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
