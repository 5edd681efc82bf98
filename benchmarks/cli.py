"""``python -m benchmarks``: measure the suites on a CUDA GPU, or smoke-test the harness on CPU.

Every measured row is appended to ``<out>/rows.jsonl`` as soon as it exists (a run cut short keeps
what it measured); the tables, plots and summary are rebuilt from those rows at the end, or at any
time with ``--report-from``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from qna_triton.env import utc_now

from . import SMOKE_LABEL
from .deploy import DEFAULT_ENGINES, DEPLOY_ENGINES, DEPLOY_MODELS, run_deploy
from .env import Env, detect_env, sanitise
from .layers import LAYER_PROVIDERS, build_layer
from .model_bench import MODEL_PROVIDERS, model_shape, run_model
from .providers import CORE_PROVIDERS, CoreShape, Options, build_core, dtype_name
from .report import COLUMNS, read_rows, write_reports
from .runner import Deadline, run_workload
from .suites import CPU_SUITES, SUITES, layer_shapes, resolve_suites, vit_tiny_shapes, window_shapes
from .timing import TimingConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        help=f"suite to run (repeatable; default all): {', '.join(SUITES)}; groups: window, layer",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help=f"only these providers (core: {', '.join(CORE_PROVIDERS)}; layer: {', '.join(LAYER_PROVIDERS)}; "
        f"model: {', '.join(MODEL_PROVIDERS)})",
    )
    p.add_argument("--windows", type=int, nargs="+", default=None, help="window sizes of the sweeps")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"CPU run of the whole harness on tiny shapes ({SMOKE_LABEL}); needs --out or a temp dir",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results/<gpu>; smoke: a new temporary folder)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; once spent, remaining measurements are recorded as skipped",
    )
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (compiled providers: unsupported)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of paper_compiled")
    p.add_argument("--model-compile-mode", default="default", help="torch.compile mode of the model-level runs")
    p.add_argument(
        "--engines",
        nargs="+",
        default=None,
        help=f"deploy suite: engines (default {' '.join(DEFAULT_ENGINES)}; known: {' '.join(DEPLOY_ENGINES)})",
    )
    p.add_argument("--batches", type=int, nargs="+", default=None, help="deploy suite: batch sizes (default 1 8)")
    p.add_argument("--rounds", type=int, default=5, help="deploy suite: round-robin rounds")
    p.add_argument("--min-time", type=float, default=2.0, help="deploy suite: seconds per measurement")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument(
        "--report-from",
        nargs="+",
        default=None,
        metavar="ROWS",
        help="measure nothing: rebuild the reports from rows.jsonl files (or their folders)",
    )
    return p.parse_args(argv)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _configure_torch() -> None:
    import torch._dynamo

    # Every shape compiles anew: a low limit would silently fall back to eager for later shapes.
    for name, value in (
        ("recompile_limit", 4096),
        ("cache_size_limit", 4096),
        ("accumulated_recompile_limit", 1 << 16),
        ("accumulated_cache_size_limit", 1 << 16),
    ):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


class Recorder:
    """Turns results into rows, appends them to ``rows.jsonl`` and prints one line per row."""

    def __init__(self, env: Env, out_dir: str) -> None:
        self.env, self.out_dir = env, out_dir
        self.path = os.path.join(out_dir, "rows.jsonl")
        self.count = 0
        self.start = time.monotonic()

    def emit(
        self,
        suite: str,
        shape: str,
        dtype: str,
        provider: str,
        pas: str,
        result: dict,
        notes: Sequence[str],
        fields: Optional[dict] = None,
    ) -> dict:
        e = self.env
        row: Dict[str, object] = {c: None for c in COLUMNS}
        row.update(
            mode=SMOKE_LABEL if e.smoke else "measurement",
            gpu=e.gpu,
            torch=e.torch,
            triton=e.triton,
            cuda=e.cuda,
            date=utc_now(),
            suite=suite,
            shape=shape,
            dtype=dtype,
            provider=provider,
            **{"pass": pas},
        )
        row["device_mem_mb"] = e.total_memory_bytes / 2**20 if e.total_memory_bytes else None
        row.update(fields or {})
        for key in ("status", "p50_ms", "p20_ms", "p80_ms", "peak_mb", "extra_mb", "images_s", "gb_s", "tflop_s"):
            if key in result:
                row[key] = result[key]
        row["note"] = "; ".join([n for n in notes if n] + ([result["mem_note"]] if result.get("mem_note") else []))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.count += 1
        p50 = f"{row['p50_ms']:.4g} ms" if row.get("p50_ms") else ""
        mem = f"{row['extra_mb']:.4g} MB extra" if row.get("extra_mb") is not None else ""
        print(
            f"[{time.monotonic() - self.start:5.0f}s {suite}] {shape} {dtype} {provider} {pas}: {row['status']} "
            f"{p50} {mem}",
            flush=True,
        )
        return row


def _run_env(rec: Recorder, device: torch.device, cfg: TimingConfig) -> None:
    """The device's ceilings: a 1 GiB copy and the float32 FMA rate."""
    if device.type != "cuda":
        for prov in ("copy", "fp32_fma"):
            rec.emit("env", "ceiling", "-", prov, "fwd", {"status": "skipped: needs a CUDA GPU"}, [])
        return
    from .hw import measure_copy_bandwidth, measure_fp32_rate
    from .runner import failure_status

    try:
        bw, ms = measure_copy_bandwidth(device, cfg)
        rec.emit(
            "env",
            "1 GiB",
            "uint8",
            "copy",
            "fwd",
            {"status": "ok", "p50_ms": ms, "gb_s": bw / 1e9},
            ["device-to-device copy, read + write counted"],
            {"bytes_floor": 2 << 30},
        )
    except Exception as e:
        rec.emit("env", "1 GiB", "uint8", "copy", "fwd", {"status": failure_status(e)}, [])
    try:
        rate, ms = measure_fp32_rate(device, cfg)
        rec.emit(
            "env",
            "FMA chains",
            "fp32",
            "fp32_fma",
            "fwd",
            {"status": "ok", "p50_ms": ms, "tflop_s": rate / 1e12},
            ["Triton kernel, 8 independent FMA chains per element"],
        )
    except Exception as e:
        rec.emit("env", "FMA chains", "fp32", "fp32_fma", "fwd", {"status": failure_status(e)}, [])


