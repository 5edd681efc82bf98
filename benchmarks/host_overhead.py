"""The library's own host work per call on the Triton path, with Triton's kernel launch stubbed out.

``python -m benchmarks.host_overhead`` times ``qna_attention`` (forward) and forward plus backward on
small CPU tensors with ``QNA_TRITON_BACKEND=triton`` and every ``@triton.jit`` launch replaced by a
no-op that counts the launches: what remains is validation, dispatch, config choice, launch
description and allocation, the Python that bounds eager inference at small batches.

A plain eager call runs the op's implementation directly (``qna_triton.ops.plain_eager``); what it
cannot avoid is measured in the same process as *the floor*: a function of the same arguments whose
body only allocates the outputs (forward), and a ``torch.autograd.Function`` whose forward and backward
only allocate theirs (forward and backward: the autograd engine, the ``sum``, the gradients' accumulation
into the four leaves). The library's own work is the time less that floor (``own_forward_us``,
``own_forward_backward_us``). Measured beside them: the same bodies behind ``torch.library.custom_op``
registrations of the op's schemas (``custom_op_floor_*``: what a call through torch's dispatcher costs
before any work, the route of compiled and exported graphs), a trivial ``torch.library`` op and a
trivial autograd step. The environment must be set before Triton is imported, so the measurement runs
in a fresh process (:func:`measure`).

Recorded results: ``benchmarks/results/host_overhead.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

__all__ = ["measure", "main", "record_row", "RESULTS", "TARGETS_US"]


def _best_us(fns: Dict[str, Tuple[Callable[[], object], int]], repeats: int = 7) -> Dict[str, float]:
    """Per name, the smallest mean over ``repeats`` runs of ``iters`` calls of its function, in
    microseconds (the least disturbed by the other processes of a shared machine). The functions take
    turns run by run, so that a floor and the time it is subtracted from see the same load."""
    for fn, iters in fns.values():
        for _ in range(max(iters // 10, 3)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, (fn, iters) in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / iters * 1e6)
    return best


def _floor_op() -> Callable:
    """``qna::attention``'s schema and registration (custom op, fake, autograd through a backward
    custom op) around bodies that only allocate the outputs: torch's share of a call."""
    import torch

    # the schemas spelled out (``from __future__ import annotations`` leaves local annotations strings)
    geometry = "int[] kernel_size, int[] stride, int[] padding"
    fwd_schema = f"(Tensor logits, Tensor values, Tensor rpb, Tensor? scale, {geometry}) -> (Tensor, Tensor)"
    bwd_schema = (
        f"(Tensor grad_out, Tensor logits, Tensor values, Tensor rpb, Tensor? scale, Tensor lse, {geometry})"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    )

    @torch.library.custom_op("qna_host_floor::attention", mutates_args=(), schema=fwd_schema)
    def attention(logits, values, rpb, scale, kernel_size, stride, padding):
        return torch.empty_like(values), torch.empty_like(logits)

    @attention.register_fake
    def _(logits, values, rpb, scale, kernel_size, stride, padding):
        return torch.empty_like(values), torch.empty_like(logits)

    @torch.library.custom_op("qna_host_floor::attention_backward", mutates_args=(), schema=bwd_schema)
    def attention_backward(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding):
        return tuple(torch.empty_like(t) for t in (logits, values, rpb, rpb if scale is None else scale))

    @attention_backward.register_fake
    def _(grad_out, logits, values, rpb, scale, lse, kernel_size, stride, padding):
        return tuple(torch.empty_like(t) for t in (logits, values, rpb, rpb if scale is None else scale))

    def setup_context(ctx, inputs, output):
        *tensors, kernel_size, stride, padding = inputs
        ctx.save_for_backward(*tensors, output[1])
        ctx.geometry = (kernel_size, stride, padding)

    def backward(ctx, grad_out, _grad_lse):
        logits, values, rpb, scale, lse = ctx.saved_tensors
        dl, dv, dr, da = attention_backward(grad_out.contiguous(), logits, values, rpb, scale, lse, *ctx.geometry)
        return dl, dv, dr, (None if scale is None else da), None, None, None

    attention.register_autograd(backward, setup_context=setup_context)
    return attention


def _floor_function() -> Callable:
    """The eager route's floor: a ``torch.autograd.Function`` whose forward allocates ``(out, lse)`` and
    whose backward allocates the four gradients, called as :func:`qna_triton.ops.attention_eager` calls
    its implementation (directly when no gradient is needed)."""
    import torch

    def outputs(logits, values):
        return torch.empty_like(values), torch.empty_like(logits)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, values, rpb, scale):
            out, lse = outputs(logits, values)
            ctx.save_for_backward(logits, values, rpb, scale, lse)
            ctx.mark_non_differentiable(lse)
            ctx.set_materialize_grads(False)
            return out, lse

        @staticmethod
        def backward(ctx, grad_out, _grad_lse):
            return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:4])

    def call(logits, values, rpb, scale):
        if torch.is_grad_enabled():
            return Floor.apply(logits, values, rpb, scale)
        return outputs(logits, values)

    return call


