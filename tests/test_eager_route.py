"""The eager route (``qna_triton.ops.plain_eager``): a plain eager call runs the ops' implementation
without torch's dispatcher, with the custom ops' results and gradients bit for bit; anything that must
see the op as one node (a dispatch mode, ``make_fx``, jit tracing, a functorch transform, a tensor
subclass, ``torch.compile``) gets the custom op."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, make_inputs
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from qna_triton import QnA, ops, qna_attention
from qna_triton.export import route

CASE = Case(B=2, H=5, W=6, N=2, h=2, d=4, k=3, s=1, p=1)
GEOMETRY = ([3, 3], [1, 1], [1, 1])


class _OpNames(TorchDispatchMode):
    """Records the name of every operator dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]


def _outputs_and_grads(fn, inputs, g):
    leaves = _leaves(inputs)
    out = fn(*leaves)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_scale", [True, False])
def test_eager_route_equals_the_custom_op(backend, with_scale, monkeypatch):
    """Forward and gradients through the eager route equal the custom op's exactly (reference on CPU,
    and the Triton kernels through the interpreter), and the route never dispatches the op."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    logits, values, rpb, scale = make_inputs(CASE, dtype=torch.float32)
    inputs = (logits, values, rpb, scale if with_scale else None)
    assert ops.plain_eager(*inputs)
    g = torch.randn(CASE.B, CASE.H, CASE.W, CASE.h, CASE.d, generator=torch.Generator().manual_seed(3))

    with _OpNames() as mode:  # a dispatch mode takes the custom op: the reference for this test
        assert not ops.plain_eager(*inputs)
        op_out, op_grads = _outputs_and_grads(lambda *t: ops.attention(*t, *GEOMETRY)[0], inputs, g)
    assert "qna.attention.default" in mode.names

    calls = []
    monkeypatch.setattr(ops.EagerCall, "backward", lambda *a: calls.append(1) or _backward(*a))
    out, grads = _outputs_and_grads(lambda *t: qna_attention(*t, kernel_size=3), inputs, g)
    assert calls == [1]  # the route's own backward ran
    assert torch.equal(out, op_out)
    for got, want in zip(grads, op_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


_backward = ops.EagerCall.backward


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_eager_route_equals_the_packed_custom_op(backend, monkeypatch):
    """The QnA layer (packed projection) gives the same output and parameter gradients on the eager
    route as through ``qna::attention_packed`` under a dispatch mode."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    torch.manual_seed(0)
    layer = QnA(16, 8, heads=2, n_queries=2, kernel_size=3, use_bias=True)
    x = torch.randn(2, 6, 5, 16)

    def run():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    with _OpNames() as mode:
        op_out, op_grads = run()
    assert "qna.attention_packed.default" in mode.names
    out, grads = run()
    assert torch.equal(out, op_out)
    assert grads.keys() == op_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], op_grads[name]), name


def test_no_grad_calls_skip_autograd():
    """Without gradients the route returns the implementation's output directly (no graph)."""
    logits, values, rpb, scale = (t.requires_grad_() for t in make_inputs(CASE, dtype=torch.float32))
    with torch.no_grad():
        out = qna_attention(logits, values, rpb, scale)
    assert out.grad_fn is None and not out.requires_grad
    assert qna_attention(logits, values, rpb, scale).grad_fn is not None


def test_what_must_see_the_op_gets_the_op():
    """make_fx records the custom op as one node; jit tracing, vmap, fake tensors and tensor subclasses
    are not plain eager."""
    logits, values, rpb, scale = make_inputs(CASE, dtype=torch.float32)
    graph = make_fx(lambda *t: qna_attention(*t))(logits, values, rpb, scale)
    assert any("qna.attention" in str(n.target) for n in graph.graph.nodes)

    seen = []

    def probe(*t):
        seen.append(ops.plain_eager(*t))
        return t[0] * 2

    torch.jit.trace(probe, (logits, values, rpb, scale), check_trace=False)
    torch.vmap(lambda l: probe(l, values, rpb, scale))(logits)
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        probe(fake.from_tensor(logits), values, rpb, scale)

    class Sub(torch.Tensor):
        pass

    probe(logits.as_subclass(Sub), values, rpb, scale)
    probe(logits.to("meta"), values, rpb, scale)
    assert seen == [False] * 5


