"""The custom op under torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch
import torch._dynamo
from helpers import DEVICE, Case, make_inputs

from qna_triton import (
    QnA,
    ops,  # noqa: F401  (registers torch.ops.qna)
)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=5, W=6, N=2, h=3, d=4, k=3, s=1, p=1),
        Case(B=1, H=6, W=5, N=1, h=2, d=3, k=(2, 4), s=(2, 1), p=(0, 2), with_scale=False),
    ],
    ids=str,
)
def test_opcheck(case, backend, monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    logits, values, rpb, scale = [
        None if t is None else t.requires_grad_() for t in make_inputs(case, dtype=torch.float32, device=DEVICE)
    ]
    ks, st, pd = (list(p) for p in case.geometry)
    torch.library.opcheck(torch.ops.qna.attention.default, (logits, values, rpb, scale, ks, st, pd))
    out, lse = torch.ops.qna.attention(logits, values, rpb, scale, ks, st, pd)
    g = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.qna.attention_backward.default,
        (
            g,
            logits.detach(),
            values.detach(),
            rpb.detach(),
            None if scale is None else scale.detach(),
            lse.detach(),
            ks,
            st,
            pd,
        ),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_packed(backend, monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    N, h, d = 2, 3, 4
    qv = torch.randn(2, 5, 6, N * h + h * d, device=DEVICE, requires_grad=True)
    rpb = torch.randn(9, N, h, device=DEVICE, requires_grad=True)
    scale = torch.randn(9, N, h, device=DEVICE, requires_grad=True)
    geometry = ([3, 3], [2, 1], [1, 1])
    torch.library.opcheck(torch.ops.qna.attention_packed.default, (qv, rpb, scale, *geometry))
    out, lse = torch.ops.qna.attention_packed(qv, rpb, scale, *geometry)
    torch.library.opcheck(
        torch.ops.qna.attention_packed_backward.default,
        (torch.randn_like(out), qv.detach(), rpb.detach(), scale.detach(), lse.detach(), *geometry),
    )


def _permuted_inputs(B=2, H=5, W=6, N=2, h=3, d=4):
    """Dense but not contiguous logits/values (channels-first storage viewed channels-last)."""
    logits = torch.randn(B, N, h, H, W, device=DEVICE).permute(0, 3, 4, 1, 2)
    values = torch.randn(B, h, d, H, W, device=DEVICE).permute(0, 3, 4, 1, 2)
    return logits, values, torch.randn(9, N, h, device=DEVICE)


def test_backward_fake_matches_real_strides_for_permuted_inputs(monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", "reference")
    logits, values, rpb = _permuted_inputs()
    out, lse = torch.ops.qna.attention(logits, values, rpb, None, [3, 3], [1, 1], [1, 1])
    torch.library.opcheck(
        torch.ops.qna.attention_backward.default,
        (torch.randn_like(out), logits, values, rpb, None, lse, [3, 3], [1, 1], [1, 1]),
    )


def test_compile_backward_with_permuted_inputs(monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", "reference")
    torch._dynamo.reset()
    from qna_triton import qna_attention

    def f(l5, v5, rpb):
        out = qna_attention((l5 * 2).permute(0, 3, 4, 1, 2), (v5 * 1).permute(0, 3, 4, 1, 2), rpb, None, 3)
        return out.square().sum()

    logits, values, rpb = _permuted_inputs()
    args = [t.permute(0, 3, 4, 1, 2).detach().requires_grad_() for t in (logits, values)] + [rpb.requires_grad_()]
    expected = torch.autograd.grad(f(*args), args)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*args), args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


class Stack(torch.nn.Module):
    """Two QnA blocks (the second down-sampling) with norms and residuals, as in QnA-ViT."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(c, eps=1e-6)
        self.qna1 = QnA(c, c, 4, kernel_size=3)
        self.norm2 = torch.nn.LayerNorm(c, eps=1e-6)
        self.qna2 = QnA(c, 2 * c, 8, kernel_size=3, stride=2)
        self.head = torch.nn.Linear(2 * c, 5)

    def forward(self, x):
        x = x + self.qna1(self.norm1(x))
        x = self.qna2(self.norm2(x))
        return self.head(x.mean(dim=(1, 2)))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_no_recompile_on_batch_change(backend, monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Stack().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 5):
            x = torch.randn(batch, 9, 10, 16, device=DEVICE)
            torch._dynamo.mark_dynamic(x, 0)
            y = compiled(x)
            y.square().sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            y_eager = model(x)
            y_eager.square().sum().backward()
            torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
            for n, p in model.named_parameters():
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
            model.zero_grad()


def _compiled_graph_targets(model, x):
    """``model`` compiled (fullgraph) with a backend that records Dynamo's graph: its call targets."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(model, backend=backend, fullgraph=True)(x), targets


@pytest.mark.parametrize("rectangular", [False, True])
def test_compile_cpu_inference_decomposes_the_op(rectangular, monkeypatch):
    """CPU inference under torch.compile traces the op's streaming form (Inductor fuses it); a training
    call and torch.export keep the op. Same results as eager either way."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "auto")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = QnA(8, 8, 2, kernel_size=(3, 2) if rectangular else 3, stride=2).eval()
    x = torch.randn(2, 7, 9, 8)
    with torch.no_grad():
        expected = layer(x)
        got, targets = _compiled_graph_targets(layer, x)
    from qna_triton.export import COMPILED_CPU_STREAMING

    # torch 2.11 cannot tell compile from export while tracing: there the op stays
    assert bool([t for t in targets if "qna" in t]) != COMPILED_CPU_STREAMING, targets
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    got, targets = _compiled_graph_targets(layer, x)  # gradients enabled: the op, its backward ours
    assert [t for t in targets if "qna.attention_packed" in t], targets
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        program = torch.export.export(layer, (x,))
    assert [n for n in program.graph.nodes if "qna.attention_packed" in str(n.target)]
