"""Results: derived columns, CSV / JSON / markdown tables, plots, and the headline summary with targets.

Reports are a pure function of the measured rows (``rows.jsonl``), so the rows of several runs (the
GPU session's parts) can be merged and reported again on any machine. Nothing here measures; a number
that was not measured is left empty, and a target without its measurements is "not measured".
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import SMOKE_LABEL
from .floors import datasheet_fp32_rate

__all__ = ["COLUMNS", "derive", "write_reports", "summary_markdown", "read_rows", "TARGETS"]

COLUMNS = [
    "mode",
    "gpu",
    "torch",
    "triton",
    "cuda",
    "date",
    "suite",
    "shape",
    "dtype",
    "provider",
    "pass",
    "status",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "gb_s",
    "pct_copy",
    "tflop_s",
    "flop_floor_ms",
    "x_flop_floor",
    "floor_ms",
    "x_floor",
    "images_s",
    "peak_mb",
    "extra_mb",
    "batch",
    "height",
    "width",
    "channels",
    "heads",
    "head_dim",
    "queries",
    "window",
    "stride",
    "bytes_floor",
    "flops",
    "device_mem_mb",
    "note",
]

TARGETS = OrderedDict(
    [
        ("eager3", "our fwd+bwd >= 3x faster than paper_eager at every window"),
        ("compiled2", "our fwd+bwd >= 2x faster than paper_compiled at every window"),
        ("copy75", "forward >= 75% of the copy roofline at k=3"),
        ("floor2", "forward within 2x of the floor (max of bytes at copy speed, FLOP at the fp32 rate) at k > 3"),
        ("layer5", "QnA layer >= 5x faster fwd+bwd than the FlexAttention NA layer at window >= 15 (d=16, 32)"),
        ("layermem", "QnA layer uses less fwd+bwd peak memory than the FlexAttention NA layer"),
        ("naive10", "core op uses >= 10x less fwd+bwd peak memory than the window-materialising form at window >= 7"),
        ("model13", "qna_vit_tiny training step >= 1.3x the images/s of the paper's formulation compiled"),
        ("deploy13", "qna_vit_tiny on onnxruntime (CPU) >= 1.3x the images/s of ConvNeXt-T and of Swin-T"),
    ]
)


# ----------------------------------------------------------------------------------- rows
def read_rows(paths: Iterable[str]) -> List[dict]:
    """Rows of ``rows.jsonl`` files (or folders holding one); a later row replaces an earlier one with
    the same (gpu, suite, shape, dtype, provider, pass)."""
    merged: OrderedDict[tuple, dict] = OrderedDict()
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, "rows.jsonl")
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    key = (
                        r.get("gpu"),
                        r.get("suite"),
                        r.get("shape"),
                        r.get("dtype"),
                        r.get("provider"),
                        r.get("pass"),
                    )
                    merged.pop(key, None)
                    merged[key] = r
    return list(merged.values())


def _ok(r: Optional[dict]) -> bool:
    return r is not None and r.get("status") == "ok" and r.get("p50_ms") is not None


def fp32_rate(rows: Sequence[dict]) -> Tuple[Optional[float], str]:
    """The float32 rate for the arithmetic floor: the larger of the datasheet's and the measured one
    (the larger gives the stricter floor), with its source."""
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), "")
    sheet = datasheet_fp32_rate(gpu)
    measured = next(
        (
            r
            for r in rows
            if r.get("suite") == "env" and r.get("provider") == "fp32_fma" and _ok(r) and r.get("tflop_s")
        ),
        None,
    )
    options = []
    if sheet:
        options.append((sheet[0], sheet[1]))
    if measured:
        options.append(
            (
                measured["tflop_s"] * 1e12,
                f"measured on this GPU: FMA-chain Triton kernel, {measured['tflop_s']:.1f} TFLOP/s",
            )
        )
    if not options:
        return None, "unknown (no datasheet entry for this GPU and no measurement)"
    rate, source = max(options, key=lambda o: o[0])
    others = [s for r_, s in options if s != source]
    return rate, source + (f" (also: {others[0]})" if others else "")


def derive(rows: Sequence[dict]) -> Tuple[List[dict], dict]:
    """Fills GB/s, % of copy, TFLOP/s, floors and ratios from the measured times; returns (rows, meta)."""
    rate, source = fp32_rate(rows)
    out = [dict(r) for r in rows]
    copies = {
        (r["suite"], r["shape"], r["dtype"]): r
        for r in out
        if r.get("provider") == "copy" and _ok(r) and r.get("suite") != "env"
    }
    for r in out:
        if not _ok(r):
            continue
        ms = r["p50_ms"]
        if r.get("provider") == "copy" and r.get("bytes_floor"):
            r["gb_s"] = r["bytes_floor"] / (ms * 1e6)
        if r.get("provider") == "qna_triton" and r.get("pass") == "fwd" and r.get("bytes_floor"):
            r["gb_s"] = r["bytes_floor"] / (ms * 1e6)
            r["tflop_s"] = r["flops"] / (ms * 1e9)
            c = copies.get((r["suite"], r["shape"], r["dtype"]))
            floors = []
            if c is not None:
                r["pct_copy"] = 100.0 * c["p50_ms"] / ms
                floors.append(c["p50_ms"])
            if rate:
                r["flop_floor_ms"] = r["flops"] / rate * 1e3
                r["x_flop_floor"] = ms / r["flop_floor_ms"]
                floors.append(r["flop_floor_ms"])
            if floors:
                r["floor_ms"] = max(floors)
                r["x_floor"] = ms / r["floor_ms"]
    copy_env = next((r for r in out if r.get("suite") == "env" and r.get("provider") == "copy" and _ok(r)), None)
    meta = {
        "fp32_rate_flop_s": rate,
        "fp32_rate_source": source,
        "copy_large_gb_s": copy_env.get("gb_s") if copy_env else None,
        "smoke": any(r.get("mode") == SMOKE_LABEL for r in out),
        "gpu": next((r["gpu"] for r in out if r.get("gpu")), None),
        "torch": sorted({r["torch"] for r in out if r.get("torch")}),
        "triton": sorted({r["triton"] for r in out if r.get("triton")}),
        "dates": sorted({r["date"] for r in out if r.get("date")}),
    }
    return out, meta


# ----------------------------------------------------------------------------------- formatting
def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return " ".join(str(v).replace("|", "/").split())  # one markdown cell


def _header(meta: dict) -> str:
    lines = []
    if meta["smoke"]:
        lines.append(
            f"> **{SMOKE_LABEL}.** CPU smoke run of the harness on tiny shapes; no number here is a benchmark result.\n"
        )
    dates = meta["dates"]
    lines.append(
        f"- device: {meta['gpu']}; torch {', '.join(meta['torch'])}; triton {', '.join(meta['triton'])}; "
        f"measured {dates[0] if dates else '?'}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
    )
    lines.append(f"- float32 rate for the arithmetic floor: {meta['fp32_rate_source']}")
    if meta.get("copy_large_gb_s"):
        lines.append(f"- device copy bandwidth (1 GiB, read + write): {meta['copy_large_gb_s']:.0f} GB/s")
    return "\n".join(lines) + "\n"


def _table(rows: List[List[str]], headers: List[str]) -> str:
    """A GitHub markdown table: tabulate's, or a plain one where tabulate is not installed."""
    try:
        from tabulate import tabulate
    except ImportError:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def results_markdown(rows: Sequence[dict], meta: dict) -> str:
    """Every row, one table per suite."""
    parts = ["# QnA benchmark results\n\n", _header(meta)]
    cols = [
        "shape",
        "dtype",
        "provider",
        "pass",
        "status",
        "p50_ms",
        "p20_ms",
        "p80_ms",
        "gb_s",
        "pct_copy",
        "x_floor",
        "images_s",
        "peak_mb",
        "extra_mb",
        "note",
    ]
    suites: OrderedDict[str, List[dict]] = OrderedDict()
    for r in rows:
        suites.setdefault(r["suite"], []).append(r)
    for suite, rs in suites.items():
        parts.append(f"\n## {suite}\n")
        parts.append(_table([[_f(r.get(c)) for c in cols] for r in rs], cols) + "\n")
    return "".join(parts)


