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

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from qna_vit import FINETUNE_384, MODEL_CONFIGS, create_model, load_flax_params, load_weights
from qna_vit.flax import read_flax_checkpoint, split_train_state
from qna_vit.training.checkpoint import (
    BEST,
    CHECKPOINT_VERSION,
    LAST,
    CheckpointError,
    all_finite,
    atomic_save,
    load_newest,
    plain,
    resolve_checkpoint_path,
    rng_state,
    save_rotating,
    set_rng_state,
    truncate_csv,
)
from qna_vit.training.data import (
    AugConfig,
    BadSampleLog,
    DataSpec,
    ResumableSampler,
    SeededDataset,
    ShardSampler,
    TooManyBadSamplesError,
    TrackedLoader,
    build_dataset,
    build_transform,
    collate_samples,
    describe_dataset,
    split_dataset,
    verify_dataset,
)
from qna_vit.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    same_on_all_ranks,
)
from qna_vit.training.engine import (
    CsvLog,
    NonFiniteLossError,
    Progress,
    TensorBoard,
    build_optimizer,
    build_scheduler,
    decayed_parameter_count,
    derive_seed,
    evaluate,
    parse_model_kwargs,
    set_step_lr,
)
from qna_vit.training.mixup import SeededMixup, cross_entropy
from qna_vit.training.preemption import (
    StopAgreement,
    StopRequest,
    exit_by_signal,
    ignore_stop_signals,
    signal_name,
)

STEP_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "data_wait_s", "elapsed_s")
SUMMARY_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "top1",
    "top5",
    "ema_val_loss",
    "ema_top1",
    "ema_top5",
    "images_per_s",
    "epoch_s",
    "bad_samples",
)
DEBUG_EXIT_CODE = 75  # what --debug-exit-after-step exits with (a simulated kill)
CHECKPOINT_ERROR_EXIT_CODE = 2  # --resume names no usable checkpoint (like a bad command line)
BAD_SAMPLES_EXIT_CODE = 4  # more unreadable images than --max-bad-samples, or --verify-data found some

# --recipe finetune: the original's fine-tuning config (docs/spec.md, section Fine-tuning); defaults only,
# so an explicit flag still wins.
RECIPES: Dict[str, Dict[str, Any]] = {
    "imagenet": {},
    "finetune": dict(
        img_size=FINETUNE_384["img_size"][0],
        epochs=30,
        lr_base=1e-5,
        weight_decay=1e-8,
        warmup_epochs=0.0,
        sched="constant",
    ),
}


