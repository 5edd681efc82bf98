#!/usr/bin/env bash
# Training checks for a session with a lent GPU, from the repository root (scripts/gpu_session.sh train
# runs it under a 560 s limit, so the parts go in order of priority):
#
#   OUT=/some/dir bash examples/gpu_session.sh      # default OUT: runs/gpu_session
#
# 1. the demo (Triton kernels, bf16 autocast);
# 2. qna_vit_tiny at 224x224 on generated data with the paper's augmentation (timm) and bf16 autocast:
#    training images/s with the GPU name and versions in $OUT/tiny224-eager/summary.json, and the
#    share of time spent waiting for data;
# 3. eval.py on that checkpoint (end-to-end and model-only images/s);
# 4. torchrun (env://, NCCL) with one process, and a run killed mid-epoch then resumed, compared
#    step by step with an uninterrupted one (timm's pipeline, EMA, mixup, on the GPU);
# 5. the CPU training tests, now with timm and torchvision importable;
# 6. the 224px run again with light augmentation (is step 2 bound by its loaders?) and compiled.
# About 6 minutes on an H100. Everything lands under $OUT (logs, CSV/JSON summaries).
set -euo pipefail
OUT=${OUT:-runs/gpu_session}
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee "$OUT/device.txt"

$PY examples/demo.py --output "$OUT/demo" --progress plain 2>&1 | tee "$OUT/demo.log"

TINY=(--synthetic --synthetic-classes 1000 --synthetic-train-size 12800 --synthetic-val-size 1024
      --model qna_vit_tiny --img-size 224 --batch-size 128 --epochs 1 --max-steps 80 --workers 14
      --amp --amp-dtype bf16 --channels-last --log-interval 10 --progress plain --ckpt-interval 0)
$PY examples/train.py "${TINY[@]}" --output "$OUT/tiny224-eager" 2>&1 | tee "$OUT/tiny224-eager.log"

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
# Identical only if every kernel on the path is deterministic (this project's backward is); cuBLAS and
# cuDNN pick the same algorithms for the same shapes in one process configuration.
$PY - "$OUT" <<'PYEOF' | tee "$OUT/resume-compare.txt"
import csv, sys
out = sys.argv[1]
read = lambda p: [(r["step"], r["loss"]) for r in csv.DictReader(open(p))]
a, b = read(f"{out}/resume-ref/steps.csv"), read(f"{out}/resume/steps.csv")
diff = max(abs(float(x[1]) - float(y[1])) for x, y in zip(a, b))
print(f"resume vs uninterrupted: {len(a)} vs {len(b)} steps, identical: {a == b}, max |loss difference| {diff:.3g}")
PYEOF

$PY -m pytest -q -p no:cacheprovider tests/test_train.py 2>&1 | tail -5 | tee "$OUT/test_train.log"

# The same model without the CPU-heavy augmentations: was the run above bound by its data loaders?
$PY examples/train.py "${TINY[@]}" --aa none --reprob 0 --output "$OUT/tiny224-lightaug" 2>&1 \
    | tee "$OUT/tiny224-lightaug.log"
$PY examples/train.py "${TINY[@]}" --compile --output "$OUT/tiny224-compile" 2>&1 | tee "$OUT/tiny224-compile.log"