# ----------------------------------------------------------------------------------- summary
def _index(rows: Sequence[dict]) -> Dict[tuple, dict]:
    return {(r.get("suite"), r.get("window"), r.get("provider"), r.get("pass")): r for r in rows}


def _verdict(ok: Optional[bool], smoke: bool) -> str:
    if ok is None:
        return "not measured"
    if smoke:
        return "smoke"
    return "PASS" if ok else "MISS"


def _fail(r: Optional[dict]) -> str:
    if r is None:
        return "not run"
    return r.get("status") or "?"


def _ratio(other: Optional[dict], ours: Optional[dict], key: str = "p50_ms") -> Optional[float]:
    if not (_ok(other) and _ok(ours)) or not other.get(key) or not ours.get(key):
        return None
    return other[key] / ours[key]


def _mem_ratio(other: Optional[dict], ours: Optional[dict]) -> Tuple[Optional[float], bool]:
    """``(ratio of fwd+bwd extra memory, is_lower_bound)``. An out-of-memory peer needed more than the
    free memory, at least the device's memory less the inputs (ours' peak less its extra)."""
    if ours is None or ours.get("extra_mb") in (None, 0):
        return None, False
    if other is not None and other.get("extra_mb"):
        return other["extra_mb"] / ours["extra_mb"], False
    if other is not None and other.get("status") == "OOM" and ours.get("device_mem_mb") and ours.get("peak_mb"):
        free = ours["device_mem_mb"] - (ours["peak_mb"] - ours["extra_mb"])
        return free / ours["extra_mb"], True
    return None, False