# ----------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command line (timm's flag names where timm has the flag)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=None,
        help="ImageFolder root holding the train and val splits, or a folder of WebDataset shards "
        "train-*.tar / val-*.tar (<key>.jpg + <key>.cls)",
    )
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--synthetic", action="store_true", help="train on the generated shapes dataset")
    g.add_argument("--synthetic-classes", type=int, default=10)
    g.add_argument("--synthetic-train-size", type=int, default=5000)
    g.add_argument("--synthetic-val-size", type=int, default=500)
    g.add_argument("--synthetic-image-size", type=int, default=None, help="generated side (default: --img-size)")
    g.add_argument("--synthetic-seed", type=int, default=0)
    g.add_argument("-j", "--workers", type=int, default=8, help="data loader processes per training process")
    g.add_argument(
        "--max-bad-samples",
        type=int,
        default=None,
        metavar="N",
        help="stop (after saving) once more than N distinct training images could not be decoded; each is "
        "replaced by another, drawn from its seed (default: 0.1%% of the training set, at least 10)",
    )
    g.add_argument(
        "--verify-data",
        action="store_true",
        help="decode every image of the train and val splits, list the unreadable ones and exit "
        f"(status {BAD_SAMPLES_EXIT_CODE} if there are any) without training",
    )
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--crop-pct", type=float, default=0.875, help="evaluation centre-crop fraction")
    g.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"))

    g = p.add_argument_group("model")
    g.add_argument(
        "--recipe",
        default="imagenet",
        choices=sorted(RECIPES),
        help="imagenet: the paper's 300-epoch recipe; finetune: 384 px, 30 epochs, lr 1e-5 constant, "
        "weight decay 1e-8, no warm-up, LSA windows 12,12,24,12 (use with --initial-checkpoint)",
    )
    g.add_argument(
        "--initial-checkpoint",
        default=None,
        metavar="PATH",
        help="weights to start from (Flax msgpack or ours), tables resized to this model's geometry",
    )
    g.add_argument("--model", default="qna_vit_tiny", choices=sorted(MODEL_CONFIGS))
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="QnAViTConfig overrides, e.g. base_dim=32 qna_layers=1,1,1,0 (a reduced model)",
    )
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: the model's)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (before DDP)")
    g.add_argument("--compile-mode", default=None)

    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="images per process per micro-batch")
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: --lr-base scaled to the batch)")
    g.add_argument("--lr-base", type=float, default=5e-4)
    g.add_argument("--lr-base-size", type=int, default=1024)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--opt-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="layer-wise lr decay (timm's): each layer's lr scaled by this per layer below the head",
    )
    g.add_argument("--warmup-epochs", type=float, default=None, help="default 5 (qna_vit_base: 20)")
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument(
        "--sched",
        default="cosine",
        choices=("cosine", "constant"),
        help="after the warm-up: cosine down to --min-lr, or constant",
    )
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy, 'none' to disable")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0))
    g.add_argument("--ratio", type=float, nargs=2, default=(3.0 / 4.0, 4.0 / 3.0))
    g.add_argument("--hflip", type=float, default=0.5)

    g = p.add_argument_group("precision and averaging")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast mixed precision (default: on for CUDA, off on CPU)",
    )
    g.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"))
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument(
        "--model-ema-warmup", action="store_true", help="timm's ModelEmaV3 warm-up: a lower decay in early steps"
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--output", default=None, help="run folder (default: runs/train/<time>-<model>, or the folder of --resume)"
    )
    g.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines (all steps go to CSV)")
    g.add_argument("--ckpt-interval", type=int, default=1000, help="steps between mid-epoch checkpoints (0: off)")
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        metavar="N",
        help="checkpoints kept: last.pth and the N-1 before it as checkpoint-<step>.pth (--resume on the "
        "folder takes the newest readable one)",
    )
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--dist-backend", default=None, help="default: nccl on GPUs, gloo on CPU")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument(
        "--progress",
        default="auto",
        choices=("auto", "bar", "plain", "none"),
        help="auto: a tqdm bar on a terminal, plain lines otherwise",
    )
    g.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also log to TensorBoard when it is installed",
    )
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch evaluation")

    g = p.add_argument_group("debugging (tests)")
    g.add_argument("--debug-nan-at-step", type=int, default=None, help="make step N's loss NaN")
    g.add_argument(
        "--debug-exit-after-step",
        type=int,
        default=None,
        help=f"exit abruptly (code {DEBUG_EXIT_CODE}, no cleanup) after step N, as a kill would",
    )
    g.add_argument(
        "--debug-signal-after-step",
        type=int,
        default=None,
        help="send this process SIGTERM after step N, as a scheduler would (rank 0 only)",
    )
    g.add_argument(
        "--debug-step-delay", type=float, default=0.0, help="sleep this many seconds after each step (a slow run)"
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the command line."""
    p = build_parser()
    recipe = p.parse_known_args(argv)[0].recipe
    p.set_defaults(**RECIPES[recipe])
    args = p.parse_args(argv)
    if not args.synthetic and not args.data_dir:
        p.error("give --data-dir (an ImageFolder tree) or --synthetic")
    if args.verify_data and args.synthetic:
        p.error("--verify-data checks the files of --data-dir; --synthetic has none")
    if args.max_bad_samples is not None and args.max_bad_samples < 0:
        p.error(f"--max-bad-samples must be >= 0, got {args.max_bad_samples}")
    for name in ("batch_size", "grad_accum_steps", "epochs", "log_interval", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.layer_decay is not None and not 0.0 < args.layer_decay <= 1.0:
        p.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            p.error("mixup/cutmix mix a batch with its reverse: --batch-size must be even")
    try:
        args.model_kwargs = parse_model_kwargs(args.model_kwargs)
    except ValueError as e:
        p.error(str(e))
    if args.recipe == "finetune":
        args.model_kwargs.setdefault("lsa_window", FINETUNE_384["lsa_window"])
    if args.initial_checkpoint and args.resume:
        p.error("--initial-checkpoint starts a new run; --resume continues one: give one of them")
    if args.resume and not os.path.exists(args.resume):
        p.error(f"--resume {args.resume}: no such file or folder")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        p.error(f"--initial-checkpoint {args.initial_checkpoint}: no such file")
    return args


def load_initial_checkpoint(model: nn.Module, path: str) -> Any:
    """Loads ``path`` (an original Flax msgpack checkpoint, or ours: converted, or a training run's) into
    ``model``, resizing tables to its geometry; returns the :class:`qna_vit.LoadReport`."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return load_weights(model, path, resize=True)  # the checkpoint's "model" state dict
    params, batch_stats = split_train_state(read_flax_checkpoint(path))
    return load_flax_params(model, params, batch_stats, resize=True)


# ----------------------------------------------------------------------------------- the run
@dataclass
class _Pending:
    step: int
    epoch: int
    loss: torch.Tensor
    lr: float
    grad_norm: torch.Tensor
    data_wait: float  # seconds this step waited for the loader


@dataclass
class _Run:
    """Mutable state of a run besides model and optimizer."""

    step: int = 0
    best: Dict[str, Any] = field(default_factory=lambda: {"top1": None, "epoch": None, "step": None})
    last_ckpt: Optional[Tuple[str, int]] = None  # (path, step) of the newest checkpoint on disk
    pending: List[_Pending] = field(default_factory=list)
    last_flush: float = 0.0
    epoch_losses: List[float] = field(default_factory=list)
    all_losses: List[Tuple[int, float]] = field(default_factory=list)
    rates: List[float] = field(default_factory=list)  # images/s of each logging interval
    waits: List[float] = field(default_factory=list)  # fraction of each interval spent waiting for data
    metrics: Optional[Dict[str, float]] = None
    ema_metrics: Optional[Dict[str, float]] = None


def _amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    use = args.amp if args.amp is not None else device.type == "cuda"
    if not use:
        return None
    return torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16


def _default_output(args: argparse.Namespace) -> str:
    if args.output:
        return args.output
    if args.resume:
        return os.path.dirname(os.path.abspath(resolve_checkpoint_path(args.resume)))
    return os.path.join("runs", "train", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}")


def _grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs training as configured by :func:`parse_args`; returns a summary (losses, throughput, metrics).

    Raises:
        NonFiniteLossError: a loss (or, at a checkpoint, a parameter) became inf/NaN; the message names
            the step and the last good checkpoint, which is left untouched.
    """
    info = init_distributed(args.device, args.dist_backend)
    try:
        return _train(args, info)
    finally:
        cleanup(info)


def _train(args: argparse.Namespace, info: DistInfo) -> Dict[str, Any]:
    t_start = time.perf_counter()
    main = info.is_main
    say = print if main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = _amp_dtype(args, device)

    # --- data
    spec = DataSpec(
        args.data_dir,
        args.train_split,
        args.val_split,
        args.synthetic,
        args.synthetic_classes,
        args.synthetic_train_size,
        args.synthetic_val_size,
        args.synthetic_image_size or args.img_size,
        args.synthetic_seed,
    )
    train_base, n_classes = build_dataset(spec, "train", as_pil=True)
    val_base = None if args.no_eval else build_dataset(spec, "val", as_pil=True)[0]
    num_classes = args.num_classes or n_classes
    aa = None if (args.aa or "none").lower() == "none" else args.aa
    aug = AugConfig(
        img_size=args.img_size,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=aa,
        reprob=args.reprob,
        interpolation=args.interpolation,
        crop_pct=args.crop_pct,
    )
    sampler = ResumableSampler(
        len(train_base), args.batch_size, info.world_size, info.rank, args.grad_accum_steps, args.seed
    )
    loader_kw = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        worker_init_fn=ignore_stop_signals,  # the main process decides when to stop (preemption.py)
    )
    loader = DataLoader(
        SeededDataset(train_base, build_transform(aug, True)),
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=collate_samples,
        **loader_kw,
    )
    # Unreadable images: every process warns about those it meets; the counts are merged at each log
    # flush and checkpoint (bad_check), where all processes meet anyway.
    rank_tag = f"[rank {info.rank}] " if info.enabled else ""

    def warn(line: str) -> None:
        print(rank_tag + line, file=sys.stderr, flush=True)

    bad_train = BadSampleLog("replaced by another image", warn)
    bad_val = BadSampleLog("left out of the evaluation", warn)
    max_bad = args.max_bad_samples if args.max_bad_samples is not None else max(10, len(train_base) // 1000)
    val_loader = None
    if val_base is not None:
        val_loader = TrackedLoader(
            DataLoader(
                SeededDataset(val_base, build_transform(aug, False), replace_bad=False),
                batch_size=args.eval_batch_size or args.batch_size,
                sampler=ShardSampler(len(val_base), info.world_size, info.rank),
                collate_fn=collate_samples,
                **loader_kw,
            ),
            bad_val,
        )
    steps_per_epoch = sampler.steps_per_epoch
    global_batch = sampler.global_batch
    total_steps = args.epochs * steps_per_epoch
    max_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = SeededMixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )

    # --- model, optimizer, schedule
    torch.manual_seed(args.seed)
    arch = dict(args.model_kwargs)
    arch.setdefault("img_size", args.img_size)
    overrides = dict(arch)
    if args.drop_path is not None:
        overrides["drop_path"] = args.drop_path
    model = create_model(args.model, num_classes=num_classes, **overrides)
    if args.initial_checkpoint:
        report = load_initial_checkpoint(model, args.initial_checkpoint)
        say(f"initial checkpoint {args.initial_checkpoint}: {report}")
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    optimizer = build_optimizer(
        model,
        lr,
        args.weight_decay,
        betas=tuple(args.opt_betas),
        eps=args.opt_eps,
        layer_decay=args.layer_decay,
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    warmup_epochs = (
        args.warmup_epochs if args.warmup_epochs is not None else (20.0 if args.model == "qna_vit_base" else 5.0)
    )
    schedule = build_scheduler(
        optimizer,
        total_steps,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        warmup_lr=args.warmup_lr,
        min_lr=lr if args.sched == "constant" else args.min_lr,
    )
    ema = ModelEmaV3(model, args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    data_order = {
        "seed": args.seed,
        "global_batch": global_batch,
        "num_samples": len(train_base),
        "steps_per_epoch": steps_per_epoch,
    }

    out = _default_output(args)
    run = _Run()
    if main:
        os.makedirs(out, exist_ok=True)
    steps_csv = CsvLog(os.path.join(out, "steps.csv"), STEP_FIELDS, main)
    summary_csv = CsvLog(os.path.join(out, "summary.csv"), SUMMARY_FIELDS, main)

    resumed_from = None
    epoch_end_pending = False  # stopped after an epoch's last step, before its evaluation
    if args.resume:
        ckpt, path, skipped = load_newest(args.resume, required=("model", "optimizer", "step"))
        for file, reason in skipped:
            say(f"warning: skipped checkpoint {file}: {reason}")
        if skipped:
            say(f"resuming from {path} (step {ckpt['step']}), the newest readable checkpoint")
        # Every rank reads the folder itself; they must all continue from the same step.
        if not same_on_all_ranks(int(ckpt["step"]), info):
            raise CheckpointError(
                f"the processes found different checkpoints in {args.resume} (not one shared folder?)"
            )
        _restore(ckpt, model, optimizer, scaler, ema, schedule, data_order, say)
        run.step, run.best = int(ckpt["step"]), dict(ckpt.get("best") or run.best)
        run.last_ckpt = (os.path.abspath(path), run.step)
        resumed_from = path
        epoch_end_pending = bool(ckpt.get("epoch_end_pending"))
        bad_train.load_state_dict(ckpt.get("bad_samples") or {})
        if main:
            # A killed run may have logged steps past its last checkpoint; those are redone now.
            truncate_csv(steps_csv.path, lambda r: int(r["step"]) <= run.step)
            truncate_csv(summary_csv.path, lambda r: int(r["step"]) <= run.step)
            epoch = run.step // steps_per_epoch - (1 if epoch_end_pending else 0)
            run.epoch_losses = _logged_epoch_losses(steps_csv.path, epoch)

    train_model: nn.Module = model
    if args.compile:
        train_model = torch.compile(model, mode=args.compile_mode)
    ddp_model: nn.Module = train_model
    if info.enabled:
        ddp_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    tb = TensorBoard(os.path.join(out, "tb"), enabled=main and args.tensorboard)

    # --- banner
    from qna_triton.ops import resolve_backend

    n_params = sum(p.numel() for p in model.parameters())
    n_decay = decayed_parameter_count(optimizer)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    say(
        f"model: {args.model} ({_fmt_count(n_params)} parameters, {num_classes} classes, "
        f"{args.img_size}x{args.img_size} input){' overrides ' + str(arch) if args.model_kwargs else ''}"
    )
    say(
        f"device: {device}{gpu} | QnA backend: {resolve_backend(device)} | precision: "
        f"{'autocast ' + args.amp_dtype if amp_dtype else 'float32'} | channels-last: {args.channels_last} | "
        f"compile: {args.compile} | processes: {info.world_size}" + (f" ({info.backend})" if info.enabled else "")
    )
    say(
        f"data: {'generated shapes' if args.synthetic else f'{spec.data_dir} ({describe_dataset(train_base)})'}, "
        f"{len(train_base)} train / "
        f"{len(val_base) if val_base is not None else 0} val images | aa {aa} | "
        f"reprob {args.reprob} | mixup {args.mixup} cutmix {args.cutmix} smoothing {args.smoothing} | "
        f"color jitter {args.color_jitter}"
    )
    say(
        f"optimizer: AdamW lr {lr:.3g} (global batch {global_batch} = {args.batch_size} x {info.world_size} "
        f"process(es) x {args.grad_accum_steps} accumulation) | weight decay {args.weight_decay} on "
        f"{_fmt_count(n_decay)} of {_fmt_count(n_params)} parameters | {args.sched}, {warmup_epochs:g} warm-up "
        f"epochs | "
        f"{args.epochs} epochs x {steps_per_epoch} steps"
        + (f", stopping at step {max_steps}" if max_steps < total_steps else "")
        + (f" | layer decay {args.layer_decay}" if args.layer_decay else "")
        + (f" | EMA {args.model_ema_decay}" if ema else "")
        + (f" | clip {args.clip_grad}" if args.clip_grad else "")
    )
    say(f"output: {out}" + (f" | resumed from {resumed_from} at step {run.step}" if resumed_from else ""))

    # --- the loop
    params = [p for p in model.parameters() if p.requires_grad]
    ckpt_paths = (os.path.join(out, LAST), os.path.join(out, BEST))

    def flush() -> None:
        """Fetches the pending step losses (one sync), logs them, and stops on a non-finite one."""
        if not run.pending:
            return
        losses = all_reduce_mean(torch.stack([p.loss for p in run.pending]).float(), info).tolist()
        norms = torch.stack([p.grad_norm for p in run.pending]).float().tolist()
        now = time.perf_counter()
        elapsed = max(now - run.last_flush, 1e-9)
        rate = len(run.pending) * global_batch / elapsed
        waited = sum(p.data_wait for p in run.pending) / elapsed
        run.last_flush = now
        rows, bad = [], None
        for p, loss, gn in zip(run.pending, losses, norms):
            rows.append(
                {
                    "step": p.step,
                    "epoch": p.epoch,
                    "loss": loss,
                    "lr": p.lr,
                    "grad_norm": gn,
                    "images_per_s": round(rate, 2),
                    "data_wait_s": round(p.data_wait, 5),
                    "elapsed_s": round(now - t_start, 3),
                }
            )
            if not math.isfinite(loss):
                bad = (p, loss)
                break
            run.epoch_losses.append(loss)
            run.all_losses.append((p.step, loss))
        run.pending.clear()
        steps_csv.write(rows)
        run.rates.append(rate)
        run.waits.append(waited)
        if bad is not None:
            p, loss = bad
            where = (
                f"last good checkpoint: {run.last_ckpt[0]} (step {run.last_ckpt[1]}), left untouched"
                if run.last_ckpt
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) at step {p.step} (epoch {p.epoch}, batch "
                f"{p.step - p.epoch * steps_per_epoch} of {steps_per_epoch}); training stopped without saving; "
                f"{where}",
                step=p.step,
            )
        last = rows[-1]
        line = (
            f"step {last['step']}/{max_steps} loss {last['loss']:.4f} (avg {sum(losses) / len(losses):.4f}) "
            f"lr {last['lr']:.3g} grad-norm {last['grad_norm']:.3g} | {rate:.1f} images/s "
            f"(data wait {100 * waited:.0f}%)"
        )
        progress.set_postfix(f"loss {last['loss']:.4f} {rate:.0f} img/s")
        progress.write(line)
        tb.scalars(
            {
                "train/loss": last["loss"],
                "train/lr": last["lr"],
                "train/grad_norm": last["grad_norm"],
                "train/images_per_s": rate,
            },
            last["step"],
        )

    def bad_check(epoch: int, saved: bool) -> None:
        """Merges the unreadable-image counts of all processes; past --max-bad-samples, saves (unless
        ``saved``: the state on disk is current) and stops with the list of files."""
        bad_train.sync(info)
        if bad_train.count() <= max_bad:
            return
        if not saved:
            save(epoch, evaluated=False)
        message = (
            f"{bad_train.count()} unreadable training images, more than --max-bad-samples {max_bad}: "
            f"{bad_train.listing()}; progress saved in {run.last_ckpt[0] if run.last_ckpt else '(nothing)'} "
            f"(step {run.step}): fix or remove the files and --resume, or raise --max-bad-samples"
        )
        # Said here, before the processes part: under torchrun the first process to exit gets the
        # others killed, so rank 0 finishes the checkpoint (the barrier) and the message first.
        if main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        barrier(info)
        raise TooManyBadSamplesError(message, reported=main)

    def save(epoch: int, evaluated: bool, epoch_end_pending: bool = False) -> None:
        """Writes last.pth (keeping the --keep-checkpoints before it, and best.pth after an improving
        evaluation), never from a non-finite state."""
        flush()
        bad_train.sync(info)  # a collective: every process saves at the same steps
        tensors = list(model.parameters()) + (list(ema.module.parameters()) if ema else [])
        if not all_finite(tensors):
            where = (
                f"last good checkpoint: {run.last_ckpt[0]} (step {run.last_ckpt[1]}), left untouched"
                if run.last_ckpt
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(f"non-finite parameters after step {run.step}; not saving; {where}", step=run.step)
        improved = False
        # The EMA's accuracy decides "best" when there is an EMA (timm does the same).
        top1 = (run.ema_metrics or run.metrics or {}).get("top1") if evaluated else None
        if top1 is not None and (run.best["top1"] is None or top1 > run.best["top1"]):
            run.best = {"top1": top1, "epoch": epoch, "step": run.step}
            improved = True
        last_path = os.path.abspath(ckpt_paths[0])
        if main:
            state = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "model_name": args.model,
                "model_kwargs": arch,
                "num_classes": num_classes,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.module.state_dict() if ema else None,
                "schedule": schedule.state_dict(),
                "step": run.step,
                "epoch": run.step // steps_per_epoch,
                "epoch_end_pending": epoch_end_pending,
                "data_order": data_order,
                "rng": rng_state(),
                "best": run.best,
                "metrics": run.metrics,
                "ema_metrics": run.ema_metrics,
                "args": plain(vars(args)),
                "data": plain({"spec": vars(spec), "aug": vars(aug)}),
                "bad_samples": bad_train.state_dict(),
            }
            # The last.pth being replaced is kept when it is this run's (its step known).
            previous = run.last_ckpt[1] if run.last_ckpt and run.last_ckpt[0] == last_path else None
            save_rotating(state, out, run.step, args.keep_checkpoints, previous)
            if improved:
                atomic_save(state, ckpt_paths[1])
        run.last_ckpt = (last_path, run.step)

    def end_epoch(epoch: int, epoch_s: Optional[float], epoch_rates: List[float]) -> None:
        """The epoch's evaluation, summary row and checkpoint."""
        if val_loader is not None:
            run.metrics = evaluate(train_model, val_loader, device, info, amp_dtype, args.channels_last)
            if ema is not None:
                run.ema_metrics = evaluate(ema.module, val_loader, device, info, amp_dtype, args.channels_last)
            bad_val.sync(info)
        bad_train.sync(info)
        m, e = run.metrics or {}, run.ema_metrics or {}
        row = {
            "epoch": epoch,
            "step": run.step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(run.epoch_losses) / max(len(run.epoch_losses), 1),
            "val_loss": m.get("loss"),
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "ema_val_loss": e.get("loss"),
            "ema_top1": e.get("top1"),
            "ema_top5": e.get("top5"),
            "images_per_s": round(sum(epoch_rates) / len(epoch_rates), 2) if epoch_rates else None,
            "epoch_s": round(epoch_s, 3) if epoch_s is not None else None,
            "bad_samples": bad_train.count(epoch),
        }
        summary_csv.write([row])
        tb.scalars(
            {
                "val/loss": m.get("loss"),
                "val/top1": m.get("top1"),
                "val/top5": m.get("top5"),
                "val_ema/top1": e.get("top1"),
            },
            run.step,
        )
        if m:
            took = f" ({epoch_s:.1f}s)" if epoch_s is not None else ""
            say(
                f"epoch {epoch + 1}/{args.epochs}{took}: train loss {row['train_loss']:.4f} | val loss "
                f"{m['loss']:.4f} top-1 {m['top1']:.2f}% top-5 {m['top5']:.2f}%"
                + (f" | EMA top-1 {e['top1']:.2f}% top-5 {e['top5']:.2f}%" if e else "")
            )
        if bad_train.count(epoch) or bad_val.count():
            say(
                f"epoch {epoch + 1}/{args.epochs}: {bad_train.count(epoch)} unreadable training image(s) "
                f"replaced, {bad_val.count()} unreadable validation image(s) left out"
            )
        save(epoch, evaluated=val_loader is not None)
        bad_check(epoch, saved=True)

    ddp_model.train()
    run.last_flush = time.perf_counter()
    epoch = run.step // steps_per_epoch
    progress = Progress(0, "", enabled=False)
    stopper: Optional[StopAgreement] = None
    try:
        with StopRequest() as request:
            stopper = StopAgreement(request, info)
            if epoch_end_pending:
                # The run stopped after this epoch's last step, before evaluating it: evaluate now.
                end_epoch(epoch - 1, None, [])
            while run.step < max_steps and stopper.signum is None:
                first = run.step - epoch * steps_per_epoch
                stop = min(steps_per_epoch, max_steps - epoch * steps_per_epoch)
                sampler.set_epoch(epoch, first)
                if first == 0:
                    run.epoch_losses = []
                t_epoch, rates_before = time.perf_counter(), len(run.rates)
                progress = Progress(
                    steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=main, mode=args.progress, initial=first
                )
                batches = bad_train.batches(iter(loader), epoch)
                for in_epoch in range(first + 1, stop + 1):
                    _train_step(
                        args,
                        info,
                        run,
                        epoch,
                        ddp_model,
                        model,
                        batches,
                        optimizer,
                        scaler,
                        schedule,
                        ema,
                        mixup_fn,
                        params,
                        amp_dtype,
                    )
                    progress.update(1)
                    if args.debug_step_delay:
                        time.sleep(args.debug_step_delay)
                    if args.debug_signal_after_step == run.step and main:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if run.step % args.log_interval == 0:
                        flush()
                    # The run's last step ends it normally (evaluation, last checkpoint) whatever arrives.
                    if run.step < max_steps and stopper.poll():
                        break
                    # Mid-epoch checkpoints only: the epoch's last step is saved after its evaluation.
                    saved = bool(args.ckpt_interval) and run.step % args.ckpt_interval == 0 and in_epoch < stop
                    if saved:
                        save(epoch, evaluated=False)
                    if in_epoch < stop and (saved or run.step % args.log_interval == 0):
                        bad_check(epoch, saved=saved)
                    if args.debug_exit_after_step == run.step:
                        flush()
                        progress.close()
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(DEBUG_EXIT_CODE)
                flush()
                progress.close()
                if stopper.signum is None:
                    end_epoch(epoch, time.perf_counter() - t_epoch, run.rates[rates_before:])
                    # A signal that came during the evaluation stops the run here, saved already.
                    if run.step < max_steps:
                        stopper.poll()
                if stopper.signum is not None:
                    saved = run.last_ckpt is not None and run.last_ckpt[1] == run.step
                    _stop(stopper, run, epoch, steps_per_epoch, info, saved, say)
                    if not saved:
                        save(epoch, evaluated=False, epoch_end_pending=run.step % steps_per_epoch == 0)
                    break
                epoch += 1
    finally:
        progress.close()
        if stopper is not None:
            stopper.close()
    if stopper.signum is not None:
        barrier(info)  # nobody exits (and lets torchrun end the others) before the checkpoint is complete
    tb.close()

    # --- summary
    seconds = time.perf_counter() - t_start
    losses = [v for _, v in run.all_losses]
    first_interval = 1 if len(run.rates) > 1 else 0  # the first interval holds start-up and warm-up
    steady, waits = run.rates[first_interval:], run.waits[first_interval:]
    k = max(1, min(10, len(losses) // 4)) if losses else 0
    summary = {
        "output": out,
        "model": args.model,
        "model_kwargs": arch,
        "steps": run.step,
        "epochs": args.epochs,
        "seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_loss_mean": sum(losses[:k]) / k if k else None,
        "last_loss_mean": sum(losses[-k:]) / k if k else None,
        "images_per_s": sum(steady) / len(steady) if steady else None,
        "data_wait_fraction": sum(waits) / len(waits) if waits else None,
        "metrics": run.metrics,
        "ema_metrics": run.ema_metrics,
        "best": run.best,
        "checkpoint": run.last_ckpt[0] if run.last_ckpt else None,
        "bad_samples": {"train": bad_train.summary(), "val": bad_val.summary(), "max_bad_samples": max_bad},
        "stopped_by": signal_name(stopper.signum) if stopper.signum is not None else None,
        "stopped_signal": stopper.signum,
        # (not worth the time of a run that has a grace period to keep)
        "environment": _environment(info, amp_dtype, args, global_batch) if stopper.signum is None else None,
    }
    if stopper.signum is not None:
        return summary  # no summary.json: it marks a finished run
    if main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(plain(summary), f, indent=2)
    if losses:
        say(
            f"finished {run.step} steps in {seconds:.1f}s: loss {summary['first_loss_mean']:.4f} (first {k} steps) "
            f"-> {summary['last_loss_mean']:.4f} (last {k}) | {summary['images_per_s']:.1f} images/s "
            f"(data wait {100 * (summary['data_wait_fraction'] or 0):.0f}%)"
            + (f" | best top-1 {run.best['top1']:.2f}%" if run.best.get("top1") is not None else "")
        )
    return summary


def _environment(
    info: DistInfo, amp_dtype: Optional[torch.dtype], args: argparse.Namespace, global_batch: int
) -> Dict[str, Any]:
    """What a throughput number needs beside it: hardware, versions, precision, batch."""
    from qna_triton.env import capture_environment
    from qna_triton.ops import resolve_backend

    device = info.device
    env = capture_environment(device)
    return {
        "device": env.device_name,
        "capability": env.capability,
        "device_count": info.world_size,
        "torch": env.torch,
        "triton": env.triton,
        "cuda": env.cuda,
        "python": env.python,
        "qna_backend": resolve_backend(device),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "channels_last": args.channels_last,
        "compile": args.compile,
        "global_batch": global_batch,
        "img_size": args.img_size,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "date": env.date,
    }


def _train_step(
    args: argparse.Namespace,
    info: DistInfo,
    run: _Run,
    epoch: int,
    ddp_model: nn.Module,
    model: nn.Module,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: CosineLRScheduler,
    ema: Optional[ModelEmaV3],
    mixup_fn: Any,
    params: List[torch.Tensor],
    amp_dtype: Optional[torch.dtype],
) -> None:
    """One optimizer step over ``grad_accum_steps`` micro-batches; queues its loss in ``run.pending``
    (fetched later, so the GPU is not synchronised every step)."""
    device = info.device
    lr = set_step_lr(schedule, optimizer, run.step)
    # Model randomness (stochastic depth) is seeded per step and rank: a resumed run draws the same
    # masks without replaying the steps before it.
    torch.manual_seed(derive_seed(args.seed, run.step, info.rank, 1))
    loss_sum = torch.zeros((), device=device)
    data_wait = 0.0
    for micro in range(args.grad_accum_steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        data_wait += time.perf_counter() - t0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if mixup_fn is not None:
            x, target = mixup_fn(x, y, derive_seed(args.seed, run.step, micro, info.rank, 2))
        last_micro = micro == args.grad_accum_steps - 1
        sync = contextlib.nullcontext() if (last_micro or not info.enabled) else ddp_model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = ddp_model(x)
            loss = cross_entropy(logits, target, args.smoothing)
            if args.debug_nan_at_step == run.step + 1:
                loss = loss * float("nan")
            scaler.scale(loss / args.grad_accum_steps).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # a no-op without fp16; with it, the norm below is of the true gradients
    if args.clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    else:
        grad_norm = _grad_norm(params)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, run.step)
    run.step += 1
    run.pending.append(_Pending(run.step, epoch, loss_sum / args.grad_accum_steps, lr, grad_norm, data_wait))


def _stop(
    stopper: StopAgreement, run: _Run, epoch: int, steps_per_epoch: int, info: DistInfo, saved: bool, say: Any
) -> None:
    """Says that (and where) the run stops for a signal; in a group, every rank names its step."""
    name = signal_name(stopper.signum or 0)
    origin = f" (on rank {stopper.source_rank})" if info.enabled else ""
    say(
        f"{name} received{origin}: stopping after step {run.step} (epoch {epoch + 1}, batch "
        f"{run.step - epoch * steps_per_epoch} of {steps_per_epoch})"
        + (", its checkpoint written already" if saved else " and saving a checkpoint")
    )
    if info.enabled:
        print(f"[rank {info.rank}] stopping after step {run.step} ({name})", file=sys.stderr, flush=True)


def _logged_epoch_losses(path: str, epoch: int) -> List[float]:
    """Losses already logged for ``epoch`` (so a resumed epoch's mean train loss covers all its steps)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if int(r["epoch"]) == epoch]


def _restore(
    ckpt: Dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: Optional[ModelEmaV3],
    schedule: CosineLRScheduler,
    data_order: Dict[str, int],
    say: Any,
) -> None:
    """Loads a training checkpoint into the freshly built objects, warning where the run differs."""
    if "optimizer" not in ckpt or "step" not in ckpt:
        raise ValueError(
            "--resume needs a training checkpoint (with optimizer and step); to start from "
            "weights only, load them into the model instead"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        else:
            say("warning: the checkpoint has no EMA weights; the EMA restarts from the current model")
            ema.module.load_state_dict(model.state_dict())
    if ckpt.get("schedule") != schedule.state_dict():
        say(
            f"warning: the schedule differs from the checkpoint's ({ckpt.get('schedule')}); using "
            f"{schedule.state_dict()}"
        )
    if ckpt.get("data_order") != data_order:
        say(
            f"warning: data order differs from the checkpoint's ({ckpt.get('data_order')} vs {data_order}): "
            "the resumed run will not repeat the interrupted one exactly"
        )
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])


def verify_data(args: argparse.Namespace) -> int:
    """``--verify-data``: decodes every image of the train and val splits, prints each unreadable one
    and a count per split; returns the number of unreadable images."""
    total = 0
    for split in (args.train_split, args.val_split):
        try:
            ds = split_dataset(args.data_dir, split)
        except FileNotFoundError as e:
            print(f"{split}: skipped ({e})", flush=True)
            continue
        bad = verify_dataset(ds, workers=args.workers)
        for name, reason in bad:
            print(f"unreadable: {name} ({reason})", flush=True)
        print(f"{split}: {len(ds)} images ({describe_dataset(ds)}), {len(bad)} unreadable", flush=True)
        total += len(bad)
    return total


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point.

    Exits with status 3 (and the message) on a non-finite loss, 4 on more unreadable images than
    --max-bad-samples, 2 when ``--resume`` finds no usable checkpoint (a one-line message naming it),
    and, after a stop signal (SIGTERM, SIGINT, SIGUSR1) and its checkpoint, by that same signal: the
    status a kill would have given (128 + its number), with a line saying how to continue.
    ``--verify-data`` checks the data and exits (status 4 if any image is unreadable).
    """
    args = parse_args(argv)
    if args.verify_data:
        raise SystemExit(BAD_SAMPLES_EXIT_CODE if verify_data(args) else 0)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = train(args)
    except NonFiniteLossError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from e
    except TooManyBadSamplesError as e:
        if rank0 and not e.reported:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(BAD_SAMPLES_EXIT_CODE) from e
    except CheckpointError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(CHECKPOINT_ERROR_EXIT_CODE) from None
    signum = summary.get("stopped_signal")
    if signum:
        if rank0:
            print(
                f"stopped by {summary['stopped_by']} after step {summary['steps']}: checkpoint "
                f"{summary['checkpoint']}; continue with the same command and --resume {summary['output']}",
                file=sys.stderr,
                flush=True,
            )
        exit_by_signal(signum)
    return summary


if __name__ == "__main__":
    main()
