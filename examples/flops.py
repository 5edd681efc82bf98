"""Parameters and GFLOPs of the QnA-ViT models (multiply-adds counted as one FLOP, like the paper/fvcore).

    python examples/flops.py [--img-size 224] [--models qna_vit_tiny ...]

One forward pass runs under ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix
products, convolutions and the LSA attention. The QnA core op is a custom op (``qna::*``) the counter
cannot see into, so every QnA layer adds its core cost analytically (:func:`qna_core_macs`) from a
forward hook, whatever op the library runs inside.
"""

# The command line of :mod:`qna_vit.flops` (installed with qna-triton); this file is its checkout entry point.
import sys

from qna_vit.flops import main

if __name__ == "__main__":
    sys.exit(main())
