#!/usr/bin/env bash
# Everything a session with a lent GPU (H100/H200, 30 minutes of device time, 10 minutes per command)
# should run, as parts in order of priority; each part is one device command and writes under $OUT.
#
#   bash scripts/gpu_session.sh tests      # the whole test suite on the GPU (compiled kernels), a process per file
#   bash scripts/gpu_session.sh autotune   # python -m autotune --quick + its report, ~2 min
#   bash scripts/gpu_session.sh core1      # benchmarks: ceilings + core op, windows 3..11  (benchmarks/gpu_session.sh)
#   bash scripts/gpu_session.sh core2      # benchmarks: core op, windows 13..31
#   bash scripts/gpu_session.sh layer      # benchmarks: QnA layer vs FlexAttention neighbourhood attention
#   bash scripts/gpu_session.sh model      # benchmarks: qna_vit_tiny training step vs the paper's form, Swin-T
#   bash scripts/gpu_session.sh train      # examples/gpu_session.sh: demo, 224px qna_vit_tiny images/s, torchrun
#
# Afterwards commit, from what comes back: qna_triton/configs/<gpu>.json, benchmarks/results/<gpu>/
# (merge the benchmark parts with `python -m benchmarks --report-from ...`), and the test log's summary
# in the issue notes, naming the GPU and the date.
set -uo pipefail
part="${1:-}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset QNA_TRITON_BACKEND TRITON_INTERPRET
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
$PY -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee "$OUT/device_$part.txt"

case "$part" in
  tests)
    # one pytest process per test file, all at once: the compiles of the kernels' many specialisations
    # then use the machine's cores (one process would spend most of the 10-minute limit compiling); two
    # CPU threads each for the float64 oracles. The logs are joined into one file (the device returns 8
    # files at most), with each file's exit status (124: timed out). TEST_FILES picks a subset.
    logs=$(mktemp -d)
    for f in ${TEST_FILES:-tests/test_*.py}; do
      n=$(basename "$f" .py)
      ( OMP_NUM_THREADS=2 timeout 520 $PY -m pytest -q -ra -p no:cacheprovider "$f" > "$logs/$n.log" 2>&1
        echo "rc=$?" >> "$logs/$n.log" ) &
    done
    wait
    for l in "$logs"/*.log; do echo "=== $(basename "$l" .log)"; cat "$l"; done > "$OUT/tests.log"
    for l in "$logs"/*.log; do
      echo "$(basename "$l" .log): $(grep -E '^[0-9]+ [a-z]+.* in [0-9.]+s|^no tests ran' "$l" | tail -1) $(tail -1 "$l")"
      grep -E "^(FAILED|ERROR)" "$l"
    done | tee "$OUT/tests_summary.txt"
    ! grep -q -v "rc=0$" <(grep -h "^rc=" "$logs"/*.log) ;;
  autotune)
    timeout 560 $PY -m autotune --quick --no-tqdm --bench-report 2>&1 | tee "$OUT/autotune.log"
    cp qna_triton/configs/*.json qna_triton/configs/*.md "$OUT/" 2>/dev/null
    cp -r benchmarks/results "$OUT/autotune_results" 2>/dev/null ;;
  core1|core2|layer|model|sweeps)
    OUT="$OUT" bash benchmarks/gpu_session.sh "$part" ;;
  train)
    # checkpoints stay on the machine: only logs and summaries come back (the device returns 8 files)
    work=/tmp/qna_gpu_train
    OUT="$work" timeout 560 bash examples/gpu_session.sh 2>&1 | tail -200 > "$OUT/train.log"
    tar -czf "$OUT/train_results.tar.gz" -C "$work" --exclude='*.pth' --exclude='*.pt' . ;;
  *) echo "usage: $0 tests|autotune|core1|core2|layer|model|sweeps|train" >&2; exit 2 ;;
esac
