"""The references against each other (float64) and against autograd."""

import math

import pytest
import torch
from helpers import Case, make_inputs, oracle, random_cases

from qna_triton import qna_attention
from qna_triton.reference import (
    direct_qna_attention,
    direct_qna_attention_backward,
    naive_qna_attention,
    paper_qna_attention,
)

SWEEP = random_cases(40, seed=1234)


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_paper_and_direct_forms_match_naive(case):
    logits, values, rpb, scale = make_inputs(case)
    ref = naive_qna_attention(logits, values, rpb, scale, *case.geometry)
    assert ref.shape == (case.B, *case.out_hw, case.h, case.d)
    out_p, lse_p = paper_qna_attention(logits, values, rpb, scale, *case.geometry)
    out_d, lse_d = direct_qna_attention(logits, values, rpb, scale, *case.geometry)
    torch.testing.assert_close(out_p, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_d, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_p, lse_d, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", SWEEP[:12], ids=str)
def test_analytic_backward_matches_autograd_of_naive(case):
    logits, values, rpb, scale = make_inputs(case)
    inputs = [t.clone().requires_grad_() for t in (logits, values, rpb) + ((scale,) if scale is not None else ())]
    out = naive_qna_attention(*inputs[:3], inputs[3] if scale is not None else None, *case.geometry)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, g)
    _, lse = direct_qna_attention(logits, values, rpb, scale, *case.geometry)
    got = direct_qna_attention_backward(g, logits, values, rpb, scale, lse, *case.geometry)
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


GRAD_CASES = [
    Case(B=1, H=5, W=4, N=2, h=2, d=3, k=3, s=1, p=1),
    Case(B=2, H=5, W=6, N=1, h=3, d=2, k=(2, 3), s=(2, 1), p=(2, 0)),
    Case(B=1, H=4, W=4, N=3, h=1, d=2, k=4, s=3, p=4, with_scale=False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("form", ["naive", "paper", "op"])
def test_gradcheck(case, form):
    inputs = [t.requires_grad_() for t in make_inputs(case) if t is not None]

    def fn(*ts):
        scale = ts[3] if len(ts) > 3 else None
        if form == "naive":
            return naive_qna_attention(ts[0], ts[1], ts[2], scale, *case.geometry)
        if form == "paper":
            return paper_qna_attention(ts[0], ts[1], ts[2], scale, *case.geometry)[0]
        return qna_attention(ts[0], ts[1], ts[2], scale, *case.geometry)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_extreme_logits_stay_finite_float32():
    case = Case(B=2, H=9, W=8, N=2, h=3, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, logit_scale=1e4)
    ref = oracle(logits, values, rpb, scale, case.geometry)
    assert torch.isfinite(ref).all()
    for fn in (qna_attention, lambda *a: paper_qna_attention(*a)[0], lambda *a: direct_qna_attention(*a)[0]):
        out = fn(logits.float(), values.float(), rpb.float(), scale.float(), *case.geometry)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


def test_extreme_logits_gradients_finite():
    case = Case(B=1, H=6, W=6, N=2, h=2, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, logit_scale=1e4)
    ts = [t.requires_grad_() for t in (logits, values, rpb, scale)]
    qna_attention(*ts, *case.geometry).square().sum().backward()
    for t in ts:
        assert torch.isfinite(t.grad).all()


def test_window_entirely_in_padding_gives_zero():
    # 2x2 image, 1x1 window, padding 2: the border outputs see only padding
    case = Case(B=1, H=2, W=2, N=2, h=2, d=3, k=1, s=1, p=2)
    logits, values, rpb, scale = make_inputs(case)
    for out in (
        naive_qna_attention(logits, values, rpb, scale, *case.geometry),
        paper_qna_attention(logits, values, rpb, scale, *case.geometry)[0],
        direct_qna_attention(logits, values, rpb, scale, *case.geometry)[0],
        qna_attention(logits, values, rpb, scale, *case.geometry),
    ):
        assert out.shape == (1, 6, 6, 2, 3)
        assert torch.isfinite(out).all()
        inside = torch.zeros(6, 6, dtype=torch.bool)
        inside[2:4, 2:4] = True
        assert (out[:, ~inside] == 0).all()
        assert (out[:, inside] != 0).any()


def test_global_window_equals_softmax_pool():
    # k equal to the image, padding 0: one output pixel, a plain softmax pooling per query
    case = Case(B=2, H=5, W=5, N=2, h=3, d=4, k=5, s=1, p=0, with_scale=False)
    logits, values, rpb, _ = make_inputs(case)
    out = qna_attention(logits, values, rpb, None, *case.geometry)
    z = (logits + rpb.reshape(5, 5, 2, 3)).reshape(2, 25, 2, 3)
    p = torch.softmax(z, dim=1)
    expected = torch.einsum("bknj,bkjt->bjt", p, values.reshape(2, 25, 3, 4))
    torch.testing.assert_close(out.reshape(2, 3, 4), expected)
    assert not math.isnan(out.sum().item())
