"""QnA-ViT as a dense-prediction backbone: a small semantic-segmentation head on its 4-level feature
pyramid (strides 4, 8, 16, 32), trained for a few steps on generated images.

    python examples/segment.py --model qna_vit_tiny --steps 200 --img-size 128
    python examples/segment.py --width 16 --steps 50        # a reduced backbone: quick on a CPU

The pyramid comes from timm's ``features_only=True`` wrapper (``--backend timm``, the default) or from
the model's own ``forward_intermediates`` (``--backend qna_vit``); both give the same NCHW maps, their
channels read off ``feature_info``. Any input size works: the LSA windows pad and mask maps they
do not tile. The head is a light FPN: a 1x1 projection of every level, all summed at stride 4, one 3x3
conv, a per-pixel classifier and a bilinear up-sampling to the input size.

The generated data: noise images with a few filled rectangles and discs; the label of a pixel is the
shape class covering it (0 for background).
"""

# The command line of :mod:`qna_vit.segment` (installed with qna-triton); this file is its checkout entry point.
import sys

from qna_vit.segment import main

if __name__ == "__main__":
    main()
    sys.exit(0)
