"""The original (Flax) checkpoints: the parameter names and layouts of a :class:`~qna_vit.model.QnAViT`,
:func:`load_flax_params` / :func:`export_flax_params`, and the msgpack reader (``flax.training.checkpoints``
files, numpy and ``msgpack`` only: no JAX) with :func:`convert`, behind ``examples/convert_flax.py``."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from qna_triton import CheckpointError, QnA
from qna_triton.flax_params import check_tree, flatten_tree

from .config import MODEL_CONFIGS
from .layers import Block, LayerScale, PatchStem, StridedProjection
from .model import QnAViT, create_model
from .resize import LoadReport, _plan_load, _resize_leaf

# How one original array maps onto one PyTorch tensor:
#   copy  - same layout
#   dense - Flax Dense kernel [in, out] <-> nn.Linear weight [out, in]
#   conv  - Flax Conv kernel HWIO <-> nn.Conv2d weight OIHW
#   skip  - the 1x1 stride-2 Conv kernel [1, 1, C, C_out] <-> StridedProjection's nn.Linear weight
_TO_TORCH = {
    "copy": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "skip": lambda a: a[0, 0].T,
}
_TO_FLAX = {
    "copy": lambda t: t,
    "dense": lambda t: t.t(),
    "conv": lambda t: t.permute(2, 3, 1, 0),
    "skip": lambda t: t.t()[None, None],
}
_FLAX_SHAPE = {
    "copy": lambda s: tuple(s),
    "dense": lambda s: (s[1], s[0]),
    "conv": lambda s: (s[2], s[3], s[1], s[0]),
    "skip": lambda s: (1, 1, s[1], s[0]),
}

Entry = Tuple[torch.Tensor, str]


def _qna_entries(prefix: str, layer: QnA) -> Dict[str, Entry]:
    entries: Dict[str, Entry] = {}
    for key, shape in layer.flax_param_shapes().items():
        owner, _, leaf = key.rpartition("/")
        if owner in ("to_v", "to_out"):
            linear = getattr(layer, owner)
            entry = (linear.weight, "dense") if leaf == "kernel" else (linear.bias, "copy")
        else:
            entry = (getattr(layer, key), "copy")  # query, Wk, Wk_b, rpe_bias, attn_scale_*: Flax layouts
        if _FLAX_SHAPE[entry[1]](entry[0].shape) != tuple(shape):
            raise RuntimeError(f"internal: QnA parameter {key!r} does not map onto the layer ({shape})")
        entries[f"{prefix}/{key}"] = entry
    return entries


def _norm_entries(prefix: str, norm: nn.Module) -> Dict[str, Entry]:
    return {f"{prefix}/scale": (norm.weight, "copy"), f"{prefix}/bias": (norm.bias, "copy")}


def _block_entries(prefix: str, block: Block) -> Dict[str, Entry]:
    e = _norm_entries(f"{prefix}/LayerNorm_0", block.norm1)
    mixer = block.mixer
    if isinstance(mixer, QnA):
        e.update(_qna_entries(f"{prefix}/FusedKQnA_0", mixer))
    else:
        m = f"{prefix}/MultiHeadSelfAttention_0"
        e[f"{m}/to_qkv/kernel"] = (mixer.to_qkv.weight, "dense")
        e[f"{m}/to_out/kernel"] = (mixer.to_out.weight, "dense")
        e[f"{m}/RelativePositionalEmbedding_0/rpe_bias"] = (mixer.relative_position_bias_table, "copy")
    if isinstance(block.skip, StridedProjection):
        e[f"{prefix}/Conv_0/kernel"] = (block.skip.proj.weight, "skip")
    if isinstance(block.ls1, LayerScale):
        e[f"{prefix}/LayerScale_0/scale_param"] = (block.ls1.gamma, "copy")
        e[f"{prefix}/LayerScale_1/scale_param"] = (block.ls2.gamma, "copy")
    e.update(_norm_entries(f"{prefix}/LayerNorm_1", block.norm2))
    for i, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
        e[f"{prefix}/MlpBlock_0/Dense_{i}/kernel"] = (fc.weight, "dense")
        e[f"{prefix}/MlpBlock_0/Dense_{i}/bias"] = (fc.bias, "copy")
    return e


def _flax_entries(model: QnAViT) -> Tuple[Dict[str, Entry], Dict[str, Entry]]:
    """Every original parameter (and batch statistic) name with its tensor and layout mapping."""
    params: Dict[str, Entry] = {}
    stats: Dict[str, Entry] = {}
    stem = model.stem
    if isinstance(stem, PatchStem):
        params["StemBlock_0/conv_1x1/kernel"] = (stem.conv.weight, "conv")
    else:
        params["StemBlock_0/conv_7x7/kernel"] = (stem.conv.weight, "conv")
        params.update(_norm_entries("StemBlock_0/BatchNorm_0", stem.bn))
        stats["StemBlock_0/BatchNorm_0/mean"] = (stem.bn.running_mean, "copy")
        stats["StemBlock_0/BatchNorm_0/var"] = (stem.bn.running_var, "copy")
    for s, stage in enumerate(model.stages):
        # Flax names a stage's LSA and QnA halves as two modules with the same stage index; a half
        # without parameters does not appear in the tree at all.
        for i, blk in enumerate(stage.lsa_blocks):
            params.update(_block_entries(f"LSAStage_{s}/MSA_Block_{i + 1}", blk))
        for i, blk in enumerate(stage.qna_blocks):
            params.update(_block_entries(f"QnAStage_{s}/QnA_Block_{i + 1}", blk))
        if stage.downsample is not None:
            name = f"QnAStage_{s}/QnA_Block_{len(stage.qna_blocks) + 1}_stride_2"
            params.update(_block_entries(name, stage.downsample))
    head = model.head
    params.update(_norm_entries("ClassificationHead_0/LayerNorm_0", head.norm))
    if head.qna is not None:
        params.update(_qna_entries("ClassificationHead_0/FusedKQnA_0", head.qna))
    if isinstance(head.fc, nn.Linear):
        params["ClassificationHead_0/head_logits/kernel"] = (head.fc.weight, "dense")
        params["ClassificationHead_0/head_logits/bias"] = (head.fc.bias, "copy")
    return params, stats


def flax_param_shapes(model: QnAViT) -> Dict[str, Tuple[int, ...]]:
    """The original parameter names (``/``-joined) and shapes of ``model``'s configuration."""
    params, _ = _flax_entries(model)
    return {k: _FLAX_SHAPE[kind](t.shape) for k, (t, kind) in params.items()}


