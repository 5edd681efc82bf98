"""The command line: ``python -m benchmarks.gpu_report`` (``scripts/gpu_report.sh``)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from typing import Dict, Optional, Sequence

from .children import CHILDREN
from .procs import RUNNING
from .pytest_log import _read
from .settings import (
    BUDGET_ENV,
    BUDGETS,
    GPU_TEST_FILE,
    REHEARSAL_BUDGETS,
    REHEARSAL_SUITE,
    REHEARSAL_TOTAL_BUDGET,
    REPO,
    RESERVE_S,
    STAGES,
    STATE,
    SUMMARY,
    TOTAL_BUDGET,
)
from .stages import Report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bash scripts/gpu_report.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rehearse", action="store_true", help="run every stage on a CPU (interpreter, tiny shapes)")
    p.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        default=[],
        help="run only this stage (repeatable), merging into the report already in OUT",
    )
    p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/gpu_report)")
    p.add_argument(
        "--previous",
        default=None,
        metavar="DIR",
        help="with --stage: first copy an earlier report's files from DIR into OUT (a machine whose "
        "OUT starts empty: bring DIR along in the working tree)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default ${BUDGET_ENV}, else {TOTAL_BUDGET:.0f}; "
        f"rehearsal {REHEARSAL_TOTAL_BUDGET:.0f})",
    )
    p.add_argument(
        "--stage-budget",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="another budget for one stage (repeatable)",
    )
    p.add_argument("--test-file", default=GPU_TEST_FILE, help="the tests stage's file (default %(default)s)")
    p.add_argument(
        "--suite-files",
        nargs="+",
        default=None,
        help="the suite stage's test files (default: every tests/test_*.py but the GPU ones; "
        f"rehearsal: {' '.join(REHEARSAL_SUITE)})",
    )
    p.add_argument("--jobs", type=int, default=0, help="parallel test processes (default from the CPU count)")
    p.add_argument("--child", nargs=2, metavar=("WHAT", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _stage_budgets(args: argparse.Namespace) -> Dict[str, Optional[float]]:
    budgets = dict(REHEARSAL_BUDGETS if args.rehearse else BUDGETS)
    for item in args.stage_budget:
        name, _, value = item.partition("=")
        if name not in STAGES:
            raise SystemExit(f"--stage-budget: unknown stage {name!r}; stages: {', '.join(STAGES)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"--stage-budget {item!r}: SECONDS must be a number") from None
    return budgets


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        what, out_json = args.child
        return CHILDREN[what](out_json, args.rehearse)
    budget = args.budget
    if budget is None:
        text = os.environ.get(BUDGET_ENV, "").strip()
        try:
            budget = float(text) if text else (REHEARSAL_TOTAL_BUDGET if args.rehearse else TOTAL_BUDGET)
        except ValueError:
            raise SystemExit(f"{BUDGET_ENV} must be a number of seconds, got {text!r}") from None
    if budget <= RESERVE_S:
        raise SystemExit(f"the budget must exceed {RESERVE_S:.0f} s, got {budget:g}")
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_report"))
    report = Report(
        out,
        args.rehearse,
        sys.executable,
        budget,
        _stage_budgets(args),
        test_file=args.test_file,
        suite_files=args.suite_files,
        jobs=args.jobs,
    )
    if args.previous:
        if not args.stage:
            raise SystemExit("--previous goes with --stage (a whole run starts a new report)")
        if not os.path.isfile(os.path.join(args.previous, STATE)):
            raise SystemExit(f"--previous {args.previous}: no {STATE} there")
        if os.path.realpath(args.previous) != os.path.realpath(out):
            shutil.copytree(args.previous, out, dirs_exist_ok=True)
    report.load(fresh=not args.stage)
    stages = [s for s in STAGES if s in args.stage] if args.stage else list(STAGES)
    report.log(
        f"GPU report ({'CPU rehearsal' if args.rehearse else 'GPU'}) into {out}: stages "
        f"{', '.join(stages)}, budget {budget:.0f} s"
    )

    def terminated(signum, frame):  # e.g. an outer `timeout`: stop the children, keep what was written
        for p in list(RUNNING):
            p._signal(signal.SIGKILL)
        for info in report.state.get("stages", {}).values():
            if info.get("status") == "running":
                info.update(status="out of time", error=f"the report was stopped (signal {signum})")
        report.save()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    rc = report.run(stages)
    print(f"\n{_read(report.path(SUMMARY))}")
    return rc
