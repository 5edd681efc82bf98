"""The end-of-run report: heuristic vs tuned time and speedup per entry, and geometric means."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from qna_triton.tuning import EntryKey, validate_config

from .tuner import config_label

HEADERS = (
    "kernel",
    "dtype",
    "window",
    "stride",
    "heads",
    "head_dim",
    "queries",
    "bucket",
    "heuristic",
    "tuned",
    "heuristic ms",
    "tuned ms",
    "speedup",
)


def _bucket_label(b: int) -> str:
    return f"4^{round(math.log(b, 4))}" if b > 1 else "1"


def report_rows(entries: Mapping[str, Mapping[str, Any]], keys: Optional[Iterable[str]] = None) -> List[List[Any]]:
    """One row per entry that has timings (``keys`` restricts and orders them)."""
    rows = []
    for text in keys if keys is not None else sorted(entries):
        value = entries.get(text)
        if not value or "heuristic_time_ms" not in value or "time_ms" not in value:
            continue
        k = EntryKey.from_str(text)
        heur = validate_config(value["heuristic"]) if "heuristic" in value else None
        tuned = validate_config(value["config"])
        h_ms, t_ms = float(value["heuristic_time_ms"]), float(value["time_ms"])
        rows.append(
            [
                k.kernel,
                k.dtype,
                f"{k.kh}x{k.kw}",
                f"{k.sh}x{k.sw}",
                k.heads,
                k.head_dim,
                k.n_queries,
                _bucket_label(k.bucket),
                config_label(heur) if heur else "?",
                config_label(tuned),
                f"{h_ms:.4f}",
                f"{t_ms:.4f}",
                f"{h_ms / t_ms:.2f}x" if t_ms > 0 else "-",
            ]
        )
    return rows


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def speedups(rows: Sequence[Sequence[Any]]) -> Dict[str, float]:
    """Geometric-mean speedup over all rows and per kernel."""
    by: Dict[str, List[float]] = {}
    for r in rows:
        if r[-1] == "-":
            continue
        s = float(r[-1].rstrip("x"))
        by.setdefault("all", []).append(s)
        by.setdefault(r[0], []).append(s)
    return {k: geomean(v) for k, v in by.items()}


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if markdown:
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    else:
        lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False, use_tabulate: bool = True
) -> str:
    """tabulate's table when installed (``github`` format for markdown), plain text otherwise."""
    if use_tabulate:
        try:
            from tabulate import tabulate

            return tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True)
        except ImportError:
            pass
    return _plain_table(headers, rows, markdown)


def summary_lines(rows: Sequence[Sequence[Any]]) -> List[str]:
    g = speedups(rows)
    if not g:
        return ["no timed entries"]
    lines = [f"geometric-mean speedup over the heuristic configs: {g['all']:.3f}x ({len(rows)} entries)"]
    lines += [f"  {k}: {v:.3f}x" for k, v in g.items() if k != "all"]
    return lines


def console_report(
    entries: Mapping[str, Mapping[str, Any]], keys: Optional[Iterable[str]] = None, use_tabulate: bool = True
) -> str:
    rows = report_rows(entries, keys)
    return format_table(HEADERS, rows, use_tabulate=use_tabulate) + "\n\n" + "\n".join(summary_lines(rows))


def markdown_report(
    metadata: Mapping[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    keys: Optional[Iterable[str]] = None,
    skipped: Optional[Mapping[str, Any]] = None,
    use_tabulate: bool = True,
) -> str:
    rows = report_rows(entries, keys)
    meta = ", ".join(
        f"{k} {metadata[k]}"
        for k in ("gpu_name", "compute_capability", "torch_version", "triton_version", "cuda_version", "updated")
        if metadata.get(k) is not None
    )
    parts = [
        f"# QnA kernel autotuning: {metadata.get('gpu_name', 'unknown GPU')}",
        "",
        meta + ".",
        "",
        f"Command: `{metadata.get('command', 'python -m qna_triton.autotune')}`. Times are medians of "
        f"`triton.testing.do_bench` (warm-up {metadata.get('timing', {}).get('warmup_ms', '?')} ms, "
        f"repetitions {metadata.get('timing', {}).get('rep_ms', '?')} ms, L2 flushed before every call) "
        "on random data, one kernel per timing; config = block_p x block_h (or banded block_r x block_w) / warps / stages; "
        "bucket = output pixels B*H_out*W_out, rounded down to a power of 4.",
        "",
        *summary_lines(rows),
        "",
        format_table(HEADERS, rows, markdown=True, use_tabulate=use_tabulate),
    ]
    if skipped:
        parts += ["", "Skipped entries:", ""]
        parts += [f"- `{k}`: {v.get('reason', v) if isinstance(v, dict) else v}" for k, v in sorted(skipped.items())]
    return "\n".join(parts) + "\n"