@torch.no_grad()
def export_flax_params(model: QnAViT) -> Dict[str, Any]:
    """``model``'s parameters as the original nested parameter tree (float32 numpy arrays, Flax layouts);
    the inverse of :func:`load_flax_params`."""
    params, _ = _flax_entries(model)
    return _unflatten({k: _TO_FLAX[kind](t.detach()) for k, (t, kind) in params.items()})


@torch.no_grad()
def export_flax_batch_stats(model: QnAViT) -> Dict[str, Any]:
    """The original ``batch_stats`` collection of ``model`` (empty unless it has the ``resnet`` stem)."""
    _, stats = _flax_entries(model)
    return _unflatten({k: t.detach() for k, (t, _) in stats.items()})


def _unflatten(flat: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for key, t in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(t.float().cpu().numpy())
    return tree


# The classifier a resizing load may leave newly initialised (another class count).
_FLAX_CLASSIFIER = ("ClassificationHead_0/head_logits/kernel", "ClassificationHead_0/head_logits/bias")


@torch.no_grad()
def load_flax_params(
    model: QnAViT, params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]] = None, resize: bool = False
) -> LoadReport:
    """Loads an original QnA-ViT parameter tree (nested dicts of arrays, Flax names) into ``model``.

    Every entry is mapped and every shape checked before anything is copied: a missing, unexpected or
    mis-shaped key raises :class:`qna_triton.CheckpointError` naming it, and leaves ``model`` untouched.

    With ``resize=True`` (fine-tuning from a checkpoint of another geometry: other LSA windows, another
    QnA window, another resolution for a ``qnav*`` head) every position and attention-scale table whose
    shape differs is resized as the original does (:func:`resize_table`), and a classifier for another
    class count (or absent on either side) is left newly initialised; anything else mismatched still
    raises.

    Args:
        model: a :class:`QnAViT` of the checkpoint's architecture (depths, widths, stem, layer scale).
        params: the ``params`` collection of the original train state.
        batch_stats: the ``batch_stats`` collection; needed (only) by the ``resnet`` stem's BatchNorm.
        resize: resize mismatched tables and allow a new classifier.

    Returns:
        A :class:`LoadReport` of what was loaded, resized and newly initialised.
    """
    if not isinstance(model, QnAViT):
        raise TypeError(f"model must be a QnAViT, got {type(model).__name__}")
    entries, stat_entries = _flax_entries(model)
    flat = flatten_tree(params)
    expected = {k: _FLAX_SHAPE[kind](t.shape) for k, (t, kind) in entries.items()}
    report = _plan_load(expected, {k: v.shape for k, v in flat.items()}, _FLAX_CLASSIFIER, resize, "params: ")
    for key in report.loaded + list(report.resized):
        if not np.issubdtype(flat[key].dtype, np.floating):
            raise CheckpointError(f"params: key {key!r} has dtype {flat[key].dtype}, expected a float array")
    flat_stats = flatten_tree(batch_stats) if batch_stats is not None else {}
    if stat_entries and batch_stats is None:
        raise CheckpointError(
            f"batch_stats: missing key {sorted(stat_entries)[0]!r}: the resnet stem's BatchNorm needs the "
            "checkpoint's batch_stats collection"
        )
    check_tree(flat_stats, {k: tuple(t.shape) for k, (t, _) in stat_entries.items()}, where="batch_stats: ")
    values = {k: flat[k] for k in report.loaded}
    values.update({k: _resize_leaf(k, flat[k], new) for k, (_, new) in report.resized.items()})
    for source, table in ((values, entries), (flat_stats, stat_entries)):
        for key, value in source.items():
            tensor, kind = table[key]
            tensor.copy_(torch.from_numpy(np.array(_TO_TORCH[kind](value), dtype=np.float32)))
    return report


