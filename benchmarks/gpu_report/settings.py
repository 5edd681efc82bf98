"""The report's stages, their budgets, the files it writes and the headline benchmark shape."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = ("environment", "tests", "benchmarks", "autotune", "suite")
# seconds per stage (None: what is left of the whole budget)
BUDGETS: Dict[str, Optional[float]] = {
    "environment": 30,
    "tests": 150,
    "benchmarks": 180,
    "autotune": 90,
    "suite": None,
}
TOTAL_BUDGET = 480.0
# A CPU rehearsal: the same stages on tiny shapes, sized for a 2-core CI machine.
REHEARSAL_BUDGETS: Dict[str, Optional[float]] = {
    "environment": 30,
    "tests": 45,
    "benchmarks": 90,
    "autotune": 30,
    "suite": None,
}
REHEARSAL_TOTAL_BUDGET = 240.0
# A quick test file for the rehearsal's suite stage (the full suite takes about 12 minutes on 2 cores).
REHEARSAL_SUITE = ("tests/test_tuning.py",)
BUDGET_ENV = "GPU_REPORT_BUDGET"
RESERVE_S = 10.0  # kept back at the end: a child stopped at the deadline gets GRACE_S more, then the summary
GRACE_S = 5.0  # between SIGINT (pytest and the harness print what they have) and SIGKILL
MIN_SUITE_S = 15.0

# The files the report writes (never more than MAX_FILES, no deeper than OUT/a/b)
SUMMARY, STATE, LOG = "summary.md", "report.json", "report.log"
TESTS_LOG, SUITE_LOG, ROWS, AUTOTUNE_DIR = "tests.log", "suite.log", "bench_rows.jsonl", "autotune"
MAX_FILES, MAX_DEPTH = 8, 3

GPU_TEST_FILE = "tests/test_gpu.py"
# test files never run by the suite stage: the GPU test file has its own stage, and the report's own
# test runs this report (it would recurse)
NOT_IN_SUITE = ("tests/test_gpu.py", "tests/test_gpu_report.py")

# the headline benchmark shape is the harness's window_bf16_d8 suite
HEADLINE_SUITE = "window_bf16_d8"
HEADLINE = "bf16, batch 32, 64x64, C = 128, d = 8 (16 heads), N = 2"
WINDOWS = (3, 7, 15, 31)
COMPILED_WINDOWS = (7, 15)
# (providers, windows) per harness run, in order of priority
# (the compiled peers last: they compile for tens of seconds per shape)
BENCH_RUNS = (
    (("copy", "qna_triton", "paper_eager", "naive_window"), WINDOWS),
    (("paper_compiled", "flex_nat"), COMPILED_WINDOWS),
)
PEERS = ("paper_eager", "paper_compiled", "flex_nat", "naive_window")
LAUNCH_SHAPE = dict(B=1, H=8, W=8, N=2, h=4, d=8, k=3)


def now() -> str:
    """``qna_triton.env.utc_now``'s format, without importing it: this process runs the stages and never
    imports torch (a broken torch install fails a stage, not the report)."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
