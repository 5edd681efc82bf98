"""qna-triton: fused Triton kernels for QnA, local attention with learned queries.

``from qna_triton import QnA`` gives the layer; :func:`qna_attention` is the core op on precomputed
logits and values; :mod:`qna_triton.reference` holds the pure-PyTorch references.
"""

from .flax_params import CheckpointError
from .functional import qna_attention
from .layer import ATTN_SCALE_MODES, QnA

__version__ = "0.1.0"
__all__ = ["QnA", "qna_attention", "CheckpointError", "ATTN_SCALE_MODES", "__version__"]
