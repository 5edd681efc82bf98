"""The compiled kernels on a CUDA GPU against the float64 oracle: the focused test file of the GPU report
(``scripts/gpu_report.sh``, stage ``tests``), about 40 tests meant to run in well under two minutes.

The cases are a representative sample of what the interpreter checks on CPU (test_kernels.py,
test_banded.py), at sizes where a GPU runs several programs per launch: both algorithms (direct and
banded, forced by ``qna_triton.tuning.kernel_algorithm``) and the library's own choice, fp32 / fp16 /
bf16, strides 1 and 2, even and non-square windows, head dims 8 to 64, 1 to 4 queries, k = 3, 7, 15
and 31, every output NaN-poisoned; bitwise backward determinism, extreme logits, the ``QnA`` layer and
one ``torch.compile``d qna_vit_tiny training step. Everything is marked ``gpu``: skipped without CUDA.
"""

import math

import pytest
import torch
from helpers import Case, make_inputs, oracle
from test_kernels import assert_op_matches_oracle

from qna_triton import QnA, qna_attention
from qna_triton.tuning import kernel_algorithm

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (case, dtype, algorithm)
CASES = [
    # direct kernels
    (Case(B=2, H=17, W=19, N=2, h=16, d=8, k=3, s=1, p=1), BF16, "direct"),  # the benchmark's head layout
    (Case(B=2, H=17, W=19, N=2, h=16, d=8, k=3, s=1, p=1), F16, "direct"),
    (Case(B=2, H=17, W=19, N=2, h=16, d=8, k=3, s=1, p=1), F32, "direct"),
    (Case(B=1, H=20, W=18, N=1, h=4, d=16, k=7, s=2, p=3), F16, "direct"),
    (Case(B=1, H=16, W=16, N=4, h=2, d=32, k=4, s=1, p=(2, 1)), BF16, "direct"),  # even window, uneven padding
    (
        Case(B=1, H=24, W=21, N=3, h=2, d=64, k=(5, 3), s=(1, 2), p=(2, 1)),
        F32,
        "direct",
    ),  # non-square window, mixed stride
    (Case(B=1, H=33, W=35, N=2, h=4, d=8, k=15, s=1, p=7), BF16, "direct"),
    (Case(B=1, H=40, W=37, N=2, h=2, d=8, k=31, s=1, p=15), BF16, "direct"),
    (Case(B=1, H=12, W=14, N=2, h=8, d=8, k=3, s=2, p=1, with_scale=False), F32, "direct"),
    (Case(B=2, H=9, W=11, N=1, h=1, d=12, k=(2, 6), s=1, p=(0, 3)), F16, "direct"),  # head dim not a power of two
    (Case(B=1, H=30, W=30, N=2, h=4, d=16, k=7, s=1, p=3), F32, "direct"),
    (Case(B=1, H=20, W=20, N=4, h=2, d=8, k=15, s=2, p=7), F16, "direct"),
    (Case(B=1, H=31, W=33, N=2, h=2, d=32, k=31, s=2, p=15), F32, "direct"),
    # banded (tensor-core) kernels: forward, delta and, at stride 1, the main backward kernel
    (Case(B=2, H=17, W=19, N=2, h=16, d=8, k=3, s=1, p=1), BF16, "banded"),
    (Case(B=1, H=33, W=35, N=2, h=4, d=8, k=7, s=1, p=3), BF16, "banded"),
    (Case(B=1, H=33, W=35, N=2, h=4, d=8, k=7, s=1, p=3), F16, "banded"),
    (Case(B=1, H=33, W=35, N=2, h=4, d=8, k=7, s=1, p=3), F32, "banded"),
    (Case(B=1, H=33, W=35, N=2, h=4, d=8, k=15, s=1, p=7), BF16, "banded"),
    (Case(B=1, H=40, W=37, N=2, h=2, d=8, k=31, s=1, p=15), BF16, "banded"),
    (Case(B=1, H=40, W=37, N=1, h=2, d=16, k=31, s=1, p=15), F16, "banded"),
    (Case(B=1, H=20, W=18, N=3, h=2, d=16, k=7, s=2, p=3), BF16, "banded"),  # stride 2: the direct main kernel
    (Case(B=1, H=18, W=22, N=4, h=2, d=32, k=(4, 6), s=1, p=(2, 3)), F16, "banded"),  # even, non-square
    (Case(B=1, H=24, W=21, N=2, h=1, d=64, k=(9, 5), s=1, p=(4, 2)), BF16, "banded"),
    (Case(B=1, H=21, W=20, N=1, h=3, d=8, k=(15, 13), s=(2, 1), p=(7, 6)), F32, "banded"),
    (Case(B=2, H=16, W=16, N=2, h=16, d=8, k=15, s=1, p=7, with_scale=False), F16, "banded"),
    (Case(B=1, H=17, W=33, N=2, h=2, d=24, k=17, s=1, p=8), BF16, "banded"),  # halo of two 32-column chunks
    # the library's own choice (tuned entry or heuristic)
    (Case(B=2, H=32, W=32, N=2, h=16, d=8, k=7, s=1, p=3), BF16, "auto"),
    (Case(B=2, H=32, W=32, N=2, h=16, d=8, k=15, s=1, p=7), BF16, "auto"),
    (Case(B=1, H=36, W=36, N=2, h=4, d=8, k=31, s=1, p=15), F32, "auto"),
    (Case(B=2, H=28, W=28, N=2, h=2, d=64, k=3, s=2, p=1), F16, "auto"),
]


