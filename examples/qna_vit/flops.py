"""Parameters and GFLOPs of the QnA-ViT models (multiply-adds counted as one FLOP, like the paper/fvcore).

    python examples/flops.py [--img-size 224] [--models qna_vit_tiny ...]

One forward pass runs under ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix
products, convolutions and the LSA attention. The QnA core op is a custom op (``qna::*``) the counter
cannot see into, so every QnA layer adds its core cost analytically (:func:`qna_core_macs`) from a
forward hook, whatever op the library runs inside.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from qna_triton import QnA
from qna_vit import MODEL_CONFIGS, create_model

__all__ = ["PAPER", "count_flops", "qna_core_macs", "main"]

# (parameters, GFLOPs) as docs/spec.md section 2.4 gives them for 1000 classes and 224x224 inputs.
PAPER: Dict[str, Tuple[int, float]] = {
    "qna_vit_tiny": (15_715_560, 2.5),
    "qna_vit_tiny_7x7": (15_753_960, 2.6),
    "qna_vit_small": (24_971_560, 4.4),
    "qna_vit_base": (55_670_008, 9.7),
}


def qna_core_macs(layer: QnA, input_shape: Sequence[int]) -> int:
    """Multiply-adds of ``layer``'s attention core (not its projections) on a ``[B, H, W, C_in]`` input.

    Per output pixel, head and query, each of the ``k_h * k_w`` window offsets costs ``d`` multiply-adds
    for the weighted values and one for the normaliser.
    """
    B, H, W = input_shape[0], input_shape[1], input_shape[2]
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    return B * Ho * Wo * layer.n_queries * layer.heads * kh * kw * (layer.head_dim + 1)


@torch.no_grad()
def count_flops(model: torch.nn.Module, img_size: int = 224, in_chans: Optional[int] = None) -> int:
    """Multiply-adds of one forward pass of ``model`` on one ``img_size`` x ``img_size`` image (or, for a
    bare :class:`QnA` layer, pass ``img_size`` as its ``[B, H, W, C_in]`` input shape)."""
    core = 0

    def add_core(layer: QnA, args: tuple) -> None:
        nonlocal core
        core += qna_core_macs(layer, args[0].shape)

    hooks = [m.register_forward_pre_hook(add_core) for m in model.modules() if isinstance(m, QnA)]
    was_training = model.training
    model.eval()
    if isinstance(model, QnA):
        x = torch.zeros(tuple(img_size))
    else:
        chans = in_chans or getattr(getattr(model, "config", None), "in_chans", 3)
        x = torch.zeros(1, chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts().get("Global", {})
    # Leave out anything counted for the QnA ops themselves, so the core is never counted twice.
    other = sum(n for op, n in counts.items() if not str(op).startswith("qna."))
    return other // 2 + core  # the counter counts 2 FLOPs per multiply-add


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=sorted(MODEL_CONFIGS))
    args = ap.parse_args(argv)
    print(f"{'model':<18} {'params':>12} {'GFLOPs':>7}   paper: {'params':>12} {'GFLOPs':>6}  (at 224)")
    for name in args.models:
        model = create_model(name, num_classes=args.num_classes)
        params = sum(p.numel() for p in model.parameters())
        gflops = count_flops(model, args.img_size) / 1e9
        ref_params, ref_gflops = PAPER[name]
        print(f"{name:<18} {params:>12,} {gflops:>7.2f}          {ref_params:>12,} {ref_gflops:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