def _measure_here(iters: int) -> Dict[str, float]:
    """The measurement itself; needs ``TRITON_INTERPRET=1`` and ``QNA_TRITON_BACKEND=triton`` set before
    Triton was imported."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from qna_triton import qna_attention

    launches = []

    def stub_getitem(self, grid):
        def launch(*args, **kwargs):
            launches.append(self)

        return launch

    # the whole process is this measurement's; under TRITON_INTERPRET the kernels are InterpretedFunctions
    JITFunction.__getitem__ = InterpretedFunction.__getitem__ = stub_getitem

    lib = torch.library.Library("qna_host_floor", "FRAGMENT")  # noqa: F841 (kept alive for the op)
    torch.library.define("qna_host_floor::trivial", "(Tensor x) -> Tensor", lib=lib)
    torch.library.impl("qna_host_floor::trivial", "CPU", lambda x: torch.empty_like(x), lib=lib)
    trivial = torch.ops.qna_host_floor.trivial
    floor_op = _floor_op()
    floor_fn = _floor_function()

    torch.manual_seed(0)
    B, H, W, N, h, d = 1, 14, 14, 2, 4, 16
    logits = torch.randn(B, H, W, N, h, requires_grad=True)
    values = torch.randn(B, H, W, h, d, requires_grad=True)
    rpb = torch.randn(9, N, h, requires_grad=True)
    scale = torch.randn(9, N, h, requires_grad=True)
    x = torch.randn(B, H, W, h * d)
    geometry = ([3, 3], [1, 1], [1, 1])

    def forward():
        with torch.no_grad():
            return qna_attention(logits, values, rpb, scale, kernel_size=3)

    def forward_backward():
        qna_attention(logits, values, rpb, scale, kernel_size=3).sum().backward()

    def floor_forward():
        with torch.no_grad():
            return floor_fn(logits, values, rpb, scale)[0]

    def floor_forward_backward():
        floor_fn(logits, values, rpb, scale)[0].sum().backward()

    def custom_op_forward():
        with torch.no_grad():
            return floor_op(logits, values, rpb, scale, *geometry)[0]

    def custom_op_forward_backward():
        floor_op(logits, values, rpb, scale, *geometry)[0].sum().backward()

    forward()
    if not launches:
        raise RuntimeError("the Triton path launched no kernel: is QNA_TRITON_BACKEND=triton in effect?")
    fb_iters = max(iters // 4, 10)
    leaf = torch.randn(1, requires_grad=True)
    result = _best_us(
        {
            "trivial_op_us": (lambda: trivial(x), iters),
            "autograd_floor_us": (lambda: leaf.sum().backward(), iters),
            "floor_forward_us": (floor_forward, iters),
            "floor_forward_backward_us": (floor_forward_backward, fb_iters),
            "custom_op_floor_forward_us": (custom_op_forward, iters),
            "custom_op_floor_forward_backward_us": (custom_op_forward_backward, fb_iters),
            "forward_us": (forward, iters),
            "forward_backward_us": (forward_backward, fb_iters),
        }
    )
    result["own_forward_us"] = result["forward_us"] - result["floor_forward_us"]
    result["own_forward_backward_us"] = result["forward_backward_us"] - result["floor_forward_backward_us"]
    return result


def measure(iters: int = 1000) -> Dict[str, float]:
    """Per-call host microseconds, measured in a fresh process with the launch stubbed out: of the
    Triton path (``forward_us``, ``forward_backward_us``), of the eager route's floor, bodies that only
    allocate the outputs (``floor_forward_us``, ``floor_forward_backward_us``), the library's own work
    (``own_forward_us``, ``own_forward_backward_us``: the first less the second), of the same bodies
    behind the custom-op registrations (``custom_op_floor_forward_us``,
    ``custom_op_floor_forward_backward_us``), of a trivial ``torch.library`` op (``trivial_op_us``) and
    of a trivial autograd step (``autograd_floor_us``)."""
    env = dict(os.environ, TRITON_INTERPRET="1", QNA_TRITON_BACKEND="triton")
    code = f"import json; from benchmarks.host_overhead import _measure_here; print(json.dumps(_measure_here({iters})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"host-overhead measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The targets of the library's own work per call on such a CPU (issue 26).
TARGETS_US = {"own_forward_us": 20.0, "own_forward_backward_us": 60.0}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "host_overhead.md")
_COLUMNS = (
    "forward_us",
    "floor_forward_us",
    "own_forward_us",
    "forward_backward_us",
    "floor_forward_backward_us",
    "own_forward_backward_us",
    "custom_op_floor_forward_us",
    "custom_op_floor_forward_backward_us",
    "trivial_op_us",
    "autograd_floor_us",
)


def record_row(result: Dict[str, float], note: str = "") -> str:
    """One Markdown table row of :data:`RESULTS`: the date, the machine and versions
    (:func:`qna_triton.env.capture_environment` on the CPU, the cores), the microseconds, a note."""
    from qna_triton.env import capture_environment

    e = capture_environment("cpu")
    machine = f"{e.device_name}, {os.cpu_count()} cores"
    cells = [e.date[:10], machine, e.torch, str(e.triton), *(f"{result[c]:.1f}" for c in _COLUMNS), note]
    return "| " + " | ".join(cells) + " |"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the measurement as one JSON object; ``--record NOTE`` also appends it to :data:`RESULTS`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=1000, help="calls per timed run (default 1000)")
    parser.add_argument("--record", metavar="NOTE", help=f"append a row to {os.path.relpath(RESULTS)} with NOTE")
    args = parser.parse_args(argv)
    result = measure(args.iters)
    print(json.dumps(result, indent=1))
    for name, target in TARGETS_US.items():
        print(f"{name}: {result[name]:.1f} us ({'within' if result[name] <= target else 'above'} {target:g} us)")
    if args.record is not None:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(record_row(result, args.record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
