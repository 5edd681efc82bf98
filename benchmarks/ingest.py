"""``python -m benchmarks.ingest DIR``: turn what a GPU report brought back into committed results.

``DIR`` is the ``OUT`` of ``scripts/gpu_report.sh`` (``summary.md``, ``report.json``,
``bench_rows.jsonl``, ``autotune/<gpu>.json``, logs). Into the repository (``--repo``, default this
checkout) it writes:

* ``benchmarks/results/<gpu>/``: the harness's reports rebuilt from the rows (``rows.jsonl``, merged with
  the rows already there, later ones winning; ``results.csv/json/md``, ``summary.md``, ``plots/``), the
  report's ``gpu_report.md`` and ``gpu_report.json``, and the autotuner's ``autotune.md``;
* ``qna_triton/configs/<gpu>.json``: the tuned entries, merged into the shipped file (new ones win);
* the README's results table, between ``<!-- gpu-results:start -->`` and ``<!-- gpu-results:end -->``,
  rebuilt from every ``benchmarks/results/*/gpu_report.json``: GPU, date, versions, key ratios.

A rehearsal's output (CPU, not a measurement) is refused for this checkout; pass ``--repo`` to try the
ingest on a scratch copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional, Sequence

from .gpu_report.settings import AUTOTUNE_DIR, HEADLINE, ROWS, STAGES, STATE, SUMMARY
from .gpu_report.summary import _n, counts_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
NO_RESULTS = (
    "No GPU results yet: no session so far has had a GPU. `bash scripts/gpu_report.sh` on one, then "
    "`bash scripts/gpu_report.sh --ingest <its OUT>`, fills this table in."
)


def _device_key(state: dict) -> str:
    from .env import sanitise

    return state.get("device_key") or sanitise(state.get("gpu") or "unknown GPU")


def ingest(src: str, repo: str = REPO) -> List[str]:
    """Writes the results of the report in ``src`` into ``repo``; returns the paths written."""
    state_path = os.path.join(src, STATE)
    if not os.path.isfile(state_path):
        raise SystemExit(f"{src}: no {STATE} (is it the OUT of scripts/gpu_report.sh?)")
    with open(state_path) as f:
        state = json.load(f)
    if state.get("mode") == "rehearsal" and os.path.realpath(repo) == os.path.realpath(REPO):
        raise SystemExit(
            f"{src} holds a CPU rehearsal (not a measurement): it never goes into this checkout; "
            "pass --repo DIR to try the ingest on a copy"
        )
    readme = os.path.join(repo, "README.md")
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} lacks the markers {START} ... {END}")
    key = _device_key(state)
    results = os.path.join(repo, "benchmarks", "results", key)
    os.makedirs(results, exist_ok=True)
    written = []

    rows = os.path.join(src, ROWS)
    if os.path.isfile(rows) and os.path.getsize(rows):
        from .cli import main as bench_main

        old = os.path.join(results, "rows.jsonl")
        merged = os.path.join(results, "rows.previous.jsonl")
        sources = [rows]
        if os.path.isfile(old):
            shutil.move(old, merged)
            sources = [merged, rows]
        try:
            if bench_main(["--report-from", *sources, "--out", results]) != 0:
                raise SystemExit("python -m benchmarks --report-from failed (see above)")
        finally:
            if os.path.exists(merged):
                os.remove(merged)
        written.append(results + "/ (rows.jsonl, results.*, summary.md, plots/)")

    tune_dir = os.path.join(src, AUTOTUNE_DIR)
    tuned = sorted(f for f in os.listdir(tune_dir) if f.endswith(".json")) if os.path.isdir(tune_dir) else []
    for name in tuned:
        written.append(_merge_config(os.path.join(tune_dir, name), os.path.join(repo, "qna_triton", "configs")))
        md = os.path.join(tune_dir, name[:-5] + ".md")
        if os.path.isfile(md):
            shutil.copyfile(md, os.path.join(results, "autotune.md"))
            written.append(os.path.join(results, "autotune.md"))

    shutil.copyfile(os.path.join(src, SUMMARY), os.path.join(results, "gpu_report.md"))
    with open(os.path.join(results, "gpu_report.json"), "w") as f:
        json.dump(state, f, indent=1)
        f.write("\n")
    written += [os.path.join(results, "gpu_report.md"), os.path.join(results, "gpu_report.json")]

    block = results_block(os.path.join(repo, "benchmarks", "results"))
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{block}\n{END}{tail}")
    written.append(readme)
    return written


def _merge_config(path: str, configs: str) -> str:
    """The tuned file merged into the shipped one of the same GPU (entries of this run win)."""
    from qna_triton.tuning import ConfigFileError, read_config_file, write_config_file

    try:
        new = read_config_file(path)
    except ConfigFileError as e:
        raise SystemExit(f"{path} {e}; not ingested") from None
    if new.invalid:
        raise SystemExit(f"{path}: {len(new.invalid)} invalid entries; not ingested")
    dst = os.path.join(configs, os.path.basename(path))
    entries, skipped = dict(new.raw_entries), dict(new.skipped)
    if os.path.isfile(dst):
        old = read_config_file(dst)
        entries = {**old.raw_entries, **entries}
        skipped = {k: v for k, v in {**old.skipped, **skipped}.items() if k not in entries}
    write_config_file(dst, new.metadata, entries, skipped)
    return dst


def results_block(results_root: str) -> str:
    """The README's results: one paragraph and table per GPU with a ``gpu_report.json``."""
    reports = []
    if os.path.isdir(results_root):
        for key in sorted(os.listdir(results_root)):
            path = os.path.join(results_root, key, "gpu_report.json")
            if os.path.isfile(path):
                with open(path) as f:
                    reports.append((key, json.load(f)))
    if not reports:
        return NO_RESULTS
    parts = [
        f"Measured by `scripts/gpu_report.sh` ({HEADLINE}); time ratios are peer / ours for "
        "forward+backward in the same run (>1: ours is faster). Full tables: `benchmarks/results/<gpu>/`."
    ]
    for key, st in reports:
        env = st.get("environment", {})
        stages = st.get("stages", {})
        label = " (CPU rehearsal: not a measurement)" if st.get("mode") == "rehearsal" else ""
        cap = f" (sm_{env['capability'].replace('.', '')})" if env.get("capability") else ""
        line = [
            f"**{st.get('gpu', key)}**{cap}{label}, {str(env.get('date') or st.get('created', ''))[:10]}: "
            f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"
        ]
        if env.get("copy_gb_s"):
            line.append(f"copy {env['copy_gb_s']:.0f} GB/s, bf16 matmul {_n(env.get('matmul_tflop_s'), '.0f')} TFLOP/s")
        tests = stages.get("tests", {})
        line.append(f"GPU tests {tests.get('status', 'not run')} ({counts_line(tests.get('counts', {}))})")
        suite = stages.get("suite", {})
        if suite.get("counts"):
            line.append(f"suite {suite.get('status')} ({counts_line(suite['counts'])})")
        tune = st.get("autotune") or {}
        if tune.get("geomean"):
            line.append(
                f"autotune --quick: tuned {tune['geomean']:.2f}x the heuristic (geomean, "
                f"{len(tune.get('entries', []))} entries)"
            )
        launch = st.get("launch_overhead") or {}
        if launch.get("fwd_us"):
            line.append(f"launch overhead {launch['fwd_us']:.0f} us per forward call")
        not_ok = [s for s in STAGES if stages.get(s, {}).get("status") != "ok"]
        if not_ok:
            line.append("stages not ok: " + ", ".join(f"{s} ({stages.get(s, {}).get('status')})" for s in not_ok))
        parts += [
            "",
            "; ".join(line) + ".",
            "",
            "| k | ours fwd ms | ours fwd+bwd ms | fwd % of copy | x paper eager | x paper compiled | "
            "x FlexAttention | memory x window-materialising |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in (st.get("bench") or {}).get("table", []):
            parts.append(
                f"| {e['window']} | {_n(e.get('fwd_ms'))} | {_n(e.get('fwd_bwd_ms'))} | "
                f"{_n(e.get('fwd_pct_copy'), '.0f')} | {_n(e.get('x_paper_eager'))} | "
                f"{_n(e.get('x_paper_compiled'))} | {_n(e.get('x_flex_nat'))} | "
                f"{_n(e.get('mem_x_naive_window'))} |"
            )
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="the folder scripts/gpu_report.sh wrote (its OUT), as it came back")
    p.add_argument("--repo", default=REPO, help="repository to write into (default: this checkout)")
    args = p.parse_args(argv)
    for path in ingest(args.src, args.repo):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
