"""Converts an original QnA-ViT checkpoint (Flax msgpack, ``flax.training.checkpoints``) to PyTorch.

    python examples/convert_flax.py --model qna_vit_tiny path/to/checkpoint_300 qna_vit_tiny.pt

Needs only ``msgpack`` and numpy: no JAX. The input is a msgpack file (or a checkpoint directory, whose
newest ``checkpoint_<step>`` file is taken) holding the saved train state; the parameters sit under
its ``params`` key (``state['params']``, or ``state['params']['params']`` when a whole variables dict
was saved). The output is ``torch.save({'model': state_dict, 'model_name': ..., 'model_args': ...})``;
:func:`load_converted` rebuilds the model from it.

The number of classes, the stem and the presence of layer scales are read from the checkpoint; the
``qnav1``/``qnav2`` heads have the same parameters, so those need ``--head``.

Into another geometry (fine-tuning): ``--model-kwargs`` changes the architecture's windows or resolution
and ``--num-classes`` the classifier; the position and attention-scale tables are then resized as the
original's fine-tuning does (``jax.image.resize(..., 'bicubic')``), a new classifier is initialised, and
a report lists what was loaded, resized and newly initialised::

    python examples/convert_flax.py --model qna_vit_tiny --num-classes 100 path/to/checkpoint_300 \\
        qna_vit_tiny_384.pt --model-kwargs img_size=384 lsa_window=12,12,24,12
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from qna_triton import CheckpointError
from qna_vit import MODEL_CONFIGS, LoadReport, QnAViT, create_model, load_flax_params
from qna_vit.training.engine import parse_model_kwargs

__all__ = ["read_flax_checkpoint", "split_train_state", "infer_model_args", "convert", "load_converted", "main"]

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
        return isinstance(node, Mapping) and any(k.startswith("LayerScale_") or has_layer_scale(v)
                                                 for k, v in node.items())

    if has_layer_scale(params):
        args["layer_scale"] = 1.0  # only the initial value; the checkpoint's values are loaded over it
    has_qna_head = isinstance(head_tree, Mapping) and "FusedKQnA_0" in head_tree
    if has_qna_head and head not in ("qnav1", "qnav2"):
        raise CheckpointError("the checkpoint has a QnA classification head (ClassificationHead_0/FusedKQnA_0): "
                              "pass --head qnav1 or --head qnav2")
    if not has_qna_head and head not in (None, "gap"):
        raise CheckpointError(f"--head {head} needs ClassificationHead_0/FusedKQnA_0, which the checkpoint lacks")
    args["head"] = head or "gap"
    return args


def convert(model_name: str, src: str, dst: str, head: Optional[str] = None, img_size: Optional[int] = None,
            model_kwargs: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None,
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Convert an original QnA-ViT Flax msgpack checkpoint to PyTorch.")
    ap.add_argument("--model", required=True, choices=sorted(MODEL_CONFIGS), help="architecture of the checkpoint")
    ap.add_argument("--head", choices=("gap", "qnav1", "qnav2"), default=None,
                    help="classification head (needed for the QnA heads, which share their parameters)")
    ap.add_argument("--img-size", type=int, default=None, help="training resolution (qnav heads only; 224)")
    ap.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                    help="another geometry to load into, e.g. img_size=384 lsa_window=12,12,24,12 (tables resized)")
    ap.add_argument("--num-classes", type=int, default=None, help="a new classifier for this many classes")
    ap.add_argument("input", help="Flax msgpack checkpoint file, or a directory of checkpoint_<step> files")
    ap.add_argument("output", help="PyTorch checkpoint to write (.pt)")
    args = ap.parse_args(argv)
    try:
        model, report = convert(args.model, args.input, args.output, head=args.head, img_size=args.img_size,
                                model_kwargs=parse_model_kwargs(args.model_kwargs), num_classes=args.num_classes)
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
