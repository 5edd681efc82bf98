"""``python -m qna_triton.autotune``: tune the QnA kernels on this GPU and write ``<gpu>.json`` for run-time look-up.

Examples::

    python -m qna_triton.autotune --dry-run                 # the plan and its time estimate (no GPU needed)
    python -m qna_triton.autotune --quick                   # a small plan, about a minute on an H100
    python -m qna_triton.autotune                           # the default plan (about 16 min on an H100 by its estimate)
    python -m qna_triton.autotune --model qna_vit_tiny --batch 128   # exactly the QnA layers of a model
    python -m qna_triton.autotune --bench-report            # also write benchmarks/results/<gpu>/autotune.md

Results go to ``<user folder>/<gpu>.json`` (``--out-dir``, else ``$QNA_TRITON_CONFIG_DIR``, else
``$XDG_CACHE_HOME/qna_triton/configs``; see :func:`qna_triton.tuning.user_config_dir`), written after every
entry; re-running the same command continues where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from qna_triton.env import capture_environment
from qna_triton.tuning import (
    CONFIG_DIR_ENV,
    KERNELS,
    SCHEMA_VERSION,
    ConfigFileError,
    clear_cache,
    config_file_name,
    read_config_file,
    sanitize_gpu_name,
    user_config_dir,
)

from . import plan as plan_mod
from .plan import Plan, estimate
from .tuner import config_label


def _csv(kind, choices: Optional[Sequence[str]] = None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        try:
            out = [kind(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        if choices is not None:
            bad = [t for t in out if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return out

    return parse


def _bucket(text: str) -> int:
    """``4^8`` or ``65536``."""
    if "^" in text:
        base, exp = text.split("^", 1)
        if base.strip() != "4":
            raise ValueError(f"buckets are powers of 4, got {text!r}")
        return 4 ** int(exp)
    return int(text)


def _head_config(text: str):
    parts = text.lower().split("x")
    if len(parts) != 3:
        raise ValueError(f"head config {text!r} is not HEADSxHEAD_DIMxQUERIES")
    return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m qna_triton.autotune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = ap.add_argument_group("what to tune")
    what.add_argument("--quick", action="store_true", help="small plan: one dtype, windows 3/7, one size bucket")
    what.add_argument(
        "--model",
        help="tune the QnA layers of a model: a name of qna_vit "
        "(qna_vit_tiny, ...) or module:function returning an nn.Module",
    )
    what.add_argument("--batch", type=int, default=128, help="batch size for --model (default 128)")
    what.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="N",
        help="per-sample input size for --model (default: the model's), e.g. 3 224 224",
    )
    what.add_argument(
        "--dtypes",
        type=_csv(str, plan_mod.DEFAULT_DTYPES),
        help=f"comma-separated (default {','.join(plan_mod.DEFAULT_DTYPES)}; --quick: bfloat16)",
    )
    what.add_argument("--kernels", type=_csv(str, KERNELS), default=list(KERNELS))
    what.add_argument("--windows", type=_csv(int), help="square windows k (default 1-31 odd, 2, 4, 8)")
    what.add_argument("--strides", type=_csv(int), help="strides (default 1,2)")
    what.add_argument(
        "--head-configs",
        type=_csv(_head_config),
        metavar="HxDxQ,...",
        help="heads x head_dim x queries; the first is the base of the window and dtype sweeps, "
        "the others make the heads sweep (default 16x8x2 and eleven others)",
    )
    what.add_argument("--buckets", type=_csv(_bucket), help="size buckets, e.g. 4^6,4^8 (default 4^6,4^8,4^10)")
    what.add_argument(
        "--candidates",
        type=int,
        help="candidates timed per entry, the heuristic included "
        f"(default {plan_mod.DEFAULT_CANDIDATES}, --quick "
        f"{plan_mod.QUICK_CANDIDATES})",
    )
    run = ap.add_argument_group("running")
    run.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate; no GPU needed")
    run.add_argument(
        "--out-dir",
        help=f"folder of the results (default: the user folder, ${CONFIG_DIR_ENV} or "
        "$XDG_CACHE_HOME/qna_triton/configs; the run-time look-up searches it first)",
    )
    run.add_argument("--gpu-name", help="with --dry-run: the GPU to name the output file after")
    run.add_argument("--fresh", action="store_true", help="ignore earlier results in the output file")
    run.add_argument("--retry-skipped", action="store_true", help="retry entries an earlier run gave up on")
    run.add_argument("--time-limit", type=float, metavar="S", help="stop (resumably) after about S seconds")
    run.add_argument(
        "--min-gain", type=float, default=None, help="fraction a candidate must beat the heuristic by (default 0.02)"
    )
    run.add_argument("--warmup-ms", type=float, default=plan_mod.WARMUP_MS)
    run.add_argument("--rep-ms", type=float, default=plan_mod.REP_MS)
    run.add_argument("--no-tqdm", action="store_true", help="plain progress lines even if tqdm is installed")
    run.add_argument(
        "--bench-report",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the markdown report to PATH (default benchmarks/results/<gpu>/autotune.md)",
    )
    return ap


def make_plan(args: argparse.Namespace) -> Plan:
    if args.model:
        from .model_shapes import model_factory, shapes_of_model

        dtypes = args.dtypes or list(plan_mod.DEFAULT_DTYPES)
        layers = shapes_of_model(model_factory(args.model), args.batch, args.img_size)
        if not layers:
            raise SystemExit(f"--model {args.model}: no qna_triton.QnA layer ran in its forward pass")
        shapes = [layer.shape(dt, args.model) for dt in dtypes for layer in layers]
        return plan_mod.shapes_plan(
            f"model {args.model} batch {args.batch}",
            shapes,
            args.kernels,
            args.candidates or plan_mod.DEFAULT_CANDIDATES,
        )
    if args.quick:
        return plan_mod.quick_plan(
            args.dtypes or ["bfloat16"], args.kernels, args.candidates or plan_mod.QUICK_CANDIDATES
        )
    kw = {}
    if args.windows:
        kw["windows"] = args.windows
    if args.strides:
        kw["strides"] = args.strides
    if args.buckets:
        kw["buckets"] = args.buckets
    if args.head_configs:
        kw["head_configs"] = args.head_configs
    return plan_mod.default_plan(
        args.dtypes or list(plan_mod.DEFAULT_DTYPES),
        kernels=args.kernels,
        n_candidates=args.candidates or plan_mod.DEFAULT_CANDIDATES,
        **kw,
    )


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out_dir) if args.out_dir else user_config_dir()


def describe_plan(plan: Plan, done: Optional[set] = None) -> str:
    """The plan as text: shapes, candidates per kernel and head layout, and the estimate."""
    lines = [
        f"plan '{plan.name}': {len(plan.shapes)} shapes x {len(plan.kernels)} kernels "
        f"({', '.join(plan.kernels)}) = {len(plan.entries())} entries, up to {plan.n_candidates} "
        "candidates each (heuristic + nearest neighbours)",
        "",
    ]
    width = min(44, max([6] + [len(s.source) for s in plan.shapes]))
    lines.append(
        f"{'#':>4}  {'source':<{width}} {'dtype':<9} {'heads':>5} {'hd':>4} {'q':>2} {'window':>7} "
        f"{'stride':>6} {'input B x H x W':>18} {'out px':>9} {'bucket':>6}"
    )
    for i, s in enumerate(plan.shapes):
        ho, wo = s.out_hw
        b = s.bucket.bit_length() // 2
        lines.append(
            f"{i + 1:>4}  {s.source[-width:]:<{width}} {s.dtype:<9} {s.heads:>5} {s.head_dim:>4} {s.n_queries:>2} "
            f"{s.kh:>3}x{s.kw:<3} {s.sh:>3}x{s.sw:<2} {f'{s.batch} x {s.height} x {s.width}':>18} "
            f"{s.pixels:>9} {'4^' + str(b):>6}"
        )
    lines.append("")
    seen = set()
    for s in plan.shapes:
        for k in plan.kernels:
            layout = (k, s.heads, s.head_dim, s.n_queries)
            if layout in seen:
                continue
            seen.add(layout)
            cands = plan.candidates(s, k)
            lines.append(
                f"candidates {k:<9} heads {s.heads:>3} head_dim {s.head_dim:>3} queries {s.n_queries}: "
                + ", ".join(config_label(c) for c in cands)
            )
    lines.append("")
    est = estimate(plan, done)
    if done:
        lines.append(f"{len(plan.entries()) - est.entries} entries already done in the results file")
    lines.append("estimate: " + est.describe())
    return "\n".join(lines)


def _metadata(info: Dict[str, object], args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, object]:
    env = capture_environment()  # versions and date; the device fields come from the bench (``info``)
    return {
        **info,
        "device_key": sanitize_gpu_name(str(info["gpu_name"])),
        "torch_version": env.torch,
        "triton_version": env.triton,
        "qna_triton_version": env.qna_triton,
        "date": env.date,
        "command": "python -m qna_triton.autotune " + " ".join(shlex.quote(a) for a in argv),
        "schema": f"schema_version {SCHEMA_VERSION}: see qna_triton/configs/README.md",
        "bucket": "output pixels B*H_out*W_out rounded down to a power of 4",
        "timing": {
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "statistic": "median",
            "min_gain": args.min_gain,
        },
    }


def run(args: argparse.Namespace, argv: Sequence[str], bench=None, log=print) -> int:
    """Tunes ``make_plan(args)`` with ``bench`` (default: the CUDA bench) and writes file and report."""
    from .report import console_report, markdown_report
    from .tuner import MIN_GAIN, ResultStore, run_plan

    if args.min_gain is None:
        args.min_gain = MIN_GAIN
    plan = make_plan(args)
    if bench is None:
        import torch

        if not torch.cuda.is_available():
            log("python -m qna_triton.autotune needs a CUDA GPU (use --dry-run to see the plan without one)")
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            log("TRITON_INTERPRET=1 is set: unset it, the interpreter's timings mean nothing")
            return 2
        from .bench import Bench

        bench = Bench(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    info = bench.device_info()
    meta = _metadata(info, args, argv)
    gpu_key = sanitize_gpu_name(str(info["gpu_name"]))
    path = out_dir(args) / config_file_name(str(info["gpu_name"]))
    store = ResultStore(path, meta, fresh=args.fresh, log=log)
    log(describe_plan(plan, store.done(args.retry_skipped)).split("\n\n")[-1])
    log(f"[autotune] GPU {info['gpu_name']} ({info.get('compute_capability', '?')}), writing {path}")
    summary = run_plan(
        plan,
        bench,
        store,
        min_gain=args.min_gain,
        time_limit_s=args.time_limit,
        retry_skipped=args.retry_skipped,
        use_tqdm=not args.no_tqdm,
        log=log,
    )
    clear_cache()  # this process may look configs up next (e.g. benchmarks): re-read the new file
    keys = [s.key(k).to_str() for s, k in plan.entries()]
    log("")
    log(console_report(store.entries, keys))
    md = markdown_report(
        store.metadata, store.entries, keys, {k: v for k, v in store.skipped.items() if k in set(keys)}
    )
    md_path = path.with_suffix(".md")
    md_path.write_text(md)
    written = [str(path), str(md_path)]
    if args.bench_report is not None:
        bench_path = Path(args.bench_report or os.path.join("benchmarks", "results", gpu_key, "autotune.md"))
        bench_path.parent.mkdir(parents=True, exist_ok=True)
        bench_path.write_text(md)
        written.append(str(bench_path))
    state = "complete" if summary.complete else "incomplete (re-run the same command to continue)"
    log(
        f"\n[autotune] {len(summary.tuned)} entries tuned now, {summary.already_done} earlier, "
        f"{len(summary.skipped)} skipped; plan {state}. Wrote {', '.join(written)}"
    )
    if summary.error:
        return 3
    return 0 if summary.complete or summary.stopped_early else 1


def _current_gpu() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.candidates is not None and args.candidates < 1:
        raise SystemExit("--candidates must be >= 1")
    if args.gpu_name and not args.dry_run:
        raise SystemExit("--gpu-name only names the file of a --dry-run; a real run uses the GPU's own name")
    if args.dry_run:
        plan = make_plan(args)
        name = args.gpu_name or _current_gpu()
        target = out_dir(args) / (config_file_name(name) if name else "<gpu>.json")
        done = None
        if name and target.is_file():
            try:
                table = read_config_file(target)
                done = set(table.raw_entries) | set(table.skipped)
            except ConfigFileError as e:
                print(f"note: {target} {e}; a run would move it aside and start afresh")
        print(describe_plan(plan, done))
        print(f"output: {target} (GPU {name or '<this GPU>'}); nothing was run")
        return 0
    return run(args, argv)
