"""Evaluate a QnA-ViT checkpoint: top-1 / top-5 accuracy, loss and images/s.

Checkpoints: those of ``examples/train.py`` (``last.pth``/``best.pth``, or a run folder: its newest
readable checkpoint, naming any it skipped; ``--ema`` takes the EMA weights) and those of ``examples/convert_flax.py`` (``{'model': state_dict, 'model_name': name}``).
Data: an ImageFolder validation split (``--data-dir``: the split folder itself, or a root holding
``--split``), WebDataset tar shards (``--data-dir`` holding ``<split>-*.tar``) or the generated set
(``--synthetic``; a checkpoint trained on it supplies its parameters). Images that cannot be decoded
are left out with a warning naming each, and counted.

    python examples/eval.py --checkpoint runs/train/<run>/best.pth --data-dir /data/imagenet
    python examples/eval.py --checkpoint qna_vit_tiny.pth --data-dir /data/imagenet/val --amp --channels-last

Prints the accuracy line, the end-to-end rate (data loading included) and the model-only rate (forward
passes on one resident batch, timed after warm-up); ``--results-file`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from qna_vit import MODEL_CONFIGS, QnAViTConfig, create_model
from qna_vit.training.checkpoint import CheckpointError, load_newest
from qna_vit.training.data import (
    AugConfig,
    BadSampleLog,
    DataSpec,
    SeededDataset,
    TarShardDataset,
    TrackedLoader,
    build_dataset,
    build_transform,
    collate_samples,
    image_folder,
    shard_files,
)
from qna_vit.training.distributed import DistInfo
from qna_vit.training.engine import evaluate, parse_model_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint file, or train.py run folder (its newest readable checkpoint)"
    )
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--model", default=None, choices=sorted(MODEL_CONFIGS), help="default: the checkpoint's")
    p.add_argument(
        "--model-kwargs",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="QnAViTConfig overrides (default: the checkpoint's)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="ImageFolder split folder, a root holding --split, or a folder of <split>-*.tar shards",
    )
    p.add_argument("--split", default="val")
    p.add_argument("--synthetic", action="store_true", help="the generated set (its val split)")
    p.add_argument("--synthetic-classes", type=int, default=None)
    p.add_argument("--synthetic-val-size", type=int, default=None)
    p.add_argument("--synthetic-image-size", type=int, default=None)
    p.add_argument("--synthetic-seed", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's training size, or 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: the checkpoint's, or 0.875")
    p.add_argument("--interpolation", default=None, choices=("bicubic", "bilinear"))
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=8)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on for CUDA)")
    p.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bench-steps", type=int, default=20, help="timed forward passes for the model-only rate (0: skip)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results-file", default=None, help="write the results as JSON here")
    return p


def model_from_checkpoint(
    ckpt: Dict[str, Any],
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    ema: bool = False,
) -> Tuple[nn.Module, str]:
    """Builds the checkpoint's model and loads its weights (``ema``: the EMA weights); returns it and its name.

    The architecture is ``model_name`` (else the checkpoint's ``model_name``) with ``model_kwargs`` (else
    the checkpoint's ``model_kwargs``, or ``model_args`` for convert_flax.py's files); the class count
    comes from the classifier's weight.
    """
    name = model_name or ckpt.get("model_name")
    if name is None:
        raise ValueError("the checkpoint does not name its model: pass --model")
    if ema:
        if ckpt.get("ema") is None:
            raise ValueError("--ema: the checkpoint holds no EMA weights (train with --model-ema)")
        state = ckpt["ema"]
    else:
        state = ckpt["model"]
    # train.py saves the architecture as "model_kwargs", convert_flax.py as "model_args".
    saved = ckpt.get("model_kwargs") or ckpt.get("model_args") or {}
    kwargs = dict(saved) if model_kwargs is None else dict(model_kwargs)
    kwargs.pop("num_classes", None)
    fields = {f.name for f in dataclasses.fields(QnAViTConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}")
    fc = state.get("head.fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else 0
    if num_classes == 0:
        raise ValueError("the checkpoint has no classifier (head.fc.weight): nothing to evaluate top-1 with")
    model = create_model(name, num_classes=num_classes, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match {name} {kwargs or ''}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} (pass --model/--model-kwargs of its architecture)"
        )
    return model, name


@torch.no_grad()
def model_throughput(
    model: nn.Module, x: torch.Tensor, steps: int, amp_dtype: Optional[torch.dtype], warmup: int = 3
) -> float:
    """Images/s of forward passes on the resident batch ``x``, timed after ``warmup`` passes."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(x)
    sync()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluates as the command line says; prints the results and returns them.

    Exits with status 2 and a one-line message when ``--checkpoint`` names no usable checkpoint.
    """
    args = build_parser().parse_args(argv)
    if not args.synthetic and not args.data_dir:
        raise SystemExit("give --data-dir (ImageFolder) or --synthetic")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    use_amp = args.amp if args.amp is not None else use_cuda
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16) if use_amp else None

    try:
        ckpt, path, skipped = load_newest(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    for file, reason in skipped:
        print(f"warning: skipped checkpoint {file}: {reason}", file=sys.stderr, flush=True)
    kwargs = None
    if args.model_kwargs is not None:
        kwargs = parse_model_kwargs(args.model_kwargs)
    model, name = model_from_checkpoint(ckpt, args.model, kwargs, ema=args.ema)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run_model: nn.Module = torch.compile(model) if args.compile else model

    saved = ckpt.get("data") or {}
    saved_spec, saved_aug = saved.get("spec") or {}, saved.get("aug") or {}
    train_args = ckpt.get("args") or {}
    arch = ckpt.get("model_kwargs") or ckpt.get("model_args") or {}
    img_size = args.img_size or saved_aug.get("img_size") or train_args.get("img_size") or arch.get("img_size") or 224
    img_size = img_size[0] if isinstance(img_size, (tuple, list)) else int(img_size)
    aug = AugConfig(
        img_size=img_size,
        crop_pct=args.crop_pct or saved_aug.get("crop_pct") or 0.875,
        interpolation=args.interpolation or saved_aug.get("interpolation") or "bicubic",
    )
    if args.synthetic:

        def pick(flag: Optional[int], key: str, default: int) -> int:
            return flag if flag is not None else int(saved_spec.get(key) or default)

        spec = DataSpec(
            synthetic=True,
            synthetic_classes=pick(args.synthetic_classes, "synthetic_classes", 10),
            synthetic_val_size=pick(args.synthetic_val_size, "synthetic_val_size", 500),
            synthetic_image_size=pick(args.synthetic_image_size, "synthetic_image_size", img_size),
            synthetic_seed=pick(args.synthetic_seed, "synthetic_seed", 0),
        )
        dataset, _ = build_dataset(spec, "val", as_pil=True)
        source = (
            f"generated shapes (val, {spec.synthetic_classes} classes, {spec.synthetic_image_size}px, "
            f"seed {spec.synthetic_seed})"
        )
    elif shard_files(args.data_dir, args.split):
        dataset = TarShardDataset(shard_files(args.data_dir, args.split))
        source = f"{args.data_dir} ({len(dataset.shards)} tar shard(s) {args.split}-*.tar)"
    else:
        folder = os.path.join(args.data_dir, args.split)
        folder = folder if os.path.isdir(folder) else args.data_dir
        dataset = image_folder(folder)
        source = folder
    tf_dataset = SeededDataset(dataset, build_transform(aug, False), replace_bad=False)
    unreadable = BadSampleLog("left out of the evaluation")
    loader = TrackedLoader(
        DataLoader(
            tf_dataset,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.workers,
            pin_memory=use_cuda,
            collate_fn=collate_samples,
        ),
        unreadable,
    )

    from qna_triton.env import capture_environment
    from qna_triton.ops import resolve_backend

    env = capture_environment(device)
    n_params = sum(p.numel() for p in model.parameters())
    gpu = f" ({env.device_name})" if use_cuda else ""
    step = f", step {ckpt['step']}" if "step" in ckpt else ""
    print(
        f"checkpoint: {path} ({name}, {n_params / 1e6:.2f}M parameters, {model.num_classes} classes{step}"
        f"{', EMA weights' if args.ema else ''})"
    )
    print(
        f"device: {device}{gpu} | QnA backend: {resolve_backend(device)} | precision: "
        f"{'autocast ' + args.amp_dtype if amp_dtype else 'float32'} | channels-last: {args.channels_last} | "
        f"compile: {args.compile}"
    )
    print(f"data: {source}: {len(dataset)} images at {img_size}x{img_size} (crop {aug.crop_pct})")
    # One batch, transformed in this process: warms the model up (lazy imports, compilation, kernel
    # configs) so the timed pass measures steady state, then serves the model-only rate.
    first: List[torch.Tensor] = []
    for i in range(len(tf_dataset)):
        if len(first) == args.batch_size:
            break
        image = tf_dataset[i][0]  # None for an unreadable image, which the loader pass reports
        if image is not None:
            first.append(image)
    if not first:
        raise SystemExit(f"no readable image in {source}")
    x = torch.stack(first).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        run_model(x)
    info = DistInfo(1, 0, 0, device, None)
    metrics = evaluate(run_model, loader, device, info, amp_dtype, args.channels_last)
    unreadable.sync()
    if unreadable.count():
        print(f"{unreadable.count()} unreadable image(s) left out: {unreadable.listing()}")
    print(
        f"top-1 {metrics['top1']:.3f}% | top-5 {metrics['top5']:.3f}% | loss {metrics['loss']:.4f} | "
        f"{metrics['images']} images"
    )
    result: Dict[str, Any] = {
        "checkpoint": path,
        "model": name,
        "ema": args.ema,
        "device": str(device) + gpu,
        "img_size": img_size,
        "batch_size": args.batch_size,
        "precision": args.amp_dtype if amp_dtype else "float32",
        **metrics,
        "bad_samples": unreadable.summary()["files"],
        "environment": env.as_dict(),
    }
    line = f"throughput: {metrics['images_per_s']:.1f} images/s end-to-end"
    if args.bench_steps > 0:
        rate = model_throughput(run_model, x, args.bench_steps, amp_dtype)
        result["model_images_per_s"] = rate
        line += f" | {rate:.1f} images/s model only (batch {x.shape[0]}, {args.bench_steps} timed passes)"
    print(line)
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
