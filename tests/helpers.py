"""Shared test helpers: random problems, the float64 oracle, kernel-vs-oracle checks."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from qna_triton import qna_attention
from qna_triton.layout import output_size
from qna_triton.reference import RESULT_TOLERANCE, naive_qna_attention

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


Pair = Tuple[int, int]


def _pair(v: Union[int, Pair]) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True, init=False)
class Case:
    """One core-op problem, built from keywords only: ``Case(B=1, H=6, W=7, N=2, h=2, d=8, k=3, s=1, p=1)``.

    ``B`` images of ``H x W`` pixels, ``N`` queries, ``h`` heads of dimension ``d``; window ``k``, stride
    ``s`` and padding ``p`` each an int or an ``(height, width)`` pair; ``with_scale=False`` runs
    without the attention scale.
    """

    B: int
    H: int
    W: int
    N: int
    h: int
    d: int
    k: Pair
    s: Pair
    p: Pair
    with_scale: bool

    def __init__(
        self,
        *,
        B: int,
        H: int,
        W: int,
        N: int,
        h: int,
        d: int,
        k: Union[int, Pair],
        s: Union[int, Pair],
        p: Union[int, Pair],
        with_scale: bool = True,
    ) -> None:
        for name, value in (
            ("B", B),
            ("H", H),
            ("W", W),
            ("N", N),
            ("h", h),
            ("d", d),
            ("k", _pair(k)),
            ("s", _pair(s)),
            ("p", _pair(p)),
            ("with_scale", bool(with_scale)),
        ):
            object.__setattr__(self, name, value)

    kh = property(lambda self: self.k[0])
    kw = property(lambda self: self.k[1])
    sh = property(lambda self: self.s[0])
    sw = property(lambda self: self.s[1])
    ph = property(lambda self: self.p[0])
    pw = property(lambda self: self.p[1])

    @property
    def geometry(self) -> Tuple[Pair, Pair, Pair]:
        return self.k, self.s, self.p

    @property
    def out_hw(self) -> Pair:
        return output_size(self.H, self.kh, self.sh, self.ph), output_size(self.W, self.kw, self.sw, self.pw)

    def __str__(self) -> str:
        return (
            f"B{self.B}_{self.H}x{self.W}_N{self.N}_h{self.h}_d{self.d}_k{self.kh}x{self.kw}"
            f"_s{self.sh}x{self.sw}_p{self.ph}x{self.pw}{'' if self.with_scale else '_noscale'}"
        )


def random_cases(n: int, seed: int, max_k: int = 7, head_dims=(1, 3, 8, 12, 16)) -> list:
    """``n`` random valid configurations: odd/non-square images, even/non-square windows, stride 1-3,
    padding 0..k, 1-4 queries, 1-8 heads."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.randint(1, max_k), rng.randint(1, max_k)
        if rng.random() < 0.5:
            kw = kh
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, kh), rng.randint(0, kw)
        H, W = rng.randint(1, 11), rng.randint(1, 11)
        if kh > H + 2 * ph or kw > W + 2 * pw:
            continue
        cases.append(
            Case(
                B=rng.randint(1, 2),
                H=H,
                W=W,
                N=rng.randint(1, 4),
                h=rng.randint(1, 8),
                d=rng.choice(head_dims),
                k=(kh, kw),
                s=(sh, sw),
                p=(ph, pw),
                with_scale=rng.random() < 0.8,
            )
        )
    return cases


def make_inputs(
    case: Case,
    dtype=torch.float64,
    device="cpu",
    seed: int = 0,
    logit_scale: float = 2.0,
    query_minor_logits: bool = False,
):
    """Random ``logits, values, rpb, scale``; ``query_minor_logits`` stores the logits as the QnA
    layer's packed projection does (same values, other strides: the kernels' fast path)."""
    g = torch.Generator().manual_seed(seed)
    K = case.kh * case.kw

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    logits = rnd(case.B, case.H, case.W, case.N, case.h, s=logit_scale)
    values = rnd(case.B, case.H, case.W, case.h, case.d)
    rpb = rnd(K, case.N, case.h, s=0.5)
    scale = rnd(K, case.N, case.h) if case.with_scale else None
    if query_minor_logits:
        logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    return logits, values, rpb, scale


def oracle(logits, values, rpb, scale: Optional[torch.Tensor], geometry) -> torch.Tensor:
    """The float64 naive reference, whatever the inputs' dtype."""
    f = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return naive_qna_attention(f(logits), f(values), f(rpb), f(scale), *geometry)


def check_error(got, expected, ref_same_precision, dtype, what):
    """Kernel error at most twice the reference path's error at the same precision, plus a small atol."""
    scale = expected.abs().max().clamp_min(1.0).item()
    err = (got.double() - expected).abs().max().item()
    ref_err = (ref_same_precision.double() - expected).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= 2 * ref_err + RESULT_TOLERANCE[dtype] * scale, f"{what}: error {err:.3g} vs reference {ref_err:.3g}"


