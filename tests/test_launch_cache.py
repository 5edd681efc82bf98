"""The hot path's caches (``qna_triton._cache``): a call whose key was seen reuses the checks and the launch
description, any change of the key (shapes, strides, dtypes, the environment's settings, a forced
algorithm, the tuned files after ``tuning.clear_cache``) is described afresh, results are those of an
uncached call, and bad input is still rejected by name before any launch."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, make_inputs

import qna_triton.kernels.launch as launch
from qna_triton import QnA, _cache, qna_attention, tuning
from qna_triton.kernels import qna_backward, qna_forward

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASE = Case(B=1, H=5, W=6, N=2, h=2, d=4, k=3, s=1, p=1)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch of the test, as ``(kernel, grid, keyword arguments)``; the kernels still run."""
    seen = []
    run = launch._launch

    def recording(fn, grid, args, options):
        seen.append((fn, grid, dict(zip(fn.arg_names, args), **options)))
        return run(fn, grid, args, options)

    monkeypatch.setattr(launch, "_launch", recording)
    return seen


def _constants(kwargs):
    return {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}


def _forward_backward(logits, values, rpb, scale, geometry, seed=1):
    out, lse = qna_forward(logits, values, rpb, scale, *geometry)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out, lse, *qna_backward(g, logits, values, rpb, scale, lse, *geometry))


def test_a_cached_call_gives_the_uncached_results_and_launches(launches):
    """The second call of a key is served from the caches (no new entry), launches the same kernels with
    the same constants on its own tensors, and gives bit-identical results; so does a call after the
    caches are emptied."""
    inputs = make_inputs(CASE, dtype=torch.float32)
    first = _forward_backward(*inputs, CASE.geometry)
    filled = len(launch._FORWARD_PLANS), len(launch._BACKWARD_PLANS)
    assert filled == (1, 1)
    described = [(fn, grid, _constants(kw)) for fn, grid, kw in launches]
    launches.clear()

    inputs2 = tuple(t.clone() for t in inputs)  # other tensors, same key
    second = _forward_backward(*inputs2, CASE.geometry)
    assert (len(launch._FORWARD_PLANS), len(launch._BACKWARD_PLANS)) == filled
    assert [(fn, grid, _constants(kw)) for fn, grid, kw in launches] == described
    for _, _, kw in launches:  # the cached launches read and write this call's tensors
        assert kw["L"] is inputs2[0] and kw["V"] is inputs2[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)

    _cache.clear_all()
    for a, b in zip(first, _forward_backward(*inputs, CASE.geometry)):
        assert torch.equal(a, b)


def test_a_changed_key_is_not_served_a_stale_launch(launches, monkeypatch):
    """Shapes, strides, dtypes, a missing scale, QNA_TRITON_ALGO and kernel_algorithm each change what is
    launched; each gets its own description, and its results match the float64 oracle's as uncached."""

    def described(*inputs, geometry=CASE.geometry):
        launches.clear()
        out, _ = qna_forward(*inputs, *geometry)
        (fn, grid, kw) = launches[-1]
        return out, fn, grid, _constants(kw)

    logits, values, rpb, scale = make_inputs(CASE, dtype=torch.float32)
    _, fn, grid, base = described(logits, values, rpb, scale)

    # strides: query-minor logits are read with compile-time offsets
    qm = make_inputs(CASE, dtype=torch.float32, query_minor_logits=True)[0]
    assert base["L_HN"] is False and described(qm, values, rpb, scale)[3]["L_HN"] is True
    # shapes
    bigger = make_inputs(Case(B=2, H=5, W=7, N=2, h=2, d=4, k=3, s=1, p=1), dtype=torch.float32)
    assert described(*bigger)[3]["SIZES"] == (2, 5, 7, 5, 7, 2)
    # dtypes: the output follows the values
    out16 = described(*make_inputs(CASE, dtype=torch.bfloat16))[0]
    assert out16.dtype == torch.bfloat16
    # no scale
    assert described(logits, values, rpb, None)[3]["HAS_SCALE"] is False
    # the environment's algorithm, then one forced in code over it
    monkeypatch.setenv(tuning.ALGO_ENV, "banded")
    assert described(logits, values, rpb, scale)[1] is launch.qna_banded_kernel
    with tuning.kernel_algorithm("direct"):
        assert described(logits, values, rpb, scale)[1] is launch.qna_fwd_kernel
    monkeypatch.setenv(tuning.ALGO_ENV, "direct")
    out, fn2, grid2, again = described(logits, values, rpb, scale)
    assert (fn2, grid2, again) == (fn, grid, base)  # the first key's description, unchanged

    # one description per key above: the first and the last differ in QNA_TRITON_ALGO (unset, "direct")
    assert len(launch._FORWARD_PLANS) == 8
    _cache.clear_all()
    assert torch.equal(out, described(logits, values, rpb, scale)[0])


