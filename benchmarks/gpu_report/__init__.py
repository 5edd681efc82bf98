"""The GPU report: validate, measure and tune the library on a GPU in one command that ends by itself.

``scripts/gpu_report.sh`` runs ``python -m benchmarks.gpu_report``. Stages, in order, each in child
processes with its own time budget (seconds; the whole run has ``GPU_REPORT_BUDGET``, default 480):

==============  ======  ==============================================================================
stage           budget  what
==============  ======  ==============================================================================
environment         30  GPU, capability, driver, versions, ``nvidia-smi`` clocks; copy bandwidth and
                        bf16 matrix-product rate measured in place
tests              150  ``tests/test_gpu.py`` (the compiled kernels against the float64 oracle), in
                        parallel processes
benchmarks         180  the headline rows of ``python -m benchmarks`` (bf16, batch 32, 64x64, C=128,
                        d=8, N=2): our op at k = 3, 7, 15, 31 against the paper's form (eager at every
                        k, compiled at 7 and 15), FlexAttention at 7 and 15, the window-materialising
                        form; and the time per call of a tiny problem (launch overhead)
autotune            90  ``python -m qna_triton.autotune --quick`` (the headline head layout, k = 3, 7)
suite             rest  every other test file, one process per file, in parallel
==============  ======  ==============================================================================

Everything lands in ``OUT`` as at most eight files (what a GPU session can bring back), written as
each stage goes, so a stage that fails or runs out of time keeps what earlier stages wrote and the
later stages still run: ``summary.md`` (the stage table, key ratios, what did not run, what to rerun),
``report.json`` (the same as data, read by ``python -m benchmarks.ingest``), ``report.log``,
``tests.log``, ``suite.log``, ``bench_rows.jsonl`` (the harness's rows) and ``autotune/<gpu>.json``
and ``.md``. ``--stage NAME`` reruns one stage into the same folder (repeatable); a lone stage may use
the whole budget. ``--rehearse`` runs every stage on a CPU (Triton interpreter, tiny shapes, small
budgets) so the command is known to work before a GPU sees it.

One module per concern: :mod:`.settings` (stages, budgets, file names), :mod:`.procs` (child processes
under a deadline), :mod:`.pytest_log` (reading pytest's output), :mod:`.stages` (the stages and the
report's state), :mod:`.summary` (``summary.md``), :mod:`.children` (the measurements run in child
processes, the only code here that imports torch) and :mod:`.cli` (the command line).
"""

from .cli import main, parse_args
from .pytest_log import first_error, pytest_counts
from .settings import STAGES
from .stages import Report
from .summary import summary_markdown

__all__ = ["STAGES", "Report", "first_error", "main", "parse_args", "pytest_counts", "summary_markdown"]
