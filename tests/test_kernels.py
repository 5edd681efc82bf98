"""The fused Triton kernels (through the custom op) against the float64 oracle.

On a CPU-only machine they run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``);
on a GPU the same tests run the compiled kernels. ``QNA_TEST_SWEEP`` sets the size of the random
sweep (default 16; run 500+ on demand), ``QNA_TEST_BANDED_SWEEP`` that of the banded kernels' one
(test_banded.py, default 4).
"""

import math
import os

import pytest
import torch
from helpers import (
    BAD_CORE,
    DEVICE,
    DTYPES,
    Case,
    assert_layer_matches_reference_path,
    assert_op_matches_oracle,
    make_inputs,
    oracle,
    random_cases,
    small_core_inputs,
)

from qna_triton import qna_attention, tuning
from qna_triton.reference import naive_qna_attention

SWEEP_SIZE = int(os.environ.get("QNA_TEST_SWEEP", "16"))

# Shapes the issue names explicitly: head dims 8..128, 1..8 queries, even and large windows, the
# global window (k equal to the image), stride > 1, padding 0.
NAMED = [
    Case(B=1, H=6, W=7, N=2, h=2, d=8, k=3, s=1, p=1),
    Case(B=1, H=5, W=5, N=2, h=1, d=12, k=3, s=1, p=1),
    Case(B=1, H=5, W=6, N=1, h=2, d=16, k=5, s=2, p=2),
    Case(B=1, H=4, W=5, N=2, h=1, d=32, k=3, s=1, p=1),
    Case(B=1, H=4, W=4, N=2, h=2, d=64, k=2, s=1, p=0),
    Case(B=1, H=3, W=4, N=1, h=1, d=128, k=3, s=1, p=1),
    Case(B=2, H=6, W=6, N=8, h=3, d=4, k=3, s=1, p=1),
    Case(B=1, H=7, W=7, N=2, h=4, d=4, k=7, s=1, p=0, with_scale=False),
    Case(B=1, H=8, W=6, N=3, h=2, d=4, k=(4, 6), s=(2, 3), p=(3, 0)),
    Case(B=1, H=9, W=9, N=2, h=2, d=3, k=9, s=1, p=4),
]
# Each case runs with the logits in one of the two layouts the kernels compile differently for:
# [N, h] per pixel (generic strides) and query-minor [h, N] (the QnA layer's layout, compile-time offsets).
# The named cases run in both layouts and every dtype; the random ones take turns with both (the dtype
# changes only the loads' and stores' conversions, which the named cases cover).
_RANDOM = random_cases(SWEEP_SIZE, seed=99, max_k=9, head_dims=(1, 5, 8, 12, 16, 32))
SWEEP = [
    pytest.param(c, qm, dt, id=f"{c}{'_qm' if qm else ''}-{dt}") for c in NAMED for qm in (False, True) for dt in DTYPES
] + [
    pytest.param(c, i % 2 == 1, DTYPES[i % 3], id=f"{c}{'_qm' if i % 2 else ''}-{DTYPES[i % 3]}")
    for i, c in enumerate(_RANDOM)
]


@pytest.mark.parametrize("case, query_minor, dtype", SWEEP)
def test_forward_and_gradients_match_oracle(case, query_minor, dtype, monkeypatch, nan_poison):
    assert_op_matches_oracle(case, dtype, monkeypatch, query_minor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(dtype, monkeypatch, triton_backend):
    case = Case(B=2, H=7, W=6, N=2, h=2, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=dtype, device=DEVICE, logit_scale=1e4)
    ts = [t.clone().requires_grad_() for t in (logits, values, rpb, scale)]
    out = qna_attention(*ts, *case.geometry)
    assert torch.isfinite(out).all()
    expected = oracle(logits, values, rpb, scale, case.geometry)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=5e-3, atol=5e-3)
    out.float().square().sum().backward()
    for t in ts:
        assert torch.isfinite(t.grad).all()


def test_window_in_padding_only_gives_zero(triton_backend, nan_poison):
    case = Case(B=1, H=2, W=2, N=2, h=2, d=3, k=1, s=1, p=2)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, device=DEVICE)
    out = qna_attention(logits, values, rpb, scale, *case.geometry).cpu()
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[2:4, 2:4] = True
    assert (out[:, ~inside] == 0).all() and torch.isfinite(out).all()


