"""Ahead-of-time compilation of the kernels for a GPU architecture, without a GPU.

Triton ships ``ptxas`` and ``nvdisasm``, so a kernel can be lowered to a cubin for ``sm_80`` or
``sm_90`` on any machine. That catches what the interpreter cannot (block shapes, dtype rules,
compile errors) and reports registers, spills and shared memory per configuration (used by the
tests on CPU-only CI and by the autotuner to prune configurations before timing them).

The kernels are compiled exactly as a launch would compile them: the arguments of a representative
problem go through Triton's own launch-time specialisation (integers equal to 1 become constants,
multiples of 16 and aligned pointers are marked so), on ``meta`` tensors. The machine code of each
window loop is then read back (:func:`loop_profile`): instructions, exponentials, global loads by
width, and shared-memory traffic and barriers, which inside a loop mean a layout conversion per
window offset. Static counts, not timings: they show what the compiler made of a kernel.

Usage: ``python -m qna_triton.kernels.aot [--arch 90] [--json out.json] [--loops]`` compiles the
default configuration of every kernel and prints a resource table, and with ``--loops`` the loop
profile (exit status 1 if any kernel fails to compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
from triton.compiler import ASTSource

from ..layout import default_padding, empty_query_minor, split_packed
from ..tuning import BANDED_KERNELS, KERNELS, KernelConfig, Target, select_config
from ..tuning.targets import TARGETS, target_named

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class LoopProfile:
    """One innermost loop of the machine code (a body ptxas may have unrolled)."""

    instructions: int
    exp2: int
    global_loads: Dict[str, int]
    shared_ops: int
    barriers: int
    shuffles: int
    ffma: int
    mma: int = 0  # tensor-core instructions (HMMA: mma.sync; HGMMA: Hopper's warpgroup products)


@dataclass(frozen=True)
class CompileReport:
    """Resources of one compiled kernel variant, and the profile of its window loops."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    loops: Tuple[LoopProfile, ...] = ()

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def loop_barriers(self) -> int:
        """Barriers inside loops: each is part of a shared-memory layout conversion per iteration."""
        return sum(lp.barriers for lp in self.loops)


LAYOUTS = ("packed", "generic")