# flax.serialization's msgpack extension codes.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _array_from_ext(payload: bytes) -> np.ndarray:
    """An array from the extension payload: a msgpack triple ``(shape, dtype name, C-order bytes)``."""
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":  # not a numpy dtype: widen the 16 bits to the top half of a float32
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(name)).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
    import msgpack

    if code == _EXT_NDARRAY:
        return _array_from_ext(payload)
    if code == _EXT_NPSCALAR:
        return _array_from_ext(payload)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    return msgpack.ExtType(code, payload)


def _unchunk(node: Any) -> Any:
    """Arrays over 1 GiB are saved as ``{_CHUNKED: True, 'shape': {'0': ..}, 'chunks': {'0': ..}}``."""
    if not isinstance(node, dict):
        return node
    if node.get(_CHUNKED):
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in node.items()}


def _resolve_path(path: str) -> str:
    if not os.path.isdir(path):
        return path
    steps = [(int(m.group(1)), f) for f in os.listdir(path) if (m := re.fullmatch(r"checkpoint_(\d+)", f))]
    if not steps:
        raise FileNotFoundError(f"{path} is a directory without any checkpoint_<step> msgpack file")
    return os.path.join(path, max(steps)[1])


def read_flax_checkpoint(path: str) -> Dict[str, Any]:
    """The state tree of a ``flax.training.checkpoints`` msgpack file (nested dicts, numpy leaves)."""
    try:
        import msgpack
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading Flax checkpoints needs msgpack: pip install msgpack") from e
    with open(_resolve_path(path), "rb") as f:
        data = f.read()
    try:
        state = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CheckpointError(f"{path} is not a Flax msgpack checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a saved train state (a map), got {type(state).__name__}")
    return _unchunk(state)