def _fmt_ratio(v: Optional[float], bound: bool = False, why: str = "") -> str:
    if v is None:
        return why or "n/a"
    return (">" if bound else "") + f"{v:.2f}x"


def summary_markdown(rows: Sequence[dict], meta: dict) -> Tuple[str, Dict[str, List[Optional[bool]]]]:
    """The headline tables with a PASS/MISS per target; returns (markdown, {target: [verdicts]})."""
    smoke = meta["smoke"]
    idx = _index(rows)
    verdicts: Dict[str, List[Optional[bool]]] = {k: [] for k in TARGETS}
    out = ["# QnA benchmarks: headline\n\n", _header(meta)]
    out.append(
        "\nSpeed-ups are the peer's p50 time over ours (> 1: we are faster); memory ratios are the peer's "
        "fwd+bwd peak memory beyond its inputs over ours (> 1: we use less). `>`: the peer ran out of "
        "memory, bound from the free device memory.\n"
    )

    suites = list(OrderedDict.fromkeys(r["suite"] for r in rows))
    for suite in [s for s in suites if s.startswith("window_")]:
        windows = sorted({r["window"] for r in rows if r["suite"] == suite and r.get("window") is not None})
        body = []
        for k in windows:
            ours = idx.get((suite, k, "qna_triton", "fwd+bwd"))
            line = [str(k), _f(ours.get("p50_ms")) if _ok(ours) else _fail(ours)]
            sp = {}
            for peer in ("paper_eager", "paper_compiled", "flex_nat"):
                other = idx.get((suite, k, peer, "fwd+bwd"))
                sp[peer] = _ratio(other, ours)
                line.append(_fmt_ratio(sp[peer], why=_fail(other) if not _ok(other) else ""))
            naive_ratio = None
            for peer in ("paper_eager", "paper_compiled", "flex_nat", "naive_window"):
                other = idx.get((suite, k, peer, "fwd+bwd"))
                ratio, bound = _mem_ratio(other, ours)
                if peer == "naive_window":
                    naive_ratio = ratio
                line.append(
                    _fmt_ratio(
                        ratio, bound, why=_fail(other) if other is None or other.get("status") != "ok" else "n/a"
                    )
                )
            v_e = None if sp["paper_eager"] is None else sp["paper_eager"] >= 3.0
            v_c = None if sp["paper_compiled"] is None else sp["paper_compiled"] >= 2.0
            v_n = None if k < 7 else (None if naive_ratio is None else naive_ratio >= 10.0)
            verdicts["eager3"].append(v_e)
            verdicts["compiled2"].append(v_c)
            if k >= 7:
                verdicts["naive10"].append(v_n)
            line += [_verdict(v_e, smoke), _verdict(v_c, smoke), _verdict(v_n, smoke) if k >= 7 else "-"]
            body.append(line)
        out.append(f"\n## Core op, {suite}: fwd+bwd\n")
        out.append(
            _table(
                body,
                [
                    "k",
                    "ours ms",
                    "x paper_eager",
                    "x paper_compiled",
                    "x flex_nat",
                    "mem paper_eager",
                    "mem paper_compiled",
                    "mem flex_nat",
                    "mem naive_window",
                    ">=3x eager",
                    ">=2x compiled",
                    ">=10x mem naive (k>=7)",
                ],
            )
            + "\n"
        )

        body = []
        for k in windows:
            ours = idx.get((suite, k, "qna_triton", "fwd"))
            copy = idx.get((suite, k, "copy", "fwd"))
            if not _ok(ours):
                body.append([str(k), _fail(ours), "", "", "", "", "", "", "not measured"])
                if k == 3:
                    verdicts["copy75"].append(None)
                else:
                    verdicts["floor2"].append(None)
                continue
            if k == 3:
                v = None if ours.get("pct_copy") is None else ours["pct_copy"] >= 75.0
                verdicts["copy75"].append(v)
                target = ">=75% copy: " + _verdict(v, smoke)
            else:
                v = None if ours.get("x_floor") is None else ours["x_floor"] <= 2.0
                verdicts["floor2"].append(v)
                target = "<=2x floor: " + _verdict(v, smoke)
            body.append(
                [
                    str(k),
                    _f(ours["p50_ms"]),
                    _f(ours.get("gb_s")),
                    _f(copy.get("gb_s")) if _ok(copy) else _fail(copy),
                    _f(ours.get("pct_copy")),
                    _f(ours.get("flop_floor_ms")),
                    _f(ours.get("floor_ms")),
                    _f(ours.get("x_floor")),
                    target,
                ]
            )
        out.append(f"\n## Core op, {suite}: forward against the floors\n")
        out.append(
            _table(
                body,
                [
                    "k",
                    "ours fwd ms",
                    "ours GB/s",
                    "copy GB/s",
                    "% of copy",
                    "FLOP floor ms",
                    "floor ms",
                    "x floor",
                    "target",
                ],
            )
            + "\n"
        )

    layer_suites = [s for s in suites if s.startswith("layer_")]
    if layer_suites:
        body = []
        for suite in layer_suites:
            for k in sorted({r["window"] for r in rows if r["suite"] == suite and r.get("window") is not None}):
                ours = idx.get((suite, k, "qna_layer", "fwd+bwd"))
                flex = idx.get((suite, k, "flex_na_layer", "fwd+bwd"))
                sp = _ratio(flex, ours)
                mem, bound = _mem_ratio(flex, ours)
                v_s = (None if sp is None else sp >= 5.0) if k >= 15 else None
                v_m = None if mem is None else mem > 1.0
                if k >= 15:
                    verdicts["layer5"].append(v_s)
                verdicts["layermem"].append(v_m)
                hd = next((r.get("head_dim") for r in rows if r["suite"] == suite), "")
                body.append(
                    [
                        str(hd),
                        str(k),
                        _f(ours.get("p50_ms")) if _ok(ours) else _fail(ours),
                        _f(flex.get("p50_ms")) if _ok(flex) else _fail(flex),
                        _fmt_ratio(sp),
                        _f(ours.get("extra_mb")) if ours else "",
                        _f(flex.get("extra_mb")) if flex else "",
                        _fmt_ratio(mem, bound),
                        _verdict(v_s, smoke) if k >= 15 else "-",
                        _verdict(v_m, smoke),
                    ]
                )
        out.append("\n## Layer: QnA vs neighbourhood attention (FlexAttention), fwd+bwd\n")
        out.append(
            _table(
                body,
                [
                    "d",
                    "k",
                    "QnA ms",
                    "NA ms",
                    "speed-up",
                    "QnA MB",
                    "NA MB",
                    "mem ratio",
                    ">=5x (k>=15)",
                    "less memory",
                ],
            )
            + "\n"
        )

    model_rows = [r for r in rows if r["suite"] == "model"]
    if model_rows:
        ref = next((r for r in model_rows if r["provider"] == "paper_compiled"), None)
        ours = next((r for r in model_rows if r["provider"] == "qna_triton"), None)
        body = []
        for r in model_rows:
            sp = (
                (r["images_s"] / ref["images_s"])
                if (_ok(r) and _ok(ref) and r.get("images_s") and ref.get("images_s"))
                else None
            )
            body.append(
                [
                    r["provider"],
                    r["shape"],
                    _f(r.get("images_s")) if _ok(r) else _fail(r),
                    _f(r.get("p50_ms")),
                    _f(r.get("peak_mb")),
                    _fmt_ratio(sp),
                ]
            )
        v = None
        if _ok(ours) and _ok(ref):
            v = ours["images_s"] / ref["images_s"] >= 1.3
        verdicts["model13"].append(v)
        out.append("\n## Model: training step\n")
        out.append(_table(body, ["provider", "shape", "images/s", "p50 ms", "peak MB", "vs paper_compiled"]) + "\n")
        out.append(f"\n>= 1.3x the paper's formulation compiled: {_verdict(v, smoke)}\n")

    deploy = deploy_table(rows)
    if deploy:
        body, vs = deploy
        verdicts["deploy13"].extend(vs)
        out.append("\n## Deploy: CPU inference, float32 (ratios measured side by side in one run)\n")
        out.append(
            _table(body, ["engine", "batch", "model", "images/s", "p50 ms", "vs Swin-T", "vs ConvNeXt-T", "note"])
            + "\n"
        )
        v = [x for x in vs if x is not None]
        out.append("\n>= 1.3x ConvNeXt-T and Swin-T on onnxruntime: " + _verdict(all(v) if v else None, smoke) + "\n")
        host = [r for r in rows if r["suite"] == "deploy" and r.get("provider") == "host_overhead"]
        if host:
            out.append("\nHost overhead per call (Triton launch stubbed out): ")
            out.append(
                "; ".join(
                    f"{r['shape']} {_f(r['p50_ms'] * 1e3)} us" if _ok(r) else f"{r['shape']} {_fail(r)}" for r in host
                )
                + "\n"
            )

    out.append("\n## Targets\n")
    body = []
    for key, text in TARGETS.items():
        vs = verdicts[key]
        measured = [v for v in vs if v is not None]
        if not measured:
            state = "not measured"
        elif smoke:
            state = "smoke"
        else:
            state = "PASS" if all(measured) else "MISS"
        body.append(
            [
                text,
                state,
                f"{sum(1 for v in measured if v)}/{len(measured)} pass, {len(vs) - len(measured)} not measured",
            ]
        )
    out.append(_table(body, ["target", "verdict", "cases"]) + "\n")
    return "".join(out), verdicts


