"""QnA-ViT, the hierarchical vision transformer of "Learned Queries for Efficient Local Attention"
(Arar, Shamir, Bermano, CVPR 2022), on :class:`qna_triton.QnA`.

Installed with qna-triton as the package ``qna_vit`` (its source lives in ``examples/qna_vit/``)::

    from qna_vit import create_model, load_flax_params
    model = create_model("qna_vit_tiny")                  # 15,715,560 parameters

* :mod:`qna_vit.model`: the models, their configs and the original (Flax) parameter mapping; importing
  the package registers the four models with timm when timm is installed;
* :mod:`qna_vit.training`: the data, augmentation, checkpoint, distributed and engine code behind
  ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py``.
"""

from .model import *  # noqa: F401,F403
from .model import __all__  # noqa: F401