def split_train_state(state: Mapping[str, Any]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """``(params, batch_stats)`` of a saved train state; also accepts a bare variables or params tree."""
    if "StemBlock_0" in state:  # a bare parameter tree
        return dict(state), None
    if "params" not in state or not isinstance(state["params"], Mapping):
        raise CheckpointError(f"no 'params' collection in the checkpoint (top-level keys: {sorted(state)})")
    params = state["params"]
    batch_stats = state.get("batch_stats")
    if "params" in params and "StemBlock_0" not in params:  # a whole variables dict was saved as params
        batch_stats = params.get("batch_stats", batch_stats)
        params = params["params"]
    return dict(params), (dict(batch_stats) if isinstance(batch_stats, Mapping) and batch_stats else None)


def infer_model_args(params: Mapping[str, Any], head: Optional[str] = None) -> Dict[str, Any]:
    """The :func:`qna_vit.create_model` options a parameter tree implies (classes, stem, layer scale, head)."""
    args: Dict[str, Any] = {}
    head_tree = params.get("ClassificationHead_0", {})
    logits = head_tree.get("head_logits", {}) if isinstance(head_tree, Mapping) else {}
    kernel = logits.get("kernel") if isinstance(logits, Mapping) else None
    args["num_classes"] = int(np.shape(kernel)[1]) if kernel is not None and np.ndim(kernel) == 2 else 0
    stem = params.get("StemBlock_0", {})
    args["stem"] = "resnet" if isinstance(stem, Mapping) and "conv_7x7" in stem else "patch"

    def has_layer_scale(node: Any) -> bool:
        return isinstance(node, Mapping) and any(
            k.startswith("LayerScale_") or has_layer_scale(v) for k, v in node.items()
        )

    if has_layer_scale(params):
        args["layer_scale"] = 1.0  # only the initial value; the checkpoint's values are loaded over it
    has_qna_head = isinstance(head_tree, Mapping) and "FusedKQnA_0" in head_tree
    if has_qna_head and head not in ("qnav1", "qnav2"):
        raise CheckpointError(
            "the checkpoint has a QnA classification head (ClassificationHead_0/FusedKQnA_0): "
            "pass --head qnav1 or --head qnav2"
        )
    if not has_qna_head and head not in (None, "gap"):
        raise CheckpointError(f"--head {head} needs ClassificationHead_0/FusedKQnA_0, which the checkpoint lacks")
    args["head"] = head or "gap"
    return args


def convert(
    model_name: str,
    src: str,
    dst: str,
    head: Optional[str] = None,
    img_size: Optional[int] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    num_classes: Optional[int] = None,
) -> Tuple[QnAViT, LoadReport]:
    """Reads the Flax checkpoint ``src``, loads it into a ``model_name`` QnA-ViT, saves it to ``dst``.

    ``model_kwargs`` (architecture overrides: windows, resolution) and ``num_classes`` load it into
    another geometry, resizing its tables (``load_flax_params(..., resize=True)``); returns the model
    and the load report."""
    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; available: {sorted(MODEL_CONFIGS)}")
    params, batch_stats = split_train_state(read_flax_checkpoint(src))
    args = infer_model_args(params, head)
    if img_size is not None:
        args["img_size"] = img_size
    resize = bool(model_kwargs) or (num_classes is not None and num_classes != args["num_classes"])
    args.update(model_kwargs or {})
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = create_model(model_name, **args)
    report = load_flax_params(model, params, batch_stats, resize=resize)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save({"model": model.state_dict(), "model_name": model_name, "model_args": args}, dst)
    return model, report


def load_converted(path: str, map_location: Any = "cpu") -> QnAViT:
    """The model saved by :func:`convert`."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = create_model(ckpt["model_name"], **ckpt.get("model_args", {}))
    model.load_state_dict(ckpt["model"])
    return model
