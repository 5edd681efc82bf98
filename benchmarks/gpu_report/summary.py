"""The markdown summary (``summary.md``) rendered from the report's state, and the limits on what comes back."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from .. import SMOKE_LABEL
from .settings import HEADLINE, MAX_DEPTH, STAGES


def _n(v, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def counts_line(counts: Dict[str, int]) -> str:
    order = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) or "no tests ran"


def environment_line(d: dict) -> str:
    if not d:
        return ""
    parts = [d.get("gpu", "?")]
    if d.get("capability"):
        parts.append(f"sm_{d['capability'].replace('.', '')}")
    if d.get("copy_gb_s"):
        parts.append(f"copy {d['copy_gb_s']:.4g} GB/s")
    if d.get("matmul_tflop_s"):
        parts.append(f"bf16 matmul {d['matmul_tflop_s']:.3g} TFLOP/s")
    smi = d.get("nvidia_smi") or {}
    if smi.get("clocks.sm"):
        parts.append(f"SM clock {smi['clocks.sm']} (max {smi.get('clocks.max.sm', '?')})")
    rocm = d.get("rocm_smi")
    if rocm is not None and "nvidia_smi" in d and "error" in smi:
        parts.append(
            f"rocm-smi: {rocm['error']}"
            if "error" in rocm
            else "rocm-smi: " + ", ".join(f"{k} {v}" for k, v in rocm.items() if "clock" in k.lower())
        )
    return ", ".join(parts)


def bench_line(d: dict, launch: Optional[dict]) -> str:
    parts = []
    for e in d.get("table", []):
        if "x_paper_eager" in e:
            parts.append(f"k={e['window']}: {e['x_paper_eager']:.2f}x paper eager")
    if launch and launch.get("fwd_us"):
        parts.append(f"launch {launch['fwd_us']:.0f} us/call fwd")
    return "; ".join(parts) + (f" ({d.get('rows', 0)} rows)" if d else "no rows")


def autotune_line(d: dict) -> str:
    if d.get("dry_run"):
        return f"dry run (no GPU): plan only; {d.get('estimate', '')}"
    if not d.get("file"):
        return "no config file written"
    g = d.get("geomean")
    return (f"{len(d.get('entries', []))} entries, tuned/heuristic geomean {g:.3f}x" if g else "no timed entries") + (
        "" if d.get("complete") else " (incomplete: rerun continues)"
    )


def _cell(text) -> str:
    return " ".join(str(text).replace("|", "/").split())


def summary_markdown(state: dict, out: str) -> str:
    """The report's ``summary.md``: the stage table first, then key ratios, tuning, the suite, what did
    not run, and the command to rerun a stage."""
    rehearsal = state.get("mode") == "rehearsal"
    env = state.get("environment", {})
    lines = [f"# GPU report: {state.get('gpu', 'unknown device')}", ""]
    if rehearsal:
        lines += [
            f"**CPU rehearsal ({SMOKE_LABEL})**: the stages run on a CPU (Triton interpreter, tiny "
            "shapes, small budgets) to check the command itself.",
            "",
        ]
    lines.append(
        f"Started {state.get('created')}, updated {state.get('updated')}; budget {state.get('budget_s'):.0f} s"
        + (f", took {state['seconds']:.0f} s" if state.get("seconds") is not None else "")
        + "."
    )
    if env:
        lines.append(
            f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
            f"{env.get('driver') or 'n/a'}, python {env.get('python')}."
        )
    rerun = "bash scripts/gpu_report.sh" + (" --rehearse" if rehearsal else "")
    previous = "runs/gpu_report"
    lines += ["", "| stage | status | seconds | budget | result | first error |", "|---|---|---|---|---|---|"]
    todo = []
    for s in STAGES:
        info = state["stages"].get(s, {})
        status = info.get("status", "not run")
        if status not in ("ok", "running"):
            todo.append(s)
        err = info.get("error") or info.get("note") or ""
        lines.append(
            f"| {s} | {status} | {_n(info.get('seconds'), '.0f')} | {_n(info.get('budget_s'), '.0f')} | "
            f"{_cell(info.get('result', ''))} | {_cell(err)} |"
        )
    lines.append("")
    if todo:
        lines.append(
            "Rerun what did not finish, merging into this report (a stage rerun alone may use the "
            f"whole budget): `OUT={out} {rerun} {' '.join(f'--stage {s}' for s in todo)}`. On a machine "
            f"whose OUT starts empty, bring these files along (e.g. in {previous}/) and add "
            f"`--previous {previous}`."
        )
    else:
        lines.append("Every stage ran to the end.")

    bench = state.get("bench") or {}
    lines += ["", f"## Key ratios ({HEADLINE})", ""]
    if bench.get("table"):
        lines += [
            "Peer time / our time for forward+backward (>1: ours is faster), memory = peer extra / ours; "
            "fwd GB/s over the forward's bytes floor, % of a copy of those bytes.",
            "",
            "| k | ours fwd ms | ours fwd+bwd ms | ours fwd+bwd extra MB | fwd GB/s | fwd % of copy | "
            "x paper eager | x paper compiled | x FlexAttention | x window-materialising | "
            "memory x window-materialising |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in bench["table"]:
            lines.append(
                f"| {e['window']} | {_n(e.get('fwd_ms'))} | {_n(e.get('fwd_bwd_ms'))} | "
                f"{_n(e.get('fwd_bwd_extra_mb'), '.0f')} | "
                f"{_n(e.get('fwd_gb_s'), '.0f')} | {_n(e.get('fwd_pct_copy'), '.0f')} | "
                f"{_n(e.get('x_paper_eager'))} | {_n(e.get('x_paper_compiled'))} | {_n(e.get('x_flex_nat'))} | "
                f"{_n(e.get('x_naive_window'))} | {_n(e.get('mem_x_naive_window'))} |"
            )
    else:
        lines.append("No benchmark rows.")
    launch = state.get("launch_overhead")
    if launch:
        lines += [
            "",
            f"Launch overhead (eager, {launch.get('shape')}, {launch.get('backend')}): "
            f"{_n(launch.get('fwd_us'), '.1f')} us per forward call, "
            f"{_n(launch.get('fwd_bwd_us'), '.1f')} us per forward+backward.",
        ]

    tune = state.get("autotune")
    if tune:
        lines += ["", "## Autotune (--quick)", "", autotune_line(tune) + "."]
        if tune.get("entries"):
            lines += ["", "| entry | heuristic ms | tuned ms | speedup |", "|---|---|---|---|"]
            lines += [
                f"| {e['key']} | {e['heuristic_ms']:.4g} | {e['tuned_ms']:.4g} | {e['speedup']:.3f}x |"
                for e in tune["entries"]
            ]

    suite = state.get("suite")
    if suite:
        lines += [
            "",
            "## Suite",
            "",
            "| file | status | passed | failed | skipped | errors | seconds | first error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f, r in suite.items():
            lines.append(
                f"| {f} | {r['status']} | {r.get('passed', 0)} | {r.get('failed', 0)} | "
                f"{r.get('skipped', 0)} | {r.get('errors', 0)} | {_n(r.get('seconds'), '.0f')} | "
                f"{_cell(r.get('error', r.get('note', '')))} |"
            )

    missing = [f"stage {s}: {state['stages'][s].get('status')}" for s in todo]
    missing += [
        f"benchmark {r['provider']} {r['pass']} k={r['window']}: {r['status']}" for r in bench.get("rows_not_ok", [])
    ]
    lines += ["", "## Did not run or did not succeed", ""]
    lines += [f"- {_cell(m)}" for m in missing] or ["Nothing."]
    lines += ["", f"Files: {', '.join(state.get('files', []))}.", ""]
    return "\n".join(lines)


def files_under(out: str) -> List[str]:
    found = []
    for root, _, names in os.walk(out):
        for n in names:
            if not n.endswith(".tmp"):
                found.append(os.path.relpath(os.path.join(root, n), out))
    return sorted(found)


def _within_limits(rel_paths: Sequence[str]) -> bool:
    return all(len(p.split(os.sep)) <= MAX_DEPTH for p in rel_paths)
