"""`make demo`: a short QnA-ViT training run on a generated dataset, start to finish.

Generates a 10-class "coloured shapes" dataset (random position, size, rotation, shade, background and
noise; nothing is downloaded), trains a QnA-ViT on it with ``examples/train.py`` (the paper's recipe,
with lighter augmentation so the effect shows in a minute), evaluates every epoch and prints the loss
as it falls, the throughput and a summary. On a GPU the QnA layers run the fused Triton kernels (bf16
autocast, the full-width qna_vit_tiny at 64x64); on a CPU the PyTorch reference path, with a reduced
width and depth (about 0.5M parameters at 32x32) so the run takes about a minute on two cores.

The run folder (checkpoints, ``steps.csv``, ``summary.csv``) is kept; ``examples/eval.py`` evaluates it.
"""

# The command line of :mod:`qna_vit.training.demo` (installed with qna-triton); this file is its checkout entry point.
import sys

from qna_vit.training.demo import main

if __name__ == "__main__":
    main()
    sys.exit(0)
