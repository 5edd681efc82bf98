"""Evaluate a QnA-ViT checkpoint: top-1 / top-5 accuracy, loss and images/s.

Checkpoints: those of ``examples/train.py`` (``last.pth``/``best.pth``, or a run folder: its newest
readable checkpoint, naming any it skipped; ``--ema`` takes the EMA weights) and those of ``examples/convert_flax.py`` (``{'model': state_dict, 'model_name': name}``).
Data: an ImageFolder validation split (``--data-dir``: the split folder itself, or a root holding
``--split``) or the generated set (``--synthetic``; a checkpoint trained on it supplies its parameters).

    python examples/eval.py --checkpoint runs/train/<run>/best.pth --data-dir /data/imagenet
    python examples/eval.py --checkpoint qna_vit_tiny.pth --data-dir /data/imagenet/val --amp --channels-last

Prints the accuracy line, the end-to-end rate (data loading included) and the model-only rate (forward
passes on one resident batch, timed after warm-up); ``--results-file`` also writes them as JSON.
"""

# The command line of :mod:`qna_vit.training.eval_cli` (installed with qna-triton); this file is its checkout entry point.
import sys

from qna_vit.training.eval_cli import run

if __name__ == "__main__":
    sys.exit(0 if run() else 1)
