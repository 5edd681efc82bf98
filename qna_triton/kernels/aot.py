"""Ahead-of-time compilation of the kernels for a GPU architecture, without a GPU.

Triton ships ``ptxas``, so a kernel can be lowered to a cubin for ``sm_80`` or ``sm_90`` on any
machine. That catches what the interpreter cannot (block shapes, dtype rules, compile errors) and
reports registers, spills and shared memory per configuration: used by the tests on CPU-only CI
and by the autotuner to prune configurations before timing them.

Usage: ``python -m qna_triton.kernels.aot [--arch 90] [--json out.json]`` compiles the default
configuration of every kernel and prints a resource table (exit status 1 if any fails to compile).
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
from typing import Dict, List, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..tuning import KernelConfig, heuristic_config
from .backward import qna_bwd_delta_kernel, qna_bwd_kernel
from .forward import qna_fwd_kernel

KERNEL_FNS = {"fwd": qna_fwd_kernel, "bwd_delta": qna_bwd_delta_kernel, "bwd": qna_bwd_kernel}
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# pointers holding the inputs' dtype; every other pointer is a float32 table or buffer
_INPUT_DTYPE_PTRS = {"L", "V", "O", "G", "DL", "DV"}
_POINTERS = _INPUT_DTYPE_PTRS | {"R", "A", "LSE", "DELTA", "DR_PART", "DA_PART"}


@dataclass(frozen=True)
class CompileReport:
    """Resources of one compiled kernel variant."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def compile_kernel(
    kernel: str,
    dtype: torch.dtype,
    config: KernelConfig,
    n_queries: int,
    head_dim: int,
    has_scale: bool = True,
    arch: int = 90,
    wide: bool = False,
) -> CompileReport:
    """Compiles ``kernel`` for ``sm_<arch>`` and returns its resource usage (raises on compile errors)."""
    fn = KERNEL_FNS[kernel]
    consts = dict(
        HAS_SCALE=has_scale, WIDE=wide, BLOCK_P=config.block_p, BLOCK_N=triton.next_power_of_2(n_queries),
        BLOCK_H=config.block_h, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    signature: Dict[str, str] = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*" + (_TRITON_DTYPE[dtype] if name in _INPUT_DTYPE_PTRS else "fp32")
        else:
            signature[name] = "i32"  # sizes, strides, window geometry
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return CompileReport(*_ptxas_usage(compiled.asm["ptx"], arch), compiled.metadata.shared)


def _ptxas_usage(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, path, "-o", path + ".cubin"],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)), int(spill.group(2))


HEAD_SHAPES = ((16, 8), (8, 12), (8, 16), (4, 32), (2, 64), (1, 128))


def default_plan(archs: Sequence[int]) -> List[dict]:
    """The heuristic configuration of every kernel for the head shapes we support, per architecture,
    plus the query-count / scale / float16 variants and the 64-bit-offset variant."""
    plan = []
    for arch in archs:
        for h, d in HEAD_SHAPES:
            for kernel in KERNEL_FNS:
                plan.append(dict(kernel=kernel, dtype="bf16", heads=h, head_dim=d, n_queries=2,
                                 has_scale=True, arch=arch))
        for kernel in KERNEL_FNS:
            for n, scale in ((1, False), (8, True)):
                plan.append(dict(kernel=kernel, dtype="fp16", heads=4, head_dim=8, n_queries=n,
                                 has_scale=scale, arch=arch))
            plan.append(dict(kernel=kernel, dtype="bf16", heads=4, head_dim=8, n_queries=2,
                             has_scale=True, arch=arch, wide=True))
    return plan


def _run(entry: dict) -> dict:
    dtype = {v: k for k, v in _TRITON_DTYPE.items()}[entry["dtype"]]
    cfg = heuristic_config(entry["kernel"], entry["heads"], entry["head_dim"])
    try:
        rep = compile_kernel(entry["kernel"], dtype, cfg, entry["n_queries"], entry["head_dim"],
                             entry["has_scale"], entry["arch"], entry.get("wide", False))
        return dict(entry, config=cfg.as_dict(), ok=True, **asdict(rep))
    except Exception as exc:  # reported, not hidden: the caller fails on ok=False
        return dict(entry, config=cfg.as_dict(), ok=False, error=f"{type(exc).__name__}: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability x10, repeatable (80: A100, 90: H100/H200); default 80 and 90")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")
    plan = default_plan(args.arch or [80, 90])
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(_run, plan))
    print("| arch | kernel | dtype | heads x head dim | queries | block_p x block_h | warps | registers | spills (B) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["config"]
        usage = (f"{r['registers']} | {r['spill_stores'] + r['spill_loads']}" if r["ok"]
                 else f"FAILED: {r['error'][:60]} | -")
        print(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['heads']} x {r['head_dim']} | "
              f"{r['n_queries']} | {c['block_p']} x {c['block_h']} | {c['num_warps']} | {usage} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not all(r["ok"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