def _deploy_model(r: dict) -> str:
    return str(r["shape"]).split()[0]


def deploy_table(rows: Sequence[dict]) -> Optional[Tuple[List[List[str]], List[Optional[bool]]]]:
    """The deploy suite's rows as (table body, ``deploy13`` verdicts): images/s of every (engine, batch,
    model) and its ratio to Swin-T's and ConvNeXt-T's in the same engine at the same batch."""
    rs = [r for r in rows if r["suite"] == "deploy" and r.get("provider") != "host_overhead"]
    if not rs:
        return None
    by = {(r["provider"], r.get("batch"), _deploy_model(r)): r for r in rs}
    body, verdicts = [], []
    for r in rs:
        key = (r["provider"], r.get("batch"))
        ratios = []
        for peer in ("swin_tiny", "convnext_tiny"):
            p = by.get(key + (peer,))
            ok = _ok(r) and _ok(p) and r.get("images_s") and p.get("images_s")
            ratios.append(r["images_s"] / p["images_s"] if ok else None)
        if _deploy_model(r) == "qna_vit_tiny" and r["provider"] == "onnxruntime":
            verdicts.append(None if None in ratios else all(x >= 1.3 for x in ratios))
        note = next((n for n in str(r.get("note") or "").split("; ") if "nodes" in n), "")
        body.append(
            [
                r["provider"],
                _f(r.get("batch")),
                _deploy_model(r),
                _f(r.get("images_s")) if _ok(r) else _fail(r),
                _f(r.get("p50_ms")),
                _fmt_ratio(ratios[0]),
                _fmt_ratio(ratios[1]),
                note,
            ]
        )
    return body, verdicts


