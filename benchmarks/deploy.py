"""CPU deploy suite: qna_vit_tiny against Swin-T and ConvNeXt-T (timm, random init), float32 inference.

Each model runs in three engines: PyTorch eager (``no_grad``), ``torch.compile`` (default mode; from
torch 2.15 the QnA op's streaming form traced and fused by Inductor,
:func:`qna_triton.export.compiled_cpu_inference`) and onnxruntime's CPU provider
(``torch.onnx.export(..., dynamo=True)``, dynamic batch; its sessions' idle workers sleep rather than
spin, so they do not take the cores from the next measurement); ``aoti`` (AOTInductor on the
decomposed program) is optional. Timing is round-robin: each round measures every (model, engine)
once, one after another, so that all see the same machine load; on a shared machine the ratios within one run are the result, not the absolute
times. The library's host overhead per call (:mod:`benchmarks.host_overhead`) is recorded beside them.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .runner import Deadline, failure_status
from .suites import SMOKE_VIT_IMAGE, SMOKE_VIT_OVERRIDES, _import_qna_vit

__all__ = ["DEPLOY_MODELS", "DEPLOY_ENGINES", "build_model", "build_engine", "run_deploy", "deploy_shape"]

DEPLOY_MODELS = ("qna_vit_tiny", "swin_tiny", "convnext_tiny")
DEPLOY_ENGINES = ("eager", "compiled", "onnxruntime", "aoti")
DEFAULT_ENGINES = ("eager", "compiled", "onnxruntime")

# Smoke runs: narrow models at 32x32 that keep each architecture's structure. QnA-ViT keeps its four
# stages and one block of each kind: its ONNX export costs ~10 s per QnA layer here (both branches of each
# layer's If are exported), and the smoke run checks the harness, not the model.
_SMOKE_QNA_VIT = dict(SMOKE_VIT_OVERRIDES, qna_layers=(1, 0, 0, 0), lsa_layers=(0, 0, 1, 1))
_SMOKE_TIMM = {
    "swin_tiny": dict(
        img_size=SMOKE_VIT_IMAGE, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2
    ),
    "convnext_tiny": dict(dims=(16, 16, 32, 32), depths=(1, 1, 1, 1)),
}
_TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "convnext_tiny": "convnext_tiny"}


def deploy_shape(smoke: bool, batches: Sequence[int] = ()) -> Tuple[List[int], int]:
    """(batches, image size): 1 and 8 at 224x224; smoke: 1 and 2 at 32x32."""
    if smoke:
        return list(batches or (1, 2)), SMOKE_VIT_IMAGE
    return list(batches or (1, 8)), 224


def build_model(name: str, smoke: bool) -> torch.nn.Module:
    """One of :data:`DEPLOY_MODELS`, random init, eval mode, float32 on CPU."""
    if name == "qna_vit_tiny":
        model = _import_qna_vit().create_model("qna_vit_tiny", **(_SMOKE_QNA_VIT if smoke else {}))
    else:
        import timm

        model = timm.create_model(_TIMM_NAMES[name], pretrained=False, **(_SMOKE_TIMM[name] if smoke else {}))
    return model.eval()


def _onnx(model: torch.nn.Module, x: torch.Tensor) -> Tuple[Callable, str]:
    import onnxruntime as ort

    with torch.no_grad():
        program = torch.onnx.export(
            model, (x,), dynamo=True, verbose=False, dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
        )
    proto = program.model_proto
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # idle workers sleep instead of spinning: spinning threads of one session would otherwise keep the
    # cores busy while the next (model, engine) of the round runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    note = f"onnxruntime {ort.__version__}, {len(proto.graph.node)} nodes in the main graph"
    return (lambda t: sess.run(None, {name: t.numpy()})), note


def _aoti(model: torch.nn.Module, x: torch.Tensor, workdir: str) -> Tuple[Callable, str]:
    import os

    from qna_triton.export import decompose

    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        path = torch._inductor.aoti_compile_and_package(
            decompose(program), package_path=os.path.join(workdir, f"{id(model)}.pt2")
        )
    runner = torch._inductor.aoti_load_package(path)
    return runner, "AOTInductor on qna_triton.export.decompose(program)"


def build_engine(engine: str, model: torch.nn.Module, x: torch.Tensor, workdir: str) -> Tuple[Callable, str]:
    """``(run, note)``: ``run(x)`` is one inference of ``model`` in ``engine``; the first call (compile,
    export, session creation) happens here, outside the timing."""
    if engine == "eager":
        run, note = model, "PyTorch eager, no_grad"
    elif engine == "compiled":
        run, note = torch.compile(model, dynamic=False), "torch.compile, default mode"
    elif engine == "onnxruntime":
        run, note = _onnx(model, x)
    elif engine == "aoti":
        run, note = _aoti(model, x, workdir)
    else:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(DEPLOY_ENGINES)}")
    with torch.no_grad():
        run(x)  # compiles / warms up
    return run, note


def _images_per_second(run: Callable, x: torch.Tensor, min_time: float) -> float:
    with torch.no_grad():
        run(x)
        n, start = 0, time.perf_counter()
        while True:
            run(x)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                return n * x.shape[0] / elapsed


def run_deploy(
    emit: Callable[..., dict],
    smoke: bool,
    deadline: Deadline,
    engines: Sequence[str] = DEFAULT_ENGINES,
    models: Sequence[str] = DEPLOY_MODELS,
    batches: Sequence[int] = (),
    rounds: int = 5,
    min_time: float = 2.0,
    host_iters: int = 2000,
) -> None:
    """Measures every (model, engine, batch) round-robin and emits one row each through ``emit(suite,
    shape, dtype, provider, pass, result, notes, fields)`` (``provider`` = engine, ``shape`` names the
    model), then the host-overhead rows."""
    import tempfile

    from .host_overhead import measure as host_measure

    bs, img = deploy_shape(smoke, batches)
    workdir = tempfile.mkdtemp(prefix="qna_deploy_")
    built: Dict[Tuple[str, str], Tuple[Optional[Callable], str]] = {}
    torch.manual_seed(0)
    for name in models:
        model = build_model(name, smoke)
        example = torch.randn(2, 3, img, img)
        for engine in engines:
            if deadline.spent():
                built[name, engine] = (None, "skipped: time budget spent")
                continue
            try:
                built[name, engine] = build_engine(engine, model, example, workdir)
            except Exception as e:  # one engine failing a model is a result, not the end of the run
                built[name, engine] = (None, failure_status(e))
    for B in bs:
        x = torch.randn(B, 3, img, img)
        per: Dict[Tuple[str, str], List[float]] = {k: [] for k, v in built.items() if v[0] is not None}
        for _ in range(rounds):
            if deadline.spent():
                break
            for key in per:
                try:
                    per[key].append(_images_per_second(built[key][0], x, min_time))
                except Exception as e:
                    built[key] = (None, failure_status(e))
            per = {k: v for k, v in per.items() if built[k][0] is not None}
        for (name, engine), (run, note) in built.items():
            shape = f"{name} B{B} {img}x{img}"
            fields = {"batch": B, "height": img, "width": img}
            got = per.get((name, engine), [])
            if run is None or not got:
                status = note if run is None else "skipped: time budget spent"
                emit("deploy", shape, "fp32", engine, "inference", {"status": status}, [], fields)
                continue
            ms = sorted(1e3 * B / v for v in got)
            q = statistics.quantiles(ms, n=5, method="inclusive") if len(ms) > 1 else [ms[0]] * 4
            res = {
                "status": "ok",
                "images_s": statistics.median(got),
                "p50_ms": statistics.median(ms),
                "p20_ms": q[0],
                "p80_ms": q[3],
            }
            rounds_note = f"{len(got)} rounds of >= {min_time:g} s, images/s " + ", ".join(f"{v:.3g}" for v in got)
            emit("deploy", shape, "fp32", engine, "inference", res, [note, rounds_note], fields)
    try:
        host = host_measure(host_iters)
        for key, label in (
            ("forward_us", "qna_attention forward"),
            ("forward_backward_us", "qna_attention forward+backward"),
            ("trivial_op_us", "trivial torch.library op"),
            ("autograd_floor_us", "trivial autograd step"),
        ):
            if key in host:
                res = {"status": "ok", "p50_ms": host[key] / 1e3}
                note = "host work per call, Triton launch stubbed out (benchmarks.host_overhead)"
                emit("deploy", label, "fp32", "host_overhead", "host", res, [note], {})
    except Exception as e:
        emit("deploy", "qna_attention forward", "fp32", "host_overhead", "host", {"status": failure_status(e)}, [], {})