def representative_launch(
    kernel: str,
    dtype: torch.dtype,
    config: KernelConfig,
    n_queries: int,
    heads: int,
    head_dim: int,
    has_scale: bool = True,
    layout: str = "packed",
    window: int = 7,
    wide: bool = False,
):
    """The launch (:class:`~qna_triton.kernels.KernelLaunch`, built by the launchers' own builders) of
    ``kernel`` with ``config`` on a representative problem, on ``meta`` tensors (nothing is allocated):
    a 2 x 16 x 16 map, a square ``window`` at stride 1 with the default padding.

    ``packed``: logits and values are column blocks of one projection output, the logits
    query-minor (the QnA layer's path); ``generic``: separate contiguous ``[N, h]`` logits and values.
    ``wide``: head-major logits with a head stride beyond 2^31 elements (the 64-bit offset variant).
    The backward's gradients are the two column ranges of one packed ``dqv``, as in the layer."""
    from .launch import Problem, delta_launch, forward_launch, main_backward_launch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    B, H, W, N, h, d = 2, 16, 16, n_queries, heads, head_dim
    meta = dict(device="meta")
    if wide:
        big = torch.empty(2**31 + B * H * W * N * h, dtype=dtype, **meta)
        L = big.as_strided((B, H, W, N, h), (H * W * N, W * N, N, 1, 2**31 // h + 1))
        V = torch.empty(B, H, W, h, d, dtype=dtype, **meta)
    elif layout == "packed":
        L, V = split_packed(torch.empty(B, H, W, h * N + h * d, dtype=dtype, **meta), torch.empty(1, N, h, **meta))
    else:
        L = torch.empty(B, H, W, N, h, dtype=dtype, **meta)
        V = torch.empty(B, H, W, h, d, dtype=dtype, **meta)
    ks = (window, window)
    rpb = torch.empty(window * window, N, h, **meta)
    p = Problem.of(L, V, rpb, rpb if has_scale else None, ks, (1, 1), default_padding(ks), wide=True if wide else None)
    if kernel == "fwd":
        return forward_launch(p, config)[0]
    g = torch.empty(p.out_shape, dtype=dtype, **meta)
    lse = empty_query_minor(p.stats_shape, dtype=torch.float32, **meta)
    if kernel == "bwd_delta":
        return delta_launch(p, config, g, lse)[0]
    dqv = torch.empty(B, H, W, h * N + h * d, dtype=dtype, **meta)
    return main_backward_launch(p, config, g, lse, lse, dqv[..., : h * N], dqv[..., h * N :])[0]


def compile_kernel(
    kernel: str,
    dtype: torch.dtype,
    config: KernelConfig,
    n_queries: int,
    head_dim: int,
    has_scale: bool = True,
    arch: Union[int, str] = 90,
    wide: bool = False,
    heads: Optional[int] = None,
    layout: str = "packed",
    window: int = 7,
    loops: bool = False,
) -> CompileReport:
    """Compiles ``kernel`` for the target ``arch`` (:func:`~qna_triton.tuning.targets.target_named`:
    ``90``, ``"sm_120"``, ``"gfx942"``) as a launch on a representative problem would (see the module
    docstring) and returns its resources; ``loops`` adds the loop profile (NVIDIA: ``nvdisasm``; AMD
    targets have no disassembler in Triton's wheel, so none). Raises on errors, and on a kernel whose
    shared memory exceeds what the target gives one program."""
    from triton._utils import find_paths_if, get_iterable_path
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if config.algo == "banded" and kernel not in BANDED_KERNELS:
        raise ValueError(f"{kernel} has no banded form")
    heads = heads if heads is not None else config.block_h
    launch = representative_launch(kernel, dtype, config, n_queries, heads, head_dim, has_scale, layout, window, wide)
    fn = launch.fn
    gpu = target_named(arch)
    target = gpu.gpu_target()
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _, spec, options = binder(**launch.kwargs)  # options: the launch's (warps, stages, FP fusion)
    # as a launch packs them: an argument's (type, attribute), nested for a tuple argument, each of
    # its elements addressed by its path
    types, values = [sp[0] for sp in spec], [sp[1] for sp in spec]
    signature = {p.name: t for p, t in zip(fn.params, types)}
    constexprs = {path: get_iterable_path(values, path) for path in find_paths_if(types, lambda _, t: t == "constexpr")}
    attrs = {
        path: backend.parse_attr(get_iterable_path(values, path))
        for path in find_paths_if(values, lambda _, v: isinstance(v, str))
        if path not in constexprs
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options)
    shared = compiled.metadata.shared
    if shared > gpu.shared_per_block:
        raise ValueError(f"{shared} bytes of shared memory: {gpu.name} gives one program {gpu.shared_per_block}")
    if gpu.vendor == "amd":
        regs, scratch = _amdgcn_usage(compiled.asm["amdgcn"])
        return CompileReport(regs, scratch, 0, shared, ())
    regs, st, ld, sass = _ptxas(compiled.asm["ptx"], int(gpu.arch), want_sass=loops)
    return CompileReport(regs, st, ld, shared, loop_profile(sass) if loops else ())


def _amdgcn_usage(asm: str) -> Tuple[int, int]:
    """``(VGPRs including AGPRs, scratch bytes per lane)`` from the AMD backend's assembly comments: the
    scratch is where the compiler spills, so it stands for the spill bytes of an NVIDIA report."""
    regs = re.search(r";\s*TotalNumVgprs:\s*(\d+)", asm) or re.search(r";\s*NumVgprs:\s*(\d+)", asm)
    scratch = re.search(r";\s*ScratchSize:\s*(\d+)", asm)
    if regs is None or scratch is None:
        raise RuntimeError("the AMD assembly lacks its register / scratch comments (TotalNumVgprs, ScratchSize)")
    return int(regs.group(1)), int(scratch.group(1))


def _ptxas(ptx: str, arch: int, want_sass: bool = False):
    """``(registers, spill store bytes, spill load bytes, SASS text or '')`` of ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", gpu, path, "-o", path + ".cubin"], capture_output=True, text=True, check=True
        )
        sass = ""
        if want_sass:
            nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
            sass = subprocess.run([nvdisasm, "-c", path + ".cubin"], capture_output=True, text=True, check=True).stdout
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)), int(spill.group(2)), sass


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def loop_profile(sass: str) -> Tuple[LoopProfile, ...]:
    """The innermost loops of ``nvdisasm -c`` output (a backward branch and its target, containing no
    other backward branch), in address order."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2), m.group(3)))
            for name in pending:
                labels[name] = instrs[-1][0]
            pending = []
    spans = []
    for addr, op, rest in instrs:
        t = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
        if t and labels.get(t.group(1), addr + 1) <= addr:
            spans.append((labels[t.group(1)], addr))
    inner = [sp for sp in spans if not any(o != sp and sp[0] <= o[0] and o[1] <= sp[1] for o in spans)]
    result = []
    for start, end in sorted(inner):
        ops = [op for addr, op, _ in instrs if start <= addr <= end]
        loads: Dict[str, int] = {}
        for op in ops:
            if op.startswith("LDG"):
                width = next((w for w in ("128", "64", "U16", "U8") if w in op.split(".")), "32")
                loads[width] = loads.get(width, 0) + 1
        result.append(
            LoopProfile(
                instructions=len(ops),
                exp2=sum(op.startswith("MUFU.EX2") for op in ops),
                global_loads=loads,
                shared_ops=sum(op.startswith(("LDS", "STS", "STSM", "LDSM")) for op in ops),
                barriers=sum(op.startswith("BAR") for op in ops),
                shuffles=sum(op.startswith("SHFL") for op in ops),
                ffma=sum(op.startswith("FFMA") for op in ops),
                mma=sum(op.startswith(("HMMA", "HGMMA", "UTCHMMA", "UTCQMMA")) for op in ops),  # sm_80, 90, 100
            )
        )
    return tuple(result)


HEAD_SHAPES = ((16, 8), (8, 12), (8, 16), (4, 32), (2, 64), (1, 128))


def default_plan(archs: Sequence[Union[int, str]]) -> List[dict]:
    """Per target (:data:`~qna_triton.tuning.targets.TARGETS`), the configuration the heuristic
    chooses for every kernel at the head shapes we support, on the QnA layer's packed layout; plus the
    query-count / scale / float16 variants, the generic ``[N, h]`` logits layout, the 64-bit-offset
    variant, and the banded kernels the target's table entry lets the heuristic take (under the
    installed Triton) at their default tiles."""
    plan = []
    for gpu in (target_named(a) for a in archs):
        arch = gpu.name
        for h, d in HEAD_SHAPES:
            for kernel in KERNELS:
                plan.append(
                    dict(
                        kernel=kernel,
                        dtype="bf16",
                        heads=h,
                        head_dim=d,
                        n_queries=2,
                        has_scale=True,
                        arch=arch,
                        layout="packed",
                    )
                )
        for kernel in KERNELS:
            for n, scale in ((1, False), (8, True)):
                plan.append(
                    dict(
                        kernel=kernel,
                        dtype="fp16",
                        heads=4,
                        head_dim=8,
                        n_queries=n,
                        has_scale=scale,
                        arch=arch,
                        layout="packed",
                    )
                )
            plan.append(
                dict(
                    kernel=kernel,
                    dtype="bf16",
                    heads=16,
                    head_dim=8,
                    n_queries=2,
                    has_scale=True,
                    arch=arch,
                    layout="generic",
                )
            )
            plan.append(
                dict(
                    kernel=kernel,
                    dtype="bf16",
                    heads=4,
                    head_dim=8,
                    n_queries=2,
                    has_scale=True,
                    arch=arch,
                    layout="generic",
                    wide=True,
                )
            )
        # the banded forward and delta (tensor cores) at their default tiles: both halo widths, chunked
        # head dims, and the three operand modes (bf16; tf32x3 for float16 and float32)
        for dtype, (h, d), window in (
            ("bf16", (16, 8), 15),
            ("bf16", (16, 8), 31),
            ("bf16", (4, 32), 15),
            ("bf16", (1, 128), 15),
            ("fp16", (16, 8), 15),
            ("fp32", (16, 8), 7),
        ):
            for kernel in ("fwd", "bwd_delta"):
                if gpu.banded_allowed(kernel, dtype=getattr(torch, _TORCH_NAME[dtype])):
                    plan.append(
                        dict(
                            kernel=kernel,
                            algo="banded",
                            dtype=dtype,
                            heads=h,
                            head_dim=d,
                            n_queries=2,
                            has_scale=True,
                            arch=arch,
                            layout="packed",
                            window=window,
                        )
                    )
        # the banded main backward kernel where the heuristic takes it (bf16 and fp16, head dims to 16):
        # its halo in one 32-column chunk (k = 15) and in two (k = 31)
        for dtype, (h, d), window in (
            (("bf16", (16, 8), 15), ("bf16", (8, 16), 15), ("bf16", (16, 8), 31), ("fp16", (8, 16), 31))
            if gpu.banded_allowed("bwd", dtype=torch.bfloat16)
            else ()
        ):
            plan.append(
                dict(
                    kernel="bwd",
                    algo="banded",
                    dtype=dtype,
                    heads=h,
                    head_dim=d,
                    n_queries=2,
                    has_scale=True,
                    arch=arch,
                    layout="packed",
                    window=window,
                )
            )
    return plan


def _run(entry: dict) -> dict:
    dtype = {v: k for k, v in _TRITON_DTYPE.items()}[entry["dtype"]]
    k = entry.get("window", 7)
    cfg = select_config(
        entry["kernel"],
        dtype,
        entry["heads"],
        entry["head_dim"],
        entry["n_queries"],
        (k, k),
        (1, 1),
        1,
        Target(known_arch=entry["arch"]),
        algo=entry.get("algo", "direct"),
    )
    try:
        rep = compile_kernel(
            entry["kernel"],
            dtype,
            cfg,
            entry["n_queries"],
            entry["head_dim"],
            entry["has_scale"],
            entry["arch"],
            entry.get("wide", False),
            heads=entry["heads"],
            layout=entry.get("layout", "packed"),
            window=entry.get("window", 7),
            loops=True,
        )
        return dict(entry, config=cfg.as_dict(), ok=True, loop_barriers=rep.loop_barriers, **asdict(rep))
    except Exception as exc:  # reported, not hidden: the caller fails on ok=False
        return dict(entry, config=cfg.as_dict(), ok=False, error=f"{type(exc).__name__}: {exc}")


def _loads(loads: Dict[str, int]) -> str:
    return " ".join(f"{n}x{w}" for w, n in sorted(loads.items())) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--arch",
        action="append",
        choices=[*TARGETS, *(str(t.arch) for t in TARGETS.values() if t.vendor == "nvidia")],
        metavar="T",
        help="a target, repeatable: "
        + ", ".join(f"{t.name} ({t.gpus})" for t in TARGETS.values())
        + "; 90 means sm_90. Default: every target",
    )
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--loops", action="store_true", help="also print the profile of every window loop")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")
    plan = default_plan(args.arch or list(TARGETS))
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(_run, plan))
    print(
        "| arch | kernel | dtype | layout | heads x head dim | queries | tile | warps | registers "
        "| spills (B) | barriers in loops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["config"]
        usage = (
            f"{r['registers']} | {r['spill_stores'] + r['spill_loads']} | {r['loop_barriers']}"
            if r["ok"]
            else f"FAILED: {r['error'][:60]} | - | -"
        )
        layout = r["layout"] + (", 64-bit" if r.get("wide") else "")
        tile = (
            f"banded k={r['window']}: {c['block_r']} x {c['block_w']} px"
            if r.get("algo") == "banded"
            else f"{c['block_p']} x {c['block_h']}"
        )
        print(
            f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {layout} | {r['heads']} x {r['head_dim']} | "
            f"{r['n_queries']} | {tile} | {c['num_warps']} | {usage} |"
        )
    if args.loops:
        print(
            "\n| arch | kernel | layout | heads x head dim | queries | loop | instructions | ex2 | FFMA "
            "| global loads (count x width) | shared ops | barriers | shuffles | mma |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            for i, lp in enumerate(r.get("loops", ())):
                print(
                    f"| {r['arch']} | {r['kernel']}{' (banded)' if r.get('algo') == 'banded' else ''} | {r['layout']} | {r['heads']} x {r['head_dim']} | "
                    f"{r['n_queries']} | {i} | {lp['instructions']} | {lp['exp2']} | {lp['ffma']} | "
                    f"{_loads(lp['global_loads'])} | {lp['shared_ops']} | {lp['barriers']} | {lp['shuffles']} "
                    f"| {lp['mma']} |"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not all(r["ok"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
