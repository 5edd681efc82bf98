#!/usr/bin/env bash
# The one command a GPU session runs (a 15-minute window, at most 10 minutes per command): it ends by
# itself within its budget (480 s; GPU_REPORT_BUDGET to change it) and writes at most 8 files under $OUT:
#
#   OUT=/some/dir bash scripts/gpu_report.sh             # environment, tests, benchmarks, autotune, suite
#   OUT=/some/dir bash scripts/gpu_report.sh --stage tests   # rerun one stage, merging into $OUT
#   bash scripts/gpu_report.sh --rehearse                # the same stages on a CPU (interpreter, tiny shapes)
#   bash scripts/gpu_report.sh --ingest /returned/dir    # commit-ready results from what came back
#
# $OUT/summary.md says what ran, what failed and which --stage to rerun; --help lists every option.
# The driver is the package benchmarks/gpu_report/ (the ingest benchmarks/ingest.py). It runs from a copy of the
# working tree: the repository root and examples/ (the qna_vit package) go on PYTHONPATH, nothing needs
# to be installed. $PYTHON chooses the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = "--ingest" ]; then
  shift
  exec "$PY" -m benchmarks.ingest "$@"
fi
exec "$PY" -m benchmarks.gpu_report "$@"
