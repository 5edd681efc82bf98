"""QnA-ViT, the hierarchical vision transformer of "Learned Queries for Efficient Local Attention"
(Arar, Shamir, Bermano, CVPR 2022), on :class:`qna_triton.QnA`.

Installed with qna-triton as the package ``qna_vit`` (its source lives in ``examples/qna_vit/``); it
requires timm, the ``vit`` extra (``pip install "qna-triton[vit]"``)::

    from qna_vit import create_model, load_flax_params
    model = create_model("qna_vit_tiny")                  # 15,715,560 parameters

One module per concern:

* :mod:`qna_vit.config`: :class:`QnAViTConfig` and the paper's four models;
* :mod:`qna_vit.layers`: the building blocks (blocks, stages, stems, head);
* :mod:`qna_vit.model`: :class:`QnAViT`, :func:`create_model` and the timm entry points (importing the
  package registers the four models with timm);
* :mod:`qna_vit.flax`: the original (Flax) checkpoints: parameter names, load and export, msgpack reading;
* :mod:`qna_vit.resize`: a checkpoint fitted to another geometry (``jax.image.resize``'s bicubic), the
  load report, :func:`load_weights` for our own checkpoints;
* :mod:`qna_vit.fx`: ``torch.fx`` tracing with the QnA layer and the shape-dependent helpers as leaves;
* :mod:`qna_vit.training`: the data, augmentation, checkpoint, distributed and engine code behind
  ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py``.
"""

try:
    import timm  # noqa: F401
except ImportError as e:  # the one dependency qna_vit adds to qna_triton
    raise ImportError(
        "qna_vit requires timm, for its layers, model registry and training pipeline: "
        'pip install "qna-triton[vit]" (or pip install timm)'
    ) from e

from .config import FINETUNE_384, MODEL_CONFIGS, QnAViTConfig
from .flax import export_flax_batch_stats, export_flax_params, load_flax_params
from .fx import fx_tracer_kwargs, symbolic_trace
from .model import QnAViT, create_model, qna_vit_base, qna_vit_small, qna_vit_tiny, qna_vit_tiny_7x7
from .resize import LoadReport, load_weights, resize_state_dict, resize_table

__all__ = [
    "QnAViT",
    "QnAViTConfig",
    "MODEL_CONFIGS",
    "FINETUNE_384",
    "LoadReport",
    "create_model",
    "load_flax_params",
    "load_weights",
    "resize_state_dict",
    "resize_table",
    "export_flax_params",
    "export_flax_batch_stats",
    "fx_tracer_kwargs",
    "symbolic_trace",
    "qna_vit_tiny",
    "qna_vit_tiny_7x7",
    "qna_vit_small",
    "qna_vit_base",
]
