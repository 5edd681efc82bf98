"""Train a QnA-ViT on ImageNet (any ImageFolder tree, WebDataset tar shards, or a generated set) with the
paper's recipe.

Defaults are the recipe of Arar et al. (CVPR 2022, docs/spec.md section 3): 300 epochs, global batch
1024, AdamW with lr 5e-4 per 1024 images (scaled linearly with the global batch), weight decay 0.05
(none on relative-position biases, attention scales, position tables, norms and biases), cosine
schedule with 5 warm-up epochs (20 for qna_vit_base), RandAugment rand-m9-mstd0.5, random erasing 0.25,
mixup 0.8 / cutmix 1.0 with label smoothing 0.1, colour jitter 0.3, mixed precision (bf16 on GPUs),
224x224 input. Flags follow timm's ``train.py``.

Single GPU (global batch 1024 = 256 x 4 accumulation steps)::

    python examples/train.py --data-dir /data/imagenet --batch-size 256 --grad-accum-steps 4

One node, 8 GPUs (128 x 8 = 1024), and two nodes (64 x 16)::

    torchrun --nproc_per_node=8 examples/train.py --data-dir /data/imagenet --batch-size 128
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=RUN --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        examples/train.py --data-dir /data/imagenet --batch-size 64        # on every node

Resume (a killed run continues with exactly the losses it would have had)::

    python examples/train.py ... --resume runs/train/<run>      # or runs/train/<run>/last.pth

Given a run folder, ``--resume`` takes the newest checkpoint that loads (``last.pth``, then the
``--keep-checkpoints`` - 1 before it, ``checkpoint-<step>.pth``), naming any it skipped. SIGTERM, SIGUSR1
(SLURM's ``--signal=USR1@120``) and SIGINT make a run finish its step, save a checkpoint and exit by that
signal (status 128 + its number), every torchrun rank after the same step; ``--resume`` then continues
it exactly. The README's "Training and evaluation" has a SLURM script that requeues itself.

Fine-tuning at 384 px from a 224 checkpoint (the original's ``configs/imagenet_qna_finetune.py``):
``--recipe finetune`` sets 384x384 input, 30 epochs, AdamW lr 1e-5 per 1024 images with a constant
schedule and no warm-up, weight decay 1e-8, and LSA windows 12, 12, 24, 12 (the 384 maps 96, 48, 24, 12
as 7, 7, 14, 7 tile the 224 ones); augmentation stays the recipe's. ``--initial-checkpoint`` loads an
original Flax msgpack checkpoint or one of ours (converted, or a ``train.py`` run's ``best.pth``),
resizing the position and attention-scale tables to the new geometry and starting a new classifier
when the class count differs; flags given explicitly override the recipe's::

    python examples/train.py --recipe finetune --data-dir /data/imagenet --batch-size 64 --grad-accum-steps 16 \
        --initial-checkpoint qna_vit_tiny.pt

A generated dataset instead of images (``--synthetic-classes/-train-size/-val-size/-image-size``)::

    python examples/train.py --synthetic --epochs 1 --batch-size 128

Each run folder (``--output``) holds ``last.pth``, ``best.pth``, ``steps.csv`` (every step's loss, lr,
gradient norm, images/s), ``summary.csv`` (one row per evaluation: top-1/top-5, loss) and, when
tensorboard is installed, ``tb/``.
"""

# The command line of :mod:`qna_vit.training.train_cli` (installed with qna-triton); this file is its checkout entry point.
from qna_vit.training.train_cli import main

if __name__ == "__main__":
    main()