def test_changed_environment_settings_take_effect_at_the_next_call(monkeypatch):
    """The backend is read under the environment's settings at every call: a bad value raises at once,
    a good one takes effect, as when the environment was read at every call."""
    logits, values, rpb, scale = make_inputs(CASE, dtype=torch.float32)
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    out = qna_attention(logits, values, rpb, scale, 3)
    monkeypatch.setenv("QNA_TRITON_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="QNA_TRITON_BACKEND"):
        qna_attention(logits, values, rpb, scale, 3)
    monkeypatch.setenv("QNA_TRITON_BACKEND", "reference")
    ref = qna_attention(logits, values, rpb, scale, 3)
    torch.testing.assert_close(ref, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda l, v, r, a: (l, v.to(torch.int32), r, a), TypeError, "values must be float16"),
        (lambda l, v, r, a: (l, v.double(), r, a), TypeError, "values dtype torch.float64 differs"),
        (lambda l, v, r, a: (l, v[:, :4], r, a), ValueError, "values shape"),
        (lambda l, v, r, a: (l, v, r[:4], a), ValueError, r"rpb must have shape \[k_h\*k_w"),
        (lambda l, v, r, a: (l, v, r, a.unsqueeze(0)), ValueError, "scale must have shape"),
        (lambda l, v, r, a: (l, v, r, a.tolist()), TypeError, "scale must be a torch.Tensor"),
        (lambda l, v, r, a: (l[..., :0], v, r, a), ValueError, "values shape"),
        (lambda l, v, r, a: (l, v, r, a.to("meta")), ValueError, "scale is on meta"),
    ],
)
def test_a_cached_path_still_rejects_bad_input_by_name_before_any_launch(mutate, exc, pattern, launches, monkeypatch):
    """After a valid call has filled the caches, bad input raises the checks' error naming the argument,
    and nothing is launched."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    inputs = make_inputs(CASE, dtype=torch.float32)
    qna_attention(*inputs, 3)
    qna_attention(*inputs, 3)  # served from the caches
    launches.clear()
    with pytest.raises(exc, match=pattern):
        qna_attention(*mutate(*inputs), 3)
    with pytest.raises(exc, match=pattern):  # and again: an error is never cached as valid
        qna_attention(*mutate(*inputs), 3)
    assert launches == []


def test_the_layer_reuses_its_description_with_the_same_results(monkeypatch, launches):
    """The QnA layer's packed path: the second step of the same shapes is served from the caches, with
    the same output and gradients as the first."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
    torch.manual_seed(0)
    layer = QnA(8, 8, heads=2, kernel_size=3, n_queries=2)
    x = torch.randn(1, 5, 6, 8)

    def step():
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    y1, g1 = step()
    filled = len(launch._FORWARD_PLANS), len(launch._BACKWARD_PLANS)
    y2, g2 = step()
    assert filled == (1, 1) and (len(launch._FORWARD_PLANS), len(launch._BACKWARD_PLANS)) == filled
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_one_tensor_as_logits_and_values_is_not_cached():
    """A launch description names each tensor by the buffer it is: where one tensor is two buffers (the
    same tensor as logits and values), no description is cached, and a later call of the same shapes
    with two tensors reads each where it belongs."""
    case = Case(B=1, H=4, W=4, N=2, h=2, d=2, k=3, s=1, p=1)
    t, _, rpb, scale = make_inputs(case, dtype=torch.float32)
    out, _ = qna_forward(t, t, rpb, scale, *case.geometry)
    assert len(launch._FORWARD_PLANS) == 0
    v = t.clone() * 2
    ref, _ = qna_forward(t, v, rpb, scale, *case.geometry)
    again, _ = qna_forward(t, v, rpb, scale, *case.geometry)
    assert not torch.equal(out, ref) and torch.equal(ref, again)
