"""What to tune: problem shapes, candidate configs and the time estimate (all of it pure Python, so
``--dry-run`` works without a GPU).

The default plan is three sweeps around the layer shape QnA-ViT uses most (16 heads of head_dim 8,
2 queries), so every axis is covered without the full cross product (which would take hours):

* windows: 1-31 odd and 2, 4, 8, strides 1 and 2 (stride 2 from window 2 up), first dtype;
* dtypes: the other dtypes at windows 3 and 7 (stride 1) and window 3 (stride 2);
* heads: head_dim 8-128, 1-64 heads, 1-8 queries at window 3, stride 1, first dtype.

Each shape is tuned at representative sizes of the size buckets 4^6, 4^8 and 4^10 output pixels,
skipping those where ``pixels x window area`` exceeds ``WORK_CAP`` (large windows run on small maps in
practice, and such a problem would take most of the time budget by itself).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import triton

from qna_triton.layout import default_padding, output_size
from qna_triton.tuning import (
    DTYPES,
    KERNELS,
    MAX_ELEMS_PER_THREAD,
    EntryKey,
    KernelConfig,
    Target,
    banded_config,
    has_banded_form,
    heuristic_config,
    select_config,
    size_bucket,
    tile_footprint,
)

# ---------------------------------------------------------------------------------------- axes
WINDOWS = tuple(range(1, 32, 2)) + (2, 4, 8)
STRIDES = (1, 2)
DEFAULT_DTYPES = ("bfloat16", "float16", "float32")
BASE_HEADS = (16, 8, 2)  # (heads, head_dim, queries): QnA-ViT tiny, stage 1
HEAD_CONFIGS = (
    (8, 8, 2),
    (32, 8, 2),
    (64, 8, 2),  # QnA-ViT tiny / small stages
    (12, 16, 2),
    (48, 16, 2),  # QnA-ViT base stages
    (16, 8, 1),
    (16, 8, 4),
    (16, 8, 8),  # queries
    (4, 32, 2),
    (2, 64, 2),
    (1, 128, 2),  # larger head dims
)
BUCKETS = (4**6, 4**8, 4**10)
# most output pixels x window offsets of one tuned problem: one call stays at a few milliseconds
WORK_CAP = 1 << 25
# feature-map sides of representative problems: QnA-ViT's maps at 224x224, none a multiple of 16,
# like real maps, so the tuned kernels take the same integer specialisations as the model's
MAP_SIDES = (56, 28, 14, 7)

QUICK_WINDOWS = ((3, 1), (3, 2), (7, 1))  # (window, stride)
QUICK_BUCKETS = (4**8,)

# ---------------------------------------------------------------------------------- candidates
BLOCK_P_CHOICES = (4, 8, 16, 32, 64, 128, 256)
WARPS_CHOICES = (1, 2, 4, 8, 16)
STAGES_CHOICES = (1, 2, 3)
# (candidates holding more fp32 elements per thread than qna_triton.tuning.MAX_ELEMS_PER_THREAD spill)
DEFAULT_CANDIDATES = 7
QUICK_CANDIDATES = 6

# ------------------------------------------------------------------------------ time estimate
# Assumptions of the estimate, not measurements of an H100: compiling one kernel variant for sm_90
# took 0.25-1.5 s (mean ~0.9 s) on the development machine; one timing is do_bench's warm-up and
# repetition windows plus the correctness check and launch overheads.
COMPILE_S = 1.0
WARMUP_MS = 5
REP_MS = 15
TIMING_OVERHEAD_S = 0.015
SHAPE_SETUP_S = 0.1  # random inputs and reference outputs per shape


@dataclass(frozen=True)
class Shape:
    """One problem to tune every kernel on (input ``[B, H, W]`` map, QnA geometry, dtype)."""

    dtype: str
    heads: int
    head_dim: int
    n_queries: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    batch: int
    height: int
    width: int
    source: str = field(default="", compare=False)

    @property
    def out_hw(self) -> Tuple[int, int]:
        return (output_size(self.height, self.kh, self.sh, self.ph), output_size(self.width, self.kw, self.sw, self.pw))

    @property
    def pixels(self) -> int:
        ho, wo = self.out_hw
        return self.batch * ho * wo

    @property
    def bucket(self) -> int:
        return size_bucket(self.pixels)

    def key(self, kernel: str) -> EntryKey:
        return EntryKey(
            kernel,
            self.dtype,
            self.kh,
            self.kw,
            self.sh,
            self.sw,
            self.heads,
            self.head_dim,
            self.n_queries,
            self.bucket,
        )

    def problem(self) -> Dict[str, object]:
        """The measured problem, as stored next to each entry."""
        return {
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "padding": [self.ph, self.pw],
            "out": list(self.out_hw),
            "source": self.source,
        }

    def input_bytes(self) -> int:
        """Device memory a tuning session holds at most (the float32 draw of the inputs aside)."""
        item = 4 if self.dtype == "float32" else 2
        inp = self.batch * self.height * self.width
        out = self.pixels
        nh, c = self.n_queries * self.heads, self.heads * self.head_dim
        # fused logits+values, the reference's and a candidate's gradients of them; reference and
        # candidate outputs and grad_out; float32 lse (twice) and delta
        return item * (3 * inp * (nh + c) + 3 * out * c) + 4 * 3 * out * nh

    def describe(self) -> str:
        return (
            f"{self.dtype} h{self.heads} d{self.head_dim} q{self.n_queries} k{self.kh}x{self.kw} "
            f"s{self.sh}x{self.sw} B{self.batch} {self.height}x{self.width}"
        )


def representative_shape(
    bucket: int, dtype: str, heads: int, head_dim: int, n_queries: int, k: int, s: int, source: str = ""
) -> Shape:
    """A problem with its output pixels in ``bucket`` (near the bucket's geometric middle) on one of
    ``MAP_SIDES`` (largest side holding at least two images), square window ``k``, stride ``s``."""
    target = 2 * bucket
    side = next((m for m in MAP_SIDES if target // (m * m) >= 2), MAP_SIDES[-1])
    batch = max(1, round(target / (side * side)))
    while size_bucket(batch * side * side) > bucket and batch > 1:
        batch -= 1
    while size_bucket(batch * side * side) < bucket:
        batch += 1
    p = default_padding((k, k))[0]
    # input size whose output is side x side
    h = (side - 1) * s + k - 2 * p
    h = max(h, k - 2 * p, 1)
    shape = Shape(dtype, heads, head_dim, n_queries, k, k, s, s, p, p, batch, h, h, source)
    assert shape.out_hw == (side, side), (shape, side)
    return shape


def _sweep(
    dtypes: Iterable[str],
    head_configs: Iterable[Tuple[int, int, int]],
    window_strides: Iterable[Tuple[int, int]],
    buckets: Iterable[int],
    source: str,
) -> List[Shape]:
    shapes = []
    for dtype in dtypes:
        for heads, head_dim, nq in head_configs:
            for k, s in window_strides:
                for b in buckets:
                    if 2 * b * k * k > WORK_CAP:
                        continue
                    shapes.append(representative_shape(b, dtype, heads, head_dim, nq, k, s, source))
    return shapes


def _dedupe(shapes: Iterable[Shape]) -> List[Shape]:
    """One shape per key (same dtype, geometry, heads and bucket), first one wins."""
    seen, out = set(), []
    for shape in shapes:
        k = shape.key("fwd")
        if k not in seen:
            seen.add(k)
            out.append(shape)
    return out


@dataclass
class Plan:
    """Shapes x kernels to tune, and how many candidates each entry times."""

    name: str
    shapes: List[Shape]
    kernels: Tuple[str, ...] = KERNELS
    n_candidates: int = DEFAULT_CANDIDATES

    def entries(self) -> List[Tuple[Shape, str]]:
        return [(s, k) for s in self.shapes for k in self.kernels]

    def candidates(self, shape: Shape, kernel: str) -> List[KernelConfig]:
        """The library's default for the problem first (:func:`default_config`), then the direct
        neighbourhood of :func:`candidate_configs` and, for the kernels with a banded form, the banded
        tiles of :func:`banded_candidates`: the tuner picks the algorithm per window as well as the tile."""
        direct = candidate_configs(kernel, shape.heads, shape.head_dim, shape.n_queries, self.n_candidates)
        extra = banded_candidates(shape, kernel)
        first = default_config(kernel, shape)
        return [first] + [c for c in dict.fromkeys(direct + extra) if c != first]


# The target the default configs are the reference for where no GPU is at hand (a dry run): one with the
# tensor cores of every banded kernel (sm_90). On a GPU the reference is that GPU's own default.
REFERENCE_TARGET = Target(known_capability=(9, 0))


def reference_target() -> Target:
    """The target whose default configs the tuner measures against: the current GPU (its entry in the
    target table decides which banded kernels its default takes), else :data:`REFERENCE_TARGET`."""
    if torch.cuda.is_available():
        return Target(cuda_index=torch.cuda.current_device())
    return REFERENCE_TARGET


def default_config(kernel: str, shape: Shape, target: Optional[Target] = None) -> KernelConfig:
    """What the library runs for this problem without a tuned file on ``target`` (default
    :func:`reference_target`), by :func:`qna_triton.tuning.select_config`: the reference each tuned
    entry's speed-up is measured against."""
    return select_config(
        kernel,
        getattr(torch, shape.dtype),
        shape.heads,
        shape.head_dim,
        shape.n_queries,
        (shape.kh, shape.kw),
        (shape.sh, shape.sw),
        shape.pixels,
        target or reference_target(),
        algo="auto",
    )


def banded_candidates(shape: Shape, kernel: str = "fwd") -> List[KernelConfig]:
    """Banded tiles of ``kernel`` (the forward, the delta or, at stride 1, the main backward kernel) worth
    timing for windows of 3 x 3 and more: the default 16 x 16 pixels, the other warp count, and (not for
    the main backward kernel, whose larger tiles spill by the compiler report) 32 columns or 32 rows on
    8 warps."""
    if shape.kh * shape.kw < 9 or not has_banded_form(kernel, (shape.sh, shape.sw)):
        return []
    base = banded_config(
        (shape.kh, shape.kw), shape.head_dim, getattr(torch, shape.dtype), (shape.sh, shape.sw), kernel
    )
    tiles = [base, replace(base, num_warps=12 - base.num_warps)]
    if kernel != "bwd":
        tiles += [replace(base, block_w=32, num_warps=8), replace(base, block_r=32, num_warps=8)]
    return list(dict.fromkeys(tiles))


def default_plan(
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    windows: Sequence[int] = WINDOWS,
    strides: Sequence[int] = STRIDES,
    head_configs: Optional[Sequence[Tuple[int, int, int]]] = None,
    buckets: Sequence[int] = BUCKETS,
    kernels: Sequence[str] = KERNELS,
    n_candidates: int = DEFAULT_CANDIDATES,
) -> Plan:
    """The three sweeps of the module docstring. ``head_configs`` (heads, head_dim, queries): the first
    replaces ``BASE_HEADS`` and the others ``HEAD_CONFIGS``; the window and stride of the dtype and
    heads sweeps are the ones of (3, 1), (7, 1), (3, 2) within ``windows`` and ``strides``, else the
    first of those."""
    _check_axes(dtypes, kernels, buckets)
    base, others_heads = (BASE_HEADS, HEAD_CONFIGS) if not head_configs else (head_configs[0], head_configs[1:])
    bad = [hc for hc in [base, *others_heads] if len(hc) != 3 or min(hc) < 1]
    if bad:
        raise ValueError(f"head configs must be (heads, head_dim, queries) of positive ints, got {bad}")
    first, others = dtypes[0], list(dtypes[1:])
    ws = [(k, s) for s in strides for k in sorted(set(windows)) if not (k == 1 and s > 1)]
    core = [(k, s) for k, s in ((3, 1), (7, 1), (3, 2)) if k in windows and s in strides] or ws[:1]
    shapes = _sweep([first], [base], ws, buckets, "window sweep")
    shapes += _sweep(others, [base], core, buckets, "dtype sweep")
    shapes += _sweep([first], others_heads, [core[0]], buckets, "heads sweep")
    return Plan("default", _dedupe(shapes), tuple(kernels), n_candidates)


def quick_plan(
    dtypes: Sequence[str] = ("bfloat16",), kernels: Sequence[str] = KERNELS, n_candidates: int = QUICK_CANDIDATES
) -> Plan:
    """A small plan (one dtype, windows 3 and 7, one bucket) for a first look in about a minute."""
    _check_axes(dtypes, kernels, QUICK_BUCKETS)
    shapes = _sweep(dtypes, [BASE_HEADS], QUICK_WINDOWS, QUICK_BUCKETS, "quick")
    return Plan("quick", _dedupe(shapes), tuple(kernels), n_candidates)


def shapes_plan(
    name: str, shapes: Sequence[Shape], kernels: Sequence[str] = KERNELS, n_candidates: int = DEFAULT_CANDIDATES
) -> Plan:
    """A plan of given shapes (e.g. a model's layers)."""
    _check_axes([s.dtype for s in shapes], kernels, [])
    return Plan(name, _dedupe(shapes), tuple(kernels), n_candidates)


def _check_axes(dtypes: Sequence[str], kernels: Sequence[str], buckets: Sequence[int]) -> None:
    if not dtypes:
        raise ValueError("no dtypes to tune")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtypes {bad}; choose from {DTYPES}")
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        raise ValueError(f"unknown kernels {bad}; choose from {KERNELS}")
    bad = [b for b in buckets if size_bucket(b) != b]
    if bad:
        raise ValueError(f"buckets must be powers of 4, got {bad}")


# ---------------------------------------------------------------------------------- candidates
def elems_per_thread(config: KernelConfig, n_queries: int, head_dim: int) -> float:
    return tile_footprint(config, n_queries, head_dim) / (32 * config.num_warps)


@functools.lru_cache(maxsize=1024)
def _candidate_space(kernel: str, heads: int, head_dim: int, n_queries: int) -> Tuple[KernelConfig, ...]:
    return tuple(candidate_space(kernel, heads, head_dim, n_queries))


def candidate_space(kernel: str, heads: int, head_dim: int, n_queries: int) -> List[KernelConfig]:
    """Every config the GPU can hold for this kernel and head layout.

    Pruned: ``block_h`` beyond ``next_pow2(heads)``; more fp32 tile elements per thread than
    ``MAX_ELEMS_PER_THREAD`` (register spills); fewer ``[P, H, D]`` elements than threads (idle
    threads). The heuristic config is always kept, as the reference every candidate is checked against.
    """
    bd = triton.next_power_of_2(head_dim)
    bh_max = triton.next_power_of_2(heads)
    heur = heuristic_config(kernel, heads, head_dim)
    space = {heur}
    for bp in BLOCK_P_CHOICES:
        bh = 1
        while bh <= bh_max:
            for w in WARPS_CHOICES:
                for st in STAGES_CHOICES:
                    cfg = KernelConfig(bp, bh, w, st)
                    if bp * bh * bd < 32 * w:
                        continue
                    if elems_per_thread(cfg, n_queries, head_dim) > MAX_ELEMS_PER_THREAD[kernel]:
                        continue
                    space.add(cfg)
            bh *= 2
    return sorted(space, key=lambda c: (c.block_p, c.block_h, c.num_warps, c.num_stages))


def _coords(cfg: KernelConfig, n_queries: int, head_dim: int) -> Tuple[float, float, float, int]:
    # tile shape, per-thread load and pipelining depth: the axes along which speed changes
    return (
        math.log2(cfg.block_p),
        math.log2(cfg.block_h),
        math.log2(elems_per_thread(cfg, n_queries, head_dim)),
        cfg.num_stages,
    )


def candidate_configs(
    kernel: str, heads: int, head_dim: int, n_queries: int, count: int = DEFAULT_CANDIDATES
) -> List[KernelConfig]:
    return list(_candidate_configs(kernel, heads, head_dim, n_queries, count))


@functools.lru_cache(maxsize=1024)
def _candidate_configs(kernel: str, heads: int, head_dim: int, n_queries: int, count: int) -> Tuple[KernelConfig, ...]:
    """The heuristic config first, then the ``count - 1`` configs of :func:`candidate_space` nearest
    to it (L1 distance over log2 block_p, log2 block_h, log2 elements per thread, and num_stages):
    its one-step neighbours first (one tile dimension doubled or halved with the warps following it,
    the warps alone, a second pipeline stage), then two-step ones.

    A fixed local neighbourhood keeps the number of distinct compiled kernels, which dominates the
    tuning time, independent of the problem sizes.
    """
    heur = heuristic_config(kernel, heads, head_dim)
    h0 = _coords(heur, n_queries, head_dim)

    def rank(cfg: KernelConfig):
        c = _coords(cfg, n_queries, head_dim)
        return (sum(abs(a - b) for a, b in zip(c, h0)), cfg.num_stages, -cfg.block_p, cfg.block_h, cfg.num_warps)

    others = sorted((c for c in _candidate_space(kernel, heads, head_dim, n_queries) if c != heur), key=rank)
    return (heur, *others[: max(0, count - 1)])


# ------------------------------------------------------------------------------ time estimate
def _spec(v: object) -> object:
    # how Triton specialises an integer argument: its own kernel for 1, another for multiples of 16;
    # a tuple element by element; anything else (tensors, constants) as it is
    if isinstance(v, tuple):
        return tuple(_spec(e) for e in v)
    if type(v) is not int:
        return v
    return "1" if v == 1 else ("D" if v % 16 == 0 else "")


def specialisation(shape: Shape) -> Tuple[object, ...]:
    """The specialisation classes of a launch on ``shape`` (the QnA layer's fused layout): of each
    argument the launch description (:class:`qna_triton.kernels.Problem`) hands every kernel."""
    from qna_triton.kernels import Problem
    from qna_triton.layout import split_packed

    N, h, d, meta = shape.n_queries, shape.heads, shape.head_dim, torch.device("meta")
    qv = torch.empty(
        shape.batch, shape.height, shape.width, N * h + h * d, dtype=getattr(torch, shape.dtype), device=meta
    )
    rpb = torch.empty(shape.kh * shape.kw, N, h, device=meta)
    logits, values = split_packed(qv, rpb)
    p = Problem.of(logits, values, rpb, rpb, (shape.kh, shape.kw), (shape.sh, shape.sw), (shape.ph, shape.pw))
    return tuple(_spec(v) for v in p.args.values())


@dataclass
class Estimate:
    entries: int
    timings: int
    compiles: int
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.entries} entries, {self.timings} timed candidates, ~{self.compiles} kernel compiles: "
            f"about {self.seconds / 60:.1f} min (assumes ~{COMPILE_S:.1f} s per compile and "
            f"~{(WARMUP_MS + REP_MS) / 1000 + TIMING_OVERHEAD_S:.3f} s per timing; calibrate with the "
            f"'elapsed_s' of a real run's entries)"
        )


def estimate(plan: Plan, done: Optional[set] = None) -> Estimate:
    """Time to run ``plan`` (entries whose key string is in ``done`` cost nothing)."""
    done = done or set()
    compiled, timings, entries, setups = set(), 0, 0, 0
    for shape in plan.shapes:
        pending = [k for k in plan.kernels if shape.key(k).to_str() not in done]
        if pending:
            setups += 1
        spec = specialisation(shape)
        for kernel in pending:
            entries += 1
            cands = plan.candidates(shape, kernel)
            timings += len(cands)
            for c in cands:
                compiled.add((kernel, shape.dtype, shape.n_queries, shape.heads, shape.head_dim, c, spec))
    seconds = (
        len(compiled) * COMPILE_S + timings * ((WARMUP_MS + REP_MS) / 1000 + TIMING_OVERHEAD_S) + setups * SHAPE_SETUP_S
    )
    return Estimate(entries, timings, len(compiled), seconds)


def with_candidates(plan: Plan, n: int) -> Plan:
    return replace(plan, n_candidates=n)