def test_compiled_calls_take_the_custom_op():
    """Under torch.compile the route of a call that needs gradients is the custom op: one node, no
    graph break (CPU inference takes the streaming form: tests/test_compile.py)."""
    logits, values, rpb, scale = _leaves(make_inputs(CASE, dtype=torch.float32))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    fn = torch.compile(lambda *t: route(ops.attention)(*t, *GEOMETRY)[0], backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(logits, values, rpb, scale), qna_attention(logits, values, rpb, scale))
    assert "qna.attention.default" in seen


def test_double_backward_raises_on_both_routes():
    """The op's backward is not differentiable on either route: differentiating it raises."""
    logits, values, rpb, scale = _leaves(make_inputs(CASE, dtype=torch.float32))
    for fn in (
        lambda: qna_attention(logits, values, rpb, scale),
        lambda: ops.attention(logits, values, rpb, scale, *GEOMETRY)[0],
    ):
        (g,) = torch.autograd.grad(fn().sum(), logits, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 1, 1, 2, 3), (3, 4, 1, 1), (2, 7)])
def test_empty_query_minor_strides(shape):
    """One allocation with the strides of a contiguous ``[..., h, N]`` tensor transposed, which
    ``query_minor`` and ``is_query_minor`` recognise (the kernels and the references rely on them)."""
    from qna_triton.layout import empty_query_minor, query_minor

    t = empty_query_minor(shape)
    assert t.shape == shape
    assert t.stride() == torch.empty((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2).stride()
    assert query_minor(t) is t


def test_eager_route_converts_the_tables_once(triton_backend, monkeypatch):
    """float32 contiguous ``rpb`` and ``scale`` (parameters) reach the kernels as they are, unconverted;
    others are converted into the kernels' form, on the eager route once, in the forward, whose
    backward reuses them (the custom op converts them in each pass)."""
    import qna_triton.kernels.launch as launch

    converted, seen = [], []
    table, run = launch._table, launch._launch
    monkeypatch.setattr(launch, "_table", lambda t: converted.append(t) or table(t))

    def recording(fn, grid, args, options):  # the rpb table each launch reads
        seen.append(args[fn.arg_names.index("R")])
        return run(fn, grid, args, options)

    monkeypatch.setattr(launch, "_launch", recording)
    inputs = _leaves(make_inputs(CASE, dtype=torch.float32))
    qna_attention(*inputs).sum().backward()
    assert converted == [] and len(seen) == 3 and all(r is inputs[2] for r in seen)

    def strided(t):  # the same values, [K, N, h] not contiguous
        return t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()

    logits, values, rpb, scale = _leaves(inputs)
    want = [t.grad for t in inputs]
    rpb, scale = strided(rpb), strided(scale)
    assert not rpb.is_contiguous()
    qna_attention(logits, values, rpb, scale).sum().backward()
    assert len(converted) == 2
    for got, w in zip((logits.grad, values.grad, rpb.grad, scale.grad), want):
        assert torch.equal(got, w)
    converted.clear()
    ops.attention(*_leaves((logits, values, rpb, scale)), *GEOMETRY)[0].sum().backward()
    assert len(converted) == 4


def test_split_packed_strided_gives_split_packed_views():
    """The eager route's split of a packed projection (two as_strided calls) gives exactly
    split_packed's views: shapes, strides, storage offsets, for packed tensors of any strides."""
    from qna_triton.layout import split_packed, split_packed_strided

    N, h, d = 3, 2, 5
    rpb = torch.zeros(9, N, h)
    wide = torch.randn(2, 6, 7, N * h + h * d + 4)
    for qv in (
        torch.randn(2, 6, 7, N * h + h * d),
        wide[..., 3 : 3 + N * h + h * d],  # a slice of a wider tensor: offset and pixel strides
        torch.randn(2, 7, 6, N * h + h * d).transpose(1, 2),  # spatially transposed
        torch.randn(N * h + h * d, 2, 6, 7).permute(1, 2, 3, 0),  # channels outermost
    ):
        for got, want in zip(split_packed_strided(qv, rpb), split_packed(qv, rpb)):
            assert (got.shape, got.stride(), got.storage_offset()) == (want.shape, want.stride(), want.storage_offset())
            assert torch.equal(got, want)