def _id(case: Case, dtype: torch.dtype, algo: str) -> str:
    return f"{algo}-{str(dtype).replace('torch.', '')}-{case}"


@pytest.mark.parametrize("case, dtype, algo", [pytest.param(*c, id=_id(*c)) for c in CASES])
def test_forward_and_gradients_match_oracle(case, dtype, algo, monkeypatch, nan_poison):
    """Output and the four gradients against the float64 naive form (within twice the PyTorch path's
    error at the same precision); logits in the layer's query-minor layout where it differs."""
    with kernel_algorithm(algo):
        assert_op_matches_oracle(case, dtype, monkeypatch, query_minor=case.N > 1 and case.h > 1)


@pytest.mark.parametrize("algo, k", [("direct", 7), ("banded", 7), ("banded", 15)])
def test_backward_is_bitwise_deterministic(algo, k, monkeypatch):
    """Two runs on a problem of many programs (contention on the per-offset sums) give identical bits."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    case = Case(B=4, H=48, W=48, N=2, h=16, d=8, k=k, s=1, p=k // 2)
    inputs = make_inputs(case, dtype=BF16, device=DEVICE, query_minor_logits=True)
    g = torch.randn((4, 48, 48, 16, 8), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3)).to(BF16)
    runs = []
    with kernel_algorithm(algo):
        for _ in range(2):
            ts = [t.detach().clone().requires_grad_() for t in inputs]
            qna_attention(*ts, *case.geometry).backward(g)
            runs.append([t.grad for t in ts])
    for name, a, b in zip(("dlogits", "dvalues", "drpb", "dscale"), *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("algo", ["direct", "banded"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_extreme_logits(algo, dtype, monkeypatch):
    """Logits of magnitude 1e4 (the banded kernels fall back to the exact form): a finite output
    equal to the oracle's and finite gradients."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    case = Case(B=2, H=20, W=19, N=2, h=2, d=8, k=7, s=1, p=3)
    logits, values, rpb, scale = make_inputs(case, dtype=dtype, device=DEVICE, logit_scale=1e4)
    ts = [t.clone().requires_grad_() for t in (logits, values, rpb, scale)]
    with kernel_algorithm(algo):
        out = qna_attention(*ts, *case.geometry)
        assert torch.isfinite(out).all()
        tol = 5e-3 if dtype == F32 else 3e-2
        torch.testing.assert_close(
            out.double().cpu(), oracle(logits, values, rpb, scale, case.geometry), rtol=tol, atol=tol
        )
        out.float().square().sum().backward()
    for t in ts:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (7, 2)])
def test_qna_layer_matches_float64(kernel_size, stride, monkeypatch, nan_poison):
    """The QnA layer (fused projection, packed kernels, packed gradient) in float32 on the GPU against
    the same layer in float64 on the CPU: output and every parameter gradient."""
    torch.manual_seed(0)
    layer = QnA(32, 64, 8, kernel_size=kernel_size, stride=stride, n_queries=2, use_bias=True)
    with torch.no_grad():
        layer.rpe_bias.normal_()
    exact = QnA(32, 64, 8, kernel_size=kernel_size, stride=stride, n_queries=2, use_bias=True).double()
    exact.load_state_dict(layer.state_dict())
    x = torch.randn(2, 23, 26, 32)
    layer = layer.to(DEVICE)
    y = layer(x.to(DEVICE))
    y.square().sum().backward()
    monkeypatch.setenv("QNA_TRITON_BACKEND", "reference")
    y64 = exact(x.double())
    y64.square().sum().backward()
    torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-4, atol=1e-4)
    grads = dict(exact.named_parameters())
    for name, p in layer.named_parameters():
        want = grads[name].grad
        err = (p.grad.double().cpu() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().clamp_min(1.0).item(), f"{name}: error {err:.3g}"


def _train_losses(model, x, y, steps: int = 2):
    """The losses of ``steps`` SGD steps (the second loss checks the first step's gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_compiled_qna_vit_tiny_training_step_matches_reference_backend(monkeypatch):
    """qna_vit_tiny at 224x224 under ``torch.compile`` (the kernels inside the compiled graph as custom
    ops) trains like the library's PyTorch path in eager mode: the same losses over two steps. No
    drop-path (qna_vit_tiny's default is 0.05): the compiled and the eager run would draw other masks."""
    import copy

    import torch._dynamo

    from qna_vit import create_model

    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", num_classes=10, drop_path=0.0).to(DEVICE).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 224, 224, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    torch._dynamo.reset()
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    compiled = _train_losses(torch.compile(model), x, y)
    monkeypatch.setenv("QNA_TRITON_BACKEND", "reference")
    reference = _train_losses(twin, x, y)
    assert all(math.isfinite(v) for v in compiled)
    for got, want in zip(compiled, reference):
        assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (compiled, reference)
