"""Converts an original QnA-ViT checkpoint (Flax msgpack, ``flax.training.checkpoints``) to PyTorch.

    python examples/convert_flax.py --model qna_vit_tiny path/to/checkpoint_300 qna_vit_tiny.pt

Needs only ``msgpack`` and numpy: no JAX. The input is a msgpack file (or a checkpoint directory, whose
newest ``checkpoint_<step>`` file is taken) holding the saved train state; the parameters sit under
its ``params`` key (``state['params']``, or ``state['params']['params']`` when a whole variables dict
was saved). The output is ``torch.save({'model': state_dict, 'model_name': ..., 'model_args': ...})``;
:func:`qna_vit.flax.load_converted` rebuilds the model from it.

The number of classes, the stem and the presence of layer scales are read from the checkpoint; the
``qnav1``/``qnav2`` heads have the same parameters, so those need ``--head``.

Into another geometry (fine-tuning): ``--model-kwargs`` changes the architecture's windows or resolution
and ``--num-classes`` the classifier; the position and attention-scale tables are then resized as the
original's fine-tuning does (``jax.image.resize(..., 'bicubic')``), a new classifier is initialised, and
a report lists what was loaded, resized and newly initialised::

    python examples/convert_flax.py --model qna_vit_tiny --num-classes 100 path/to/checkpoint_300 \\
        qna_vit_tiny_384.pt --model-kwargs img_size=384 lsa_window=12,12,24,12

The conversion itself (the msgpack reader, the parameter mapping, the resize) is :mod:`qna_vit.flax`;
this script is its command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from qna_triton import CheckpointError
from qna_vit import MODEL_CONFIGS
from qna_vit.flax import convert
from qna_vit.training.engine import parse_model_kwargs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Convert an original QnA-ViT Flax msgpack checkpoint to PyTorch.")
    ap.add_argument("--model", required=True, choices=sorted(MODEL_CONFIGS), help="architecture of the checkpoint")
    ap.add_argument(
        "--head",
        choices=("gap", "qnav1", "qnav2"),
        default=None,
        help="classification head (needed for the QnA heads, which share their parameters)",
    )
    ap.add_argument("--img-size", type=int, default=None, help="training resolution (qnav heads only; 224)")
    ap.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="another geometry to load into, e.g. img_size=384 lsa_window=12,12,24,12 (tables resized)",
    )
    ap.add_argument("--num-classes", type=int, default=None, help="a new classifier for this many classes")
    ap.add_argument("input", help="Flax msgpack checkpoint file, or a directory of checkpoint_<step> files")
    ap.add_argument("output", help="PyTorch checkpoint to write (.pt)")
    args = ap.parse_args(argv)
    try:
        model, report = convert(
            args.model,
            args.input,
            args.output,
            head=args.head,
            img_size=args.img_size,
            model_kwargs=parse_model_kwargs(args.model_kwargs),
            num_classes=args.num_classes,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n:,} parameters, {model.num_classes} classes -> {args.output}")
    if report.resized or report.initialised or report.dropped:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
