"""`make demo`: a short QnA-ViT training run on a generated dataset, start to finish.

Generates a 10-class "coloured shapes" dataset (random position, size, rotation, shade, background and
noise; nothing is downloaded), trains a QnA-ViT on it with ``examples/train.py`` (the paper's recipe,
with lighter augmentation so the effect shows in a minute), evaluates every epoch and prints the loss
as it falls, the throughput and a summary. On a GPU the QnA layers run the fused Triton kernels (bf16
autocast, the full-width qna_vit_tiny at 64x64); on a CPU the PyTorch reference path, with a reduced
width and depth (about 0.5M parameters at 32x32) so the run takes about a minute on two cores.

The run folder (checkpoints, ``steps.csv``, ``summary.csv``) is kept; ``examples/eval.py`` evaluates it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from qna_vit.training import train_cli as train_script

# A reduced QnA-ViT for CPUs: every kind of block of the real model (QnA, strided QnA, windowed
# self-attention in stages 2 and 3), at a quarter of the width and one block per stage. The LSA windows
# divide the 32x32 input's feature maps (8, 4, 2, 1).
CPU_MODEL_KWARGS = {
    "base_dim": 16,
    "qna_layers": (1, 1, 1, 0),
    "qna_heads": (2, 4, 8, 16),
    "lsa_layers": (0, 0, 1, 1),
    "lsa_heads": (1, 2, 4, 8),
    "lsa_window": (8, 4, 2, 1),
}
# qna_vit_tiny itself on GPUs; its LSA windows shrunk to divide the 64x64 input's maps (16, 8, 4, 2).
GPU_MODEL_KWARGS = {"lsa_window": (8, 8, 4, 2)}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _kwargs_argv(kwargs: Dict[str, Any]) -> List[str]:
    return [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in kwargs.items()]


def build_train_argv(args: argparse.Namespace, cuda: bool) -> List[str]:
    """The ``train.py`` command line of the demo."""
    cores = _cpu_count()
    # One loader process prepares images while the model trains; on a small CPU the model gets the
    # remaining cores, so the two never compete for one (oversubscribed CPU threads crawl).
    workers = args.workers if args.workers is not None else (min(8, max(1, cores // 4)) if cores >= 2 else 0)
    threads = args.threads or (None if cuda else max(1, cores - workers))
    size = args.image_size or (64 if cuda else 32)
    kwargs = GPU_MODEL_KWARGS if cuda else CPU_MODEL_KWARGS
    if args.width:
        kwargs = dict(kwargs, base_dim=args.width)
    batch = args.batch_size or (128 if cuda else 32)
    argv = [
        "--synthetic",
        "--synthetic-classes",
        str(args.classes),
        "--synthetic-train-size",
        str(args.train_size),
        "--synthetic-val-size",
        str(args.val_size),
        "--img-size",
        str(size),
        "--model",
        "qna_vit_tiny",
        "--model-kwargs",
        *_kwargs_argv(kwargs),
        "--drop-path",
        "0",
        "--batch-size",
        str(batch),
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--warmup-epochs",
        "0.2",
        # The recipe's augmentation is tuned for 300 ImageNet epochs; a one-minute run shows learning
        # better with crops, flips, colour jitter and label smoothing only.
        "--aa",
        "none",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--reprob",
        "0",
        "--scale",
        "0.35",
        "1.0",
        "--smoothing",
        "0.1",
        "--workers",
        str(workers),
        "--log-interval",
        str(args.log_interval),
        "--ckpt-interval",
        "0",
        "--seed",
        str(args.seed),
        "--progress",
        args.progress,
        "--output",
        args.output or os.path.join("runs", "demo", time.strftime("%Y%m%d-%H%M%S")),
    ]
    if threads:
        argv += ["--threads", str(threads)]
    if cuda:
        argv += ["--amp", "--amp-dtype", "bf16", "--channels-last"]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the demo; returns ``train.py``'s summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=3200, help="generated training images")
    ap.add_argument("--val-size", type=int, default=320, help="generated validation images")
    ap.add_argument("--image-size", type=int, default=None, help="default 64 on a GPU, 32 on a CPU")
    ap.add_argument("--width", type=int, default=None, help="base width (default 64 on a GPU, 16 on a CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on a GPU, 32 on a CPU")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", default="auto", choices=("auto", "bar", "plain", "none"))
    ap.add_argument("--output", default=None, help="run folder (default runs/demo/<time>)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    train_argv = build_train_argv(args, cuda) + ["--device", "cuda" if cuda else "cpu"]
    print("QnA-ViT training demo: a generated 10-class coloured-shapes dataset, trained from scratch")
    print("train.py " + " ".join(train_argv), flush=True)
    t0 = time.perf_counter()
    summary = train_script.train(train_script.parse_args(train_argv))
    wall = time.perf_counter() - t0

    first, last = summary["first_loss_mean"], summary["last_loss_mean"]
    m = summary["metrics"] or {}
    print()
    print("summary")
    print(
        f"  loss        {first:.4f} (mean of the first steps) -> {last:.4f} (last steps), "
        f"{100 * (1 - last / first):.0f}% lower"
    )
    if m:
        print(f"  validation  top-1 {m['top1']:.1f}%  top-5 {m['top5']:.1f}%  (chance: {100 / args.classes:.0f}%)")
    print(
        f"  throughput  {summary['images_per_s']:.1f} training images/s "
        f"({'GPU, Triton kernels' if cuda else 'CPU, PyTorch reference path'})"
    )
    print(f"  time        {wall:.1f}s for {summary['steps']} steps")
    print(f"  run folder  {summary['output']}")
    print(f"  evaluate:   python examples/eval.py --checkpoint {summary['output']} --synthetic")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
