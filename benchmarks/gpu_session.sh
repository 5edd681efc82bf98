#!/usr/bin/env bash
# Benchmarks on a lent GPU (H100/H200) in parts that each end well inside the device tool's 10-minute
# limit per command; the headline parts together take about 20 minutes of device time.
#
# From the repository root, one call each (in this order of priority):
#   bash benchmarks/gpu_session.sh core1    # ceilings + core-op window sweep bf16 d=8, k = 3..11
#   bash benchmarks/gpu_session.sh core2    # the same sweep, k = 13..31
#   bash benchmarks/gpu_session.sh layer    # QnA layer vs FlexAttention NA layer, d = 16 and 32
#   bash benchmarks/gpu_session.sh model    # training step: qna_vit_tiny ours / paper form, Swin-T
#   bash benchmarks/gpu_session.sh sweeps   # extra: vit_tiny layer shapes, fp32 and d=32 sweeps (what fits)
#   bash benchmarks/gpu_session.sh all      # everything in one process (no per-command limit)
#
# Each part writes, under $OUT (or benchmarks/results/_parts/ when OUT is unset):
#   rows_<part>.jsonl   every measured row (the source of all reports)
#   summary_<part>.md   the headline of this part
#   log_<part>.txt      the full output
#   bench_<part>.tar.gz that part's folder: CSV, JSON, markdown, plots
# Afterwards, on any machine, merge the parts into the committed results:
#   python -m benchmarks --report-from rows_core1.jsonl rows_core2.jsonl rows_layer.jsonl rows_model.jsonl \
#       [rows_sweeps.jsonl] --out benchmarks/results/<gpu>
set -uo pipefail
part="${1:-}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset QNA_TRITON_BACKEND TRITON_INTERPRET  # the library's defaults: Triton kernels on CUDA tensors
PY="${PYTHON:-python3}"
extra="${BENCH_ARGS:-}"  # e.g. BENCH_ARGS="--smoke --no-compile" to try the script on a CPU machine
dest="${OUT:-benchmarks/results/_parts}"
mkdir -p "$dest"

case "$part" in
  core1)  args=(--suite window_bf16_d8 --windows 3 5 7 9 11); budget=420 ;;
  core2)  args=(--suite window_bf16_d8 --windows 13 15 21 31); budget=420 ;;
  layer)  args=(--suite layer); budget=420 ;;
  model)  args=(--suite model); budget=390 ;;
  sweeps) args=(--suite vit_tiny --suite window_fp32_d8 --suite window_bf16_d32 --suite window_fp32_d32)
          budget=420 ;;
  all)    args=(); budget=0 ;;
  *) echo "usage: $0 core1|core2|layer|model|sweeps|all" >&2; exit 2 ;;
esac

work="/tmp/qna_bench_$part"
rm -rf "$work"
log="$dest/log_$part.txt"
{
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
  if [ "$budget" -gt 0 ]; then
    # --time-budget stops starting new measurements; timeout is the hard stop (a compilation in flight):
    # worst case budget + 75 + 15 s, then the reports, inside the device tool's 600 s per command.
    timeout --signal=INT --kill-after=15 $((budget + 75)) "$PY" -m benchmarks "${args[@]}" --out "$work" \
      --time-budget "$budget" $extra
  else
    "$PY" -m benchmarks --out "$work" $extra
  fi
  echo "benchmarks exit code: $?"
  # Reports again from the rows, also when the run was stopped before writing them.
  [ -s "$work/rows.jsonl" ] && "$PY" -m benchmarks --report-from "$work/rows.jsonl" --out "$work" > /dev/null
} 2>&1 | tee "$log"

if [ -s "$work/rows.jsonl" ]; then
  cp "$work/rows.jsonl" "$dest/rows_$part.jsonl"
  cp "$work/summary.md" "$dest/summary_$part.md" 2>/dev/null || true
  tar -C /tmp -czf "$dest/bench_$part.tar.gz" "qna_bench_$part"
  echo "wrote $dest/rows_$part.jsonl, summary_$part.md, bench_$part.tar.gz, log_$part.txt"
  cat "$dest/summary_$part.md" 2>/dev/null | tail -40
else
  echo "no rows measured: see $log" >&2
  exit 1
fi