def test_backward_finite_when_bias_masks_every_offset_of_a_window(monkeypatch):
    """rpb = -inf masks offsets; at the top border every in-image offset is masked: lse = -inf,
    output 0, and the gradients must be finite and equal the reference path's."""
    torch.manual_seed(0)
    logits, values = torch.randn(1, 4, 4, 1, 1, device=DEVICE), torch.randn(1, 4, 4, 1, 2, device=DEVICE)
    rpb = torch.zeros(9, 1, 1, device=DEVICE)
    rpb[3:] = -math.inf  # only window row u = 0 allowed; for output row 0 that row is padding
    grads = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QNA_TRITON_BACKEND", backend)
        ts = [t.clone().requires_grad_() for t in (logits, values, rpb)]
        qna_attention(*ts, None, 3).sum().backward()
        grads[backend] = [t.grad for t in ts]
    for ref, got in zip(grads["reference"], grads["triton"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("algo", ["auto", "banded"])
def test_backward_is_deterministic(triton_backend, algo):
    """Two runs give bitwise-identical gradients, with the direct kernels and with the banded ones
    (whose main backward kernel keeps per-tile scratch rows of drpb / dscale before adding them)."""
    case = Case(B=2, H=9, W=9, N=2, h=4, d=8, k=5, s=1, p=2)
    runs = []
    with tuning.kernel_algorithm(algo):
        for _ in range(2):
            ts = [t.clone().requires_grad_() for t in make_inputs(case, dtype=torch.float32, device=DEVICE)]
            out = qna_attention(*ts, *case.geometry)
            out.backward(torch.ones_like(out))
            runs.append([t.grad.clone() for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(triton_backend):
    torch.manual_seed(0)
    B, H, W, N, h, d = 2, 6, 5, 2, 3, 4
    qv = torch.randn(B, H, W, N * h + h * d + 3, device=DEVICE)  # a fused projection with spare columns
    logits = qv[..., : N * h].unflatten(-1, (N, h))
    values = qv[..., N * h : N * h + h * d].unflatten(-1, (h, d))
    values_t = torch.randn(B, W, H, h, d, device=DEVICE).transpose(1, 2)  # spatially transposed
    rpb = torch.randn(9, N, h, device=DEVICE)
    for v in (values, values_t):
        assert not logits.is_contiguous() and not v.is_contiguous()
        out = qna_attention(logits, v, rpb, None, 3)
        expected = oracle(logits, v, rpb, None, ((3, 3), (1, 1), (1, 1)))
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_query_minor_logits_fast_path(triton_backend):
    """Logits stored [h, N] per pixel inside a wider projection (the layer's layout, compiled with
    compile-time offsets) give the oracle's output and gradients, and dlogits keeps that layout."""
    from qna_triton.layout import is_query_minor

    torch.manual_seed(0)
    B, H, W, N, h, d, k = 2, 6, 5, 3, 4, 8, 3
    qv = torch.randn(B, H, W, h * N + h * d + 5, device=DEVICE)
    logits = qv[..., : h * N].unflatten(-1, (h, N)).transpose(-1, -2).detach().requires_grad_()
    values = qv[..., h * N : h * N + h * d].unflatten(-1, (h, d)).detach().requires_grad_()
    rpb = torch.randn(k * k, N, h, device=DEVICE, requires_grad=True)
    assert is_query_minor(logits) and not logits.is_contiguous()
    out = qna_attention(logits, values, rpb, None, k)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (logits, values, rpb), g)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (logits, values, rpb)]
    expected = naive_qna_attention(*ref_in, None, (k, k), (1, 1), (1, 1))
    ref_grads = torch.autograd.grad(expected, ref_in, g.double().cpu())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert is_query_minor(grads[0])


def _tile_kinds(H: int, W: int, k: int, s: int, p: int, block_p: int) -> set:
    """The kinds of the forward's ``block_p``-pixel tiles on this image: "interior" (every window
    inside the image), "border" and "partial" (the last tile, with pixels beyond the image)."""
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    kinds = set()
    for t in range(0, Ho * Wo, block_p):
        if t + block_p > Ho * Wo:
            kinds.add("partial")
            continue
        inside = all(
            0 <= (q // Wo) * s - p
            and (q // Wo) * s - p + k <= H
            and 0 <= (q % Wo) * s - p
            and (q % Wo) * s - p + k <= W
            for q in range(t, t + block_p)
        )
        kinds.add("interior" if inside else "border")
    return kinds


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 2), (1, 0)])
def test_interior_and_border_tiles(stride, padding, triton_backend):
    """Small tiles on a larger image, so one launch has tiles whose windows all lie inside the image
    (the forward and delta kernels then run their loops without bounds checks) next to border and
    partial tiles: every pixel and the delta-dependent gradients match the float64 direct form."""
    from qna_triton.kernels import qna_backward, qna_forward
    from qna_triton.reference import direct_qna_attention, direct_qna_attention_backward
    from qna_triton.tuning import KernelConfig

    torch.manual_seed(0)
    B, H, W, N, h, d, k = 1, 9, 11, 2, 2, 8, 3
    logits = torch.randn(B, H, W, h, N, device=DEVICE).transpose(-1, -2) * 2
    values = torch.randn(B, H, W, h, d, device=DEVICE)
    rpb, scale = torch.randn(k * k, N, h, device=DEVICE), torch.randn(k * k, N, h, device=DEVICE)
    geo = ((k, k), (stride, stride), (padding, padding))
    small = KernelConfig(block_p=4, block_h=2)
    # (no padding: every window lies inside the image, so no tile is a border one)
    assert _tile_kinds(H, W, k, stride, padding, small.block_p) == (
        {"interior", "border", "partial"} if padding else {"interior", "partial"}
    )
    out, lse = qna_forward(logits, values, rpb, scale, *geo, config=small)
    g = torch.randn_like(out)
    grads = qna_backward(g, logits, values, rpb, scale, lse, *geo, config=small, delta_config=small)
    f64 = [t.double().cpu() for t in (logits, values, rpb, scale)]
    out_ref, lse_ref = direct_qna_attention(*f64, *geo)
    grads_ref = direct_qna_attention_backward(g.double().cpu(), *f64, lse_ref, *geo)
    torch.testing.assert_close(out.double().cpu(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_backward_grid_keeps_occupancy_and_bounds_its_buffer(monkeypatch):
    """The backward kernels' persistent grid: the same resident warps per SM for every num_warps, never
    more programs than the SMs hold at once or than tiles, partial-sum rows within their byte budget."""
    from types import SimpleNamespace

    import qna_triton.kernels.launch as kernels

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    warps_per_sm = kernels._BWD_WARPS_PER_SM
    for warps in (1, 2, 4, 8):
        progs = kernels._num_programs(10**7, cuda, warps, 4, 49 * 32)
        assert progs * warps * 4 == 132 * warps_per_sm
    big = kernels._num_programs(10**7, cuda, 1, 1, 961 * 32)  # k = 31: the byte cap decides
    assert big * 961 * 32 * 4 <= kernels._PARTIAL_ROWS_BYTES < (big + 1) * 961 * 32 * 4
    assert kernels._num_programs(3, cuda, 1, 1, 10) == 3
    assert kernels._num_programs(100, torch.device("cpu")) == 4
    # no more programs than the SMs hold at once: a second, partial wave would idle the first's SMs
    assert kernels._num_programs(10**7, cuda, 1, 4, 49 * 32, resident=21) == 132 * 21 // 4
    assert kernels._num_programs(10**7, cuda, 8, 16, 49 * 32, resident=1) == 132 // 16
    assert kernels._num_programs(10**7, cuda, 4, 4, 49 * 32, resident=12) == 132 * 8 // 4  # the aim binds


def test_resident_programs_by_registers_threads_and_shared_memory():
    """What one SM holds of a compiled kernel (64 Ki registers allocated per warp in units of 256,
    2048 threads, 228 KiB of shared memory with 1 KiB reserved per program: an H100)."""
    from qna_triton.kernels import resident_programs

    h100 = dict(threads_per_sm=2048, shared_per_sm=233472)
    assert resident_programs(56, 4, 0, **h100) == 9  # 1792 registers per warp: 36 warps
    assert resident_programs(80, 1, 0, **h100) == 25  # 2560 per warp
    assert resident_programs(96, 1, 0, **h100) == 21  # 3072 per warp
    assert resident_programs(97, 1, 0, **h100) == 19  # 3104, allocated as 3328
    assert resident_programs(238, 8, 0, **h100) == 1  # 7616 -> 7680 per warp: 8 warps
    assert resident_programs(255, 16, 0, **h100) == 1  # not even one by registers: still 1
    assert resident_programs(16, 1, 0, **h100) == 32  # the per-SM program limit
    assert resident_programs(16, 4, 0, **h100) == 16  # the thread limit: 64 warps
    assert resident_programs(32, 4, 48 * 1024, **h100) == 4  # shared memory: 228 KiB / 49 KiB


def test_pixel_alignment_of_strides():
    """The kernels get pixel strides divided by their alignment and multiply it back as a constant:
    the largest power of two (up to 16 bytes of elements) dividing every pixel stride of size > 1."""
    from qna_triton.kernels.launch import _pixel_align, _pixel_strides

    def packed(width, dtype=torch.bfloat16, B=2):
        return torch.empty(B, 3, 5, width, dtype=dtype)[..., :8].unflatten(-1, (2, 4))

    assert _pixel_align(packed(136)) == 8 and _pixel_align(packed(132)) == 4
    assert _pixel_align(packed(131)) == 1 and _pixel_align(packed(136, torch.float32)) == 4
    assert _pixel_align(packed(132, B=1)) == 4  # a batch of one: its stride never multiplies a nonzero index
    t = packed(136)
    assert [s * 8 for s in _pixel_strides(t)[:3]] == list(t.stride()[:3])
    # a batch stride of 2^31 elements or more is passed undivided: the kernels multiply the alignment
    # back in the argument's own integer type, and a quotient that fits 32 bits would wrap there
    huge = torch.empty(0, dtype=torch.bfloat16, device="meta").as_strided((2, 1, 1, 1, 8), (2**31 + 8, 8, 8, 8, 1))
    assert _pixel_align(huge) == 1 and _pixel_strides(huge)[0] == 2**31 + 8


def test_bad_input_raises_before_any_kernel(monkeypatch, triton_backend):
    import qna_triton.kernels as kernels

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernels, "qna_forward", no_launch)
    monkeypatch.setattr(kernels, "qna_backward", no_launch)
    for call, exc, pattern in BAD_CORE:
        with pytest.raises(exc, match=pattern):
            call(*small_core_inputs())


@pytest.mark.parametrize("mode", ["normal", "none"])
def test_layer_triton_matches_reference_path(mode, monkeypatch, nan_poison):
    """The QnA layer's packed path (one projection, one gradient tensor) through the kernels."""
    from qna_triton import QnA

    torch.manual_seed(0)
    layer = QnA(8, 12, 3, kernel_size=3, stride=2, n_queries=2, attn_scale=mode, use_bias=True).to(DEVICE)
    assert_layer_matches_reference_path(layer, torch.randn(2, 7, 6, 8, device=DEVICE), monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QNA_TEST_BIG") != "1", reason="needs ~9 GB of memory: set QNA_TEST_BIG=1")
def test_head_stride_beyond_2_31_elements(triton_backend):
    """A head-major values tensor whose last head starts past 2^31 elements: 64-bit head offsets."""
    S, h, base0 = 2**31 - 2**20, 3, 2**21
    store = torch.empty(base0 + 2 * S + 1, dtype=torch.float16, device=DEVICE)
    for j in range(h):
        store[base0 + j * S] = j + 1.0
    store[base0 + 2 * S - 2**32] = -7.0  # where a wrapped 32-bit offset of head 2 would land
    values = store.as_strided((1, 1, 1, h, 1), (1, 1, 1, S, 1), base0)
    out = qna_attention(torch.zeros(1, 1, 1, 1, h, dtype=torch.float16, device=DEVICE), values, None, None, 1)
    assert out.flatten().tolist() == [1.0, 2.0, 3.0]


@pytest.mark.gpu
@pytest.mark.slow
def test_beyond_2_31_elements():
    """64-bit offsets: a values tensor of more than 2^31 elements (4.3 GB in bfloat16)."""
    B, H, W, N, h, d = 2, 256, 256, 2, 128, 128  # values: 2^31 + ... elements
    B = (2**31) // (H * W * h * d) + 1
    logits = torch.randn(B, H, W, N, h, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(B, H, W, h, d, device="cuda", dtype=torch.bfloat16)
    assert values.numel() > 2**31
    rpb = torch.zeros(9, N, h, device="cuda")
    out = qna_attention(logits, values, rpb, None, 3)
    b = B - 1  # the last image sits past 2^31 elements: compare it with the reference on its own
    ref = qna_attention(logits[b:].float().cpu(), values[b:].float().cpu(), rpb.cpu(), None, 3)
    torch.testing.assert_close(out[b:].float().cpu(), ref, rtol=2e-2, atol=2e-2)