def _plot_deploy(rows: Sequence[dict], meta: dict, path: str) -> None:
    """Images/s per engine and batch, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["suite"] == "deploy" and r.get("provider") != "host_overhead" and _ok(r)]
    groups = list(OrderedDict.fromkeys((r["provider"], r.get("batch")) for r in rs))
    models = list(OrderedDict.fromkeys(_deploy_model(r) for r in rs))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        xs, ys = [], []
        for g, key in enumerate(groups):
            r = next((r for r in rs if (r["provider"], r.get("batch")) == key and _deploy_model(r) == m), None)
            if r is not None and r.get("images_s"):
                xs.append(g + (i - (len(models) - 1) / 2) * width)
                ys.append(r["images_s"])
        ax.bar(xs, ys, width, label=m, color=f"C{i % 10}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{e}\nbatch {b}" for e, b in groups])
    ax.set_ylabel("images/s (float32, CPU)")
    if not rs:
        ax.text(0.5, 0.5, "no measurement", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    label = f"deploy on {meta['gpu']}"
    if meta["smoke"]:
        label = f"{SMOKE_LABEL.upper()}: {label}"
    ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- plots
def _plot_suite(rows: Sequence[dict], suite: str, meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["suite"] == suite and r.get("window") is not None]
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rs))
    colours = {p: f"C{i % 10}" for i, p in enumerate(providers)}  # one colour per provider in every panel
    windows = sorted({r["window"] for r in rs})
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        ("fwd", "p50_ms", "forward time (ms)"),
        ("bwd", "p50_ms", "backward time (ms)"),
        ("fwd+bwd", "p50_ms", "forward+backward time (ms)"),
        ("fwd+bwd", "extra_mb", "fwd+bwd peak memory beyond inputs (MB)"),
    ]
    for ax, (pas, key, title) in zip(axes.flat, panels):
        drawn = False
        for p in providers:
            pts = sorted(
                (r["window"], r[key])
                for r in rs
                if r["provider"] == p and r.get("pass") == pas and r.get(key) and (key != "p50_ms" or _ok(r))
            )
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=colours[p])
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("window k")
        ax.set_xscale("log")
        ax.set_xticks(windows)
        ax.set_xticklabels([str(w) for w in windows])
        ax.minorticks_off()
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no measurement", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    label = f"{suite} on {meta['gpu']}"
    if meta["smoke"]:
        label = f"{SMOKE_LABEL.upper()}: {label}"
    fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- files
def write_reports(rows: Sequence[dict], out_dir: str) -> Tuple[str, dict]:
    """Writes results.csv/json/md, summary.md and plots/*.png; returns (summary markdown, meta)."""
    os.makedirs(out_dir, exist_ok=True)
    derived, meta = derive(rows)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in derived:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(
            {"meta": meta, "columns": COLUMNS, "rows": [{c: r.get(c) for c in COLUMNS} for r in derived]}, f, indent=1
        )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(derived, meta))
    summary, _ = summary_markdown(derived, meta)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plots (pip install -e '.[benchmarks]')")
        return summary, meta
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    for suite in OrderedDict.fromkeys(r["suite"] for r in derived):
        if suite.startswith(("window_", "layer_")):
            _plot_suite(derived, suite, meta, os.path.join(plots, f"{suite}.png"))
        elif suite == "deploy":
            _plot_deploy(derived, meta, os.path.join(plots, "deploy.png"))
    return summary, meta