def run_op(case, dtype, backend, monkeypatch, logit_scale=2.0, query_minor=False):
    """``qna_attention`` of ``case``'s inputs on ``backend``: ``(out, input gradients, output gradient)``."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
    inputs = [
        t
        for t in make_inputs(case, dtype=dtype, device=DEVICE, logit_scale=logit_scale, query_minor_logits=query_minor)
    ]
    inputs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = qna_attention(*inputs, *case.geometry)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], g)
    return out.detach(), grads, g


def assert_op_matches_oracle(case, dtype, monkeypatch, query_minor: bool) -> None:
    """The op on the Triton backend: output and every gradient against the float64 naive form, within
    twice the reference path's error at the same precision (:func:`check_error`)."""
    out, grads, g = run_op(case, dtype, "triton", monkeypatch, query_minor=query_minor)
    out_ref, grads_ref, _ = run_op(case, dtype, "reference", monkeypatch, query_minor=query_minor)
    leaves = [
        t.detach().double().cpu().requires_grad_() if t is not None else None
        for t in make_inputs(case, dtype=dtype, device=DEVICE)
    ]
    exact = naive_qna_attention(*leaves, *case.geometry)
    exact_grads = torch.autograd.grad(exact, [t for t in leaves if t is not None], g.double().cpu())
    assert out.shape == exact.shape and out.dtype == dtype
    check_error(out.cpu(), exact, out_ref.cpu(), dtype, "out")
    for name, a, r, e in zip(("dlogits", "dvalues", "drpb", "dscale"), grads, grads_ref, exact_grads):
        check_error(a.cpu(), e, r.cpu(), dtype, name)


def assert_layer_matches_reference_path(layer, x, monkeypatch):
    """The layer's output and parameter gradients through the kernels equal the reference path's."""
    with torch.no_grad():
        layer.rpe_bias.normal_()
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y_t, g_t), (y_r, g_r) = results
    torch.testing.assert_close(y_t, y_r, rtol=1e-4, atol=1e-5)
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], rtol=1e-4, atol=1e-5, msg=name)


def small_core_inputs():
    """Valid float32 core-op inputs (k = 3): what :data:`BAD_CORE`'s calls spoil one argument of."""
    return (torch.randn(1, 6, 6, 2, 3), torch.randn(1, 6, 6, 3, 4), torch.randn(9, 2, 3), torch.randn(9, 2, 3))


# Core-op calls on bad input, each with the exception and the message it must raise before any kernel.
BAD_CORE = [
    (lambda l, v, r, a: qna_attention(l[0], v, r, a), ValueError, "logits must have shape"),
    (lambda l, v, r, a: qna_attention(l, v[..., 0], r, a), ValueError, "values must have shape"),
    (lambda l, v, r, a: qna_attention(l, v.double(), r, a), TypeError, "values dtype"),
    (lambda l, v, r, a: qna_attention(l.int(), v, r, a), TypeError, "logits must be float"),
    (lambda l, v, r, a: qna_attention(l, v[:, :5], r, a), ValueError, "values shape"),
    (lambda l, v, r, a: qna_attention(l, v[:, :, :, :2], r, a), ValueError, "values shape"),
    (lambda l, v, r, a: qna_attention(l, v, r[:4], a), ValueError, "rpb must have shape"),
    (lambda l, v, r, a: qna_attention(l, v, r, a[..., :2]), ValueError, "scale must have shape"),
    (lambda l, v, r, a: qna_attention(l, v, r, a.to("meta")), ValueError, "scale is on meta"),
    (lambda l, v, r, a: qna_attention(l, v.to("meta"), r, a), ValueError, "values is on meta"),
    (lambda l, v, r, a: qna_attention(l, v, None, None, kernel_size=9, padding=1), ValueError, "kernel_size 9"),
    (lambda l, v, r, a: qna_attention(l, v, r, a, stride=0), ValueError, "stride"),
    (lambda l, v, r, a: qna_attention(l, v, r, a, padding=-2), ValueError, "padding"),
    (lambda l, v, r, a: qna_attention(l, v, r, a, kernel_size="3"), TypeError, "kernel_size"),
    (lambda l, v, r, a: qna_attention(l, v, r.numpy(), a), TypeError, "rpb must be a torch.Tensor"),
]


# A two-stage QnA-ViT small enough to export and compile ahead of time in seconds on a CPU: a QnA
# block, a stride-2 down-sampling QnA block, an LSA block; maps 8 then 4 at 32x32 (any multiple of 16).
DEPLOY_VIT = dict(
    base_dim=16,
    qna_layers=(1, 0),
    lsa_layers=(0, 1),
    qna_heads=(2, 4),
    lsa_heads=(1, 2),
    lsa_window=(4, 4),
    kernel_size=(3, 3),
    num_classes=10,
)