def _after_workload() -> None:
    # Drops compiled graphs (and CUDA-graph pools) of the shape just measured.
    torch._dynamo.reset()


def _run_shapes(
    rec: Recorder,
    suite: str,
    shapes: List[CoreShape],
    providers: Sequence[str],
    builder: Callable,
    opts: Options,
    cfg: TimingConfig,
    deadline: Deadline,
    env: Env,
    extra_note: str = "",
) -> None:
    for s in shapes:
        for name in providers:
            results, notes = run_workload(builder(name, s, opts), opts.device, cfg, deadline, env.l2_bytes)
            for pas, res in results.items():
                rec.emit(
                    suite,
                    s.label(),
                    dtype_name(s.dtype),
                    name,
                    pas,
                    res,
                    ([extra_note] if extra_note else []) + notes,
                    s.fields(),
                )
            _after_workload()


def measure(args: argparse.Namespace) -> int:
    smoke = args.smoke
    suites = resolve_suites(args.suite)
    cpu_only = all(s in CPU_SUITES for s in suites)  # the deploy suite measures the CPU itself
    if not smoke and not cpu_only and not torch.cuda.is_available():
        print("no CUDA GPU here: measurements need one. Use --smoke for a CPU run of the harness.", file=sys.stderr)
        return 2
    device = torch.device("cpu") if (smoke or cpu_only) else torch.device("cuda")
    env = detect_env(device, smoke)
    if smoke:
        out = args.out or tempfile.mkdtemp(prefix="qna_bench_smoke_")
        if _inside(out, RESULTS):
            print(f"smoke output never goes into {RESULTS}: pass another --out", file=sys.stderr)
            return 2
    else:
        out = args.out or os.path.join(RESULTS, sanitise(env.gpu))
    os.makedirs(out, exist_ok=True)
    _configure_torch()
    cfg = TimingConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_warmup=1, cpu_reps=2)
    opts = Options(device, compile=not args.no_compile, compile_mode=args.compile_mode)
    deadline = Deadline(args.time_budget)
    rec = Recorder(env, out)
    print(
        f"{SMOKE_LABEL.upper()}: " if smoke else "",
        f"device {env.gpu}, torch {env.torch}, triton {env.triton}; suites {', '.join(suites)}; writing {out}",
        sep="",
        flush=True,
    )
    _run_env(rec, device, cfg)

    def chosen(names: Sequence[str]) -> List[str]:
        return [n for n in names if args.providers is None or n in args.providers]

    windows = tuple(args.windows or ())
    for suite in suites:
        kind = SUITES[suite].kind
        if kind == "core":
            if suite == "vit_tiny":
                shapes, source = vit_tiny_shapes(smoke)
                note = f"shapes from {source}"
            else:
                shapes, note = window_shapes(suite, smoke, windows), ""
            _run_shapes(rec, suite, shapes, chosen(CORE_PROVIDERS), build_core, opts, cfg, deadline, env, note)
        elif kind == "layer":
            _run_shapes(
                rec,
                suite,
                layer_shapes(suite, smoke, windows),
                chosen(LAYER_PROVIDERS),
                build_layer,
                opts,
                cfg,
                deadline,
                env,
            )
        elif kind == "model":
            B, img = model_shape(smoke)
            mcfg = replace(cfg, rep_ms=max(cfg.rep_ms, 1500.0), warmup_ms=max(cfg.warmup_ms, 200.0))
            for name in chosen(MODEL_PROVIDERS):
                res, notes = run_model(
                    name,
                    device,
                    mcfg,
                    deadline,
                    smoke,
                    compile=not args.no_compile,
                    compile_mode=args.model_compile_mode,
                )
                shape = ("qna_vit_tiny" if name != "swin_tiny" else "swin_tiny") + f" B{B} {img}x{img}"
                rec.emit(suite, shape, "bf16-autocast", name, "train_step", res, notes, {"batch": B})
        elif kind == "deploy":
            run_deploy(
                rec.emit,
                smoke,
                deadline,
                engines=args.engines or DEFAULT_ENGINES,
                models=chosen(DEPLOY_MODELS),
                batches=args.batches or (),
                rounds=args.rounds,
                min_time=args.min_time,
                host_iters=200 if smoke else 2000,
            )
    rows = read_rows([rec.path])
    summary, _ = write_reports(rows, out)
    print("\n" + summary)
    print(f"wrote {rec.count} rows to {rec.path}; reports in {out}")
    if smoke:
        print(f"{SMOKE_LABEL.upper()}")
    return 0


def report_only(args: argparse.Namespace) -> int:
    rows = read_rows(args.report_from)
    if not rows:
        print("no rows found", file=sys.stderr)
        return 2
    smoke = any(r.get("mode") == SMOKE_LABEL for r in rows)
    out = args.out or os.path.join(RESULTS, sanitise(rows[0]["gpu"]))
    if smoke and _inside(out, RESULTS):
        print(f"smoke rows never go into {RESULTS}: pass another --out", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rows.jsonl"), "w") as f:  # the merged rows, the source of the reports
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary, _ = write_reports(rows, out)
    print(summary)
    print(f"{len(rows)} rows; reports in {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        return report_only(args)
    if not args.smoke:
        return measure(args)
    # Tiny shapes gain nothing from threads, and threads spinning on a busy CI machine's few cores
    # can make each op tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)
