#!/usr/bin/env bash
# Training checks for a session with a lent GPU, from the repository root:
#
#   OUT=/some/dir bash examples/gpu_session.sh      # default OUT: runs/gpu_session
#
# 1. the demo (Triton kernels, bf16 autocast);
# 2. qna_vit_tiny at 224x224 on generated data, the paper's augmentation (timm) and bf16 autocast:
#    training images/s (eager, then torch.compile) with the GPU name, in $OUT/tiny224-*/summary.json;
# 3. eval.py on that checkpoint (end-to-end and model-only images/s);
# 4. torchrun (env://, NCCL) for one process, and resume of a run killed mid-epoch;
# 5. the CPU training tests, now with timm and torchvision importable.
# About 6 minutes on an H100. Everything lands under $OUT (logs, CSV/JSON summaries).
set -euo pipefail
OUT=${OUT:-runs/gpu_session}
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
$PY -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee "$OUT/device.txt"

$PY examples/demo.py --output "$OUT/demo" --progress plain 2>&1 | tee "$OUT/demo.log"

TINY=(--synthetic --synthetic-classes 1000 --synthetic-train-size 16384 --synthetic-val-size 2048
      --model qna_vit_tiny --img-size 224 --batch-size 128 --epochs 1 --max-steps 80 --workers 14
      --amp --amp-dtype bf16 --channels-last --log-interval 10 --progress plain --ckpt-interval 0)
$PY examples/train.py "${TINY[@]}" --output "$OUT/tiny224-eager" 2>&1 | tee "$OUT/tiny224-eager.log"
$PY examples/train.py "${TINY[@]}" --compile --output "$OUT/tiny224-compile" 2>&1 | tee "$OUT/tiny224-compile.log"
# The same model without the CPU-heavy augmentations: is the run above bound by its data loaders?
$PY examples/train.py "${TINY[@]}" --aa none --reprob 0 --output "$OUT/tiny224-lightaug" 2>&1 \
    | tee "$OUT/tiny224-lightaug.log"

$PY examples/eval.py --checkpoint "$OUT/tiny224-eager" --synthetic --batch-size 256 --workers 14 --channels-last \
    --results-file "$OUT/eval-tiny224.json" 2>&1 | tee "$OUT/eval-tiny224.log"

SMALL=(--synthetic --synthetic-classes 10 --synthetic-train-size 2048 --synthetic-val-size 256 --img-size 64
       --model-kwargs lsa_window=8,8,4,2 --batch-size 64 --epochs 2 --workers 8 --progress plain --log-interval 8
       --ckpt-interval 10 --model-ema)
$PY -m torch.distributed.run --standalone --nproc_per_node=1 examples/train.py "${SMALL[@]}" \
    --output "$OUT/torchrun" 2>&1 | tee "$OUT/torchrun.log"
$PY examples/train.py "${SMALL[@]}" --output "$OUT/resume-ref" > "$OUT/resume-ref.log" 2>&1
$PY examples/train.py "${SMALL[@]}" --output "$OUT/resume" --debug-exit-after-step 45 > "$OUT/resume-killed.log" 2>&1 \
    || [ $? -eq 75 ]
$PY examples/train.py "${SMALL[@]}" --output "$OUT/resume" --resume "$OUT/resume" > "$OUT/resume.log" 2>&1
# On a GPU the kernels' results may differ in the last bits between runs only if a kernel is
# non-deterministic; the backward of this project's kernels is deterministic, so these should match.
$PY - "$OUT" <<'PYEOF' | tee "$OUT/resume-compare.txt"
import csv, sys
out = sys.argv[1]
read = lambda p: [(r["step"], r["loss"]) for r in csv.DictReader(open(p))]
a, b = read(f"{out}/resume-ref/steps.csv"), read(f"{out}/resume/steps.csv")
diff = max(abs(float(x[1]) - float(y[1])) for x, y in zip(a, b))
print(f"resume vs uninterrupted: {len(a)} vs {len(b)} steps, identical: {a == b}, max |loss difference| {diff:.3g}")
PYEOF

$PY -m pytest -q tests/test_train.py 2>&1 | tail -5 | tee "$OUT/test_train.log"
