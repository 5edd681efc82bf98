"""Model level: one training step (forward, cross-entropy, backward, AdamW) of qna_vit_tiny with our
kernels, with the paper's formulation, and of Swin-T (timm), at the same batch."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import types
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from qna_triton import QnA
from qna_triton.layout import output_size, split_packed
from qna_triton.reference import paper_qna_attention

from .runner import Deadline, Unsupported, failure_status
from .suites import SMOKE_VIT_IMAGE, SMOKE_VIT_OVERRIDES, _import_qna_vit
from .timing import TimingConfig, measure_peak, sync, time_fn

__all__ = ["MODEL_PROVIDERS", "paper_forward", "use_paper_formulation", "run_model", "model_shape"]

MODEL_PROVIDERS = ("qna_triton", "paper_compiled", "swin_tiny", "reference_backend")  # by priority
NUM_CLASSES = 1000


def paper_forward(self: QnA, x: torch.Tensor) -> torch.Tensor:
    """``QnA.forward`` with the core op replaced by the paper's formulation in plain PyTorch
    (:func:`paper_qna_attention`, ``exact_fallback=False``), so torch.compile traces and fuses it and
    autograd differentiates it, as a model written in the paper's form would run."""
    B, H, W, _ = x.shape
    (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
    Ho, Wo = output_size(H, kh, sh, ph), output_size(W, kw, sw, pw)
    N, h = self.n_queries, self.heads
    weight, bias = self.fused_projection_weight()
    qv = F.linear(x, weight, bias)
    rpb = self.rpe_bias.reshape(-1, N, h)
    logits, values = split_packed(qv, rpb)
    out, _ = paper_qna_attention(
        logits, values, rpb, self.scale_tensor(), self.kernel_size, self.stride, self.padding, exact_fallback=False
    )
    return self.to_out(out.reshape(B, Ho, Wo, self.features))


def use_paper_formulation(model: nn.Module) -> int:
    """Rebinds every QnA layer of ``model`` to :func:`paper_forward`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, QnA):
            m.forward = types.MethodType(paper_forward, m)
            n += 1
    return n


@contextlib.contextmanager
def backend(value: Optional[str]) -> Iterator[None]:
    """Sets ``QNA_TRITON_BACKEND`` for the block (the op reads it at run time, on every call)."""
    old = os.environ.get("QNA_TRITON_BACKEND")
    if value is None:
        os.environ.pop("QNA_TRITON_BACKEND", None)
    else:
        os.environ["QNA_TRITON_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QNA_TRITON_BACKEND", None)
        else:
            os.environ["QNA_TRITON_BACKEND"] = old


def model_shape(smoke: bool) -> Tuple[int, int]:
    """(batch, image size)."""
    return (1, SMOKE_VIT_IMAGE) if smoke else (128, 224)


def _build(name: str, smoke: bool) -> Tuple[nn.Module, Optional[str], str]:
    """``(model, QNA_TRITON_BACKEND value, description)``."""
    if name == "swin_tiny":
        try:
            import timm
        except ImportError as e:
            raise Unsupported(f"timm not installed ({e})") from e
        kwargs = (
            dict(img_size=SMOKE_VIT_IMAGE, window_size=2, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 3))
            if smoke
            else {}
        )
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=NUM_CLASSES, **kwargs)
        return model, None, "timm swin_tiny_patch4_window7_224" + (" (narrow smoke variant)" if smoke else "")
    try:
        mod = _import_qna_vit()
    except Exception as e:
        raise Unsupported(f"qna_vit unavailable ({type(e).__name__}: {e})") from e
    model = mod.create_model("qna_vit_tiny", num_classes=NUM_CLASSES, **(SMOKE_VIT_OVERRIDES if smoke else {}))
    desc = "qna_vit_tiny" + (" (narrow smoke variant)" if smoke else "")
    if name == "qna_triton":
        return model, "auto", desc + ", qna_triton kernels"
    if name == "paper_compiled":
        n = use_paper_formulation(model)
        return model, "auto", desc + f", {n} QnA layers in the paper's formulation (traced by torch.compile)"
    if name == "reference_backend":
        return (
            model,
            "reference",
            desc + ", QNA_TRITON_BACKEND=reference (paper forward, analytic backward, opaque to torch.compile)",
        )
    raise ValueError(f"unknown model provider {name!r}")


def run_model(
    name: str,
    device: torch.device,
    cfg: TimingConfig,
    deadline: Deadline,
    smoke: bool,
    compile: bool = True,
    compile_mode: str = "default",
    seed: int = 0,
) -> Tuple[dict, list]:
    """Measures one training step; returns ``(result, notes)`` like :func:`~benchmarks.runner.run_workload`."""
    notes: list = []
    if deadline.spent():
        return {"status": "skipped: time budget spent"}, notes
    B, img = model_shape(smoke)
    if name == "paper_compiled" and not compile:
        return {"status": "unsupported: compilation disabled (--no-compile)"}, notes
    try:
        torch.manual_seed(seed)
        model, backend_value, desc = _build(name, smoke)
    except Exception as e:
        return {"status": failure_status(e)}, notes
    notes.append(desc)
    notes.append("bf16 autocast, AdamW, " + (f"torch.compile(mode={compile_mode!r})" if compile else "eager"))
    result: dict = {}
    with backend(backend_value):
        try:
            model = model.to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
            run = torch.compile(model, mode=compile_mode) if compile else model
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            x = torch.randn((B, 3, img, img), generator=g, device=device)
            y = torch.randint(0, NUM_CLASSES, (B,), generator=g, device=device)

            def step() -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(run(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(2 if device.type == "cuda" or compile else 1):  # compile, then a warm step (estimate)
                t0 = time.perf_counter()
                step()
                sync(device)
                estimate_ms = (time.perf_counter() - t0) * 1e3
            if device.type == "cuda":
                peak, extra = measure_peak(lambda: None, lambda _: step(), device)
                result.update(peak_mb=peak / 2**20, extra_mb=extra / 2**20)
            else:
                notes.append("memory: n/a on CPU")
            if deadline.spent():
                result["status"] = "skipped: time budget spent"
            else:
                p50, p20, p80 = time_fn(step, device, cfg, estimate_ms=estimate_ms)
                result.update(status="ok", p50_ms=p50, p20_ms=p20, p80_ms=p80, images_s=B / (p50 / 1e3))
        except Exception as e:
            result["status"] = failure_status(e)
        finally:
            model = run = opt = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    return result, notes
