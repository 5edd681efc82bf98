"""The banded (tensor-core) kernels, forward, the backward's delta and the main backward kernel, against
the float64 oracle and the direct kernels, their exact fallback, and their selection.

In the interpreter the bfloat16 value products are emulated (operands rounded to bfloat16, multiplied
in float32: the interpreter's own bf16 ``tl.dot`` is wrong), so the rounding a GPU does is the one
tested here.
"""

import json
import math
import os
import random

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, DTYPES, Case, assert_layer_matches_reference_path, assert_op_matches_oracle, make_inputs

from qna_triton import tuning
from qna_triton.kernels import launch, qna_backward, qna_forward
from qna_triton.kernels.banded import RANGE_LIMIT, _round_bf16
from qna_triton.reference import direct_qna_attention
from qna_triton.tuning import KernelConfig, banded_config

BANDED = KernelConfig(1, 1, 4, 1, "banded", 16, 16)
BANDED_BWD = KernelConfig(1, 1, 8, 1, "banded", 16, 16)


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, _round_bf16(tl.load(X + o)))


# windows from 1 to beyond the 16-column tile, even and non-square, stride and padding, several
# queries and heads, head dims that span several value chunks (40: three chunks of 16, one partial),
# images smaller and larger than one 16 x 16 tile, with and without scale
# (the two cases with several tiles run in one dtype each: the interpreter's backward is slow there)
SMALL = [
    Case(B=1, H=9, W=11, N=2, h=2, d=8, k=5, s=1, p=2),
    Case(B=1, H=12, W=13, N=1, h=3, d=5, k=(4, 6), s=(2, 3), p=(3, 0)),
    Case(B=1, H=6, W=7, N=2, h=2, d=40, k=3, s=1, p=1, with_scale=False),
    Case(B=1, H=5, W=5, N=1, h=2, d=4, k=1, s=1, p=0),
]
SWEEP = [pytest.param(c, dt, id=f"{c}-{dt}") for c in SMALL for dt in DTYPES] + [
    pytest.param(Case(B=1, H=17, W=20, N=3, h=2, d=16, k=7, s=1, p=3), torch.bfloat16, id="2x2_tiles_k7-bf16"),
    pytest.param(Case(B=1, H=17, W=18, N=2, h=1, d=4, k=11, s=1, p=5), torch.float16, id="2x2_tiles_k11-fp16"),
]


def _random_banded_cases(n: int, seed: int) -> list:
    """``n`` random shapes for the banded kernels: windows up to 19 columns (every third from 17: the
    main backward kernel's halo, ``16 + k_w - 1`` columns, then takes one or two 32-column chunks), even
    and non-square, images up to 20 pixels a side (one or two 16-pixel tiles), mostly stride 1 (the only
    stride of the banded main backward kernel), padding up to about half the window, 1-3 queries, head
    dims across value chunks. One image and one or two heads: the interpreter runs a banded program per
    head."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.randint(1, 19), rng.randint(17, 19) if len(cases) % 3 == 0 else rng.randint(1, 19)
        sh, sw = (1, 1) if rng.random() < 0.7 else (rng.randint(1, 3), rng.randint(1, 3))
        ph, pw = rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1)
        H, W = rng.randint(1, 20), rng.randint(1, 20)
        if kh > H + 2 * ph or kw > W + 2 * pw:
            continue
        cases.append(
            Case(
                B=1,
                H=H,
                W=W,
                N=rng.randint(1, 3),
                h=rng.randint(1, 2),
                d=rng.choice((1, 5, 8, 16, 24)),
                k=(kh, kw),
                s=(sh, sw),
                p=(ph, pw),
                with_scale=rng.random() < 0.8,
            )
        )
    return cases


# QNA_TEST_BANDED_SWEEP random shapes (default 4; 200+ on demand); dtype and logits layout take turns
RANDOM_SWEEP = [
    pytest.param(c, DTYPES[i % 3], i % 2 == 1, id=f"{c}{'_qm' if i % 2 else ''}-{DTYPES[i % 3]}")
    for i, c in enumerate(_random_banded_cases(int(os.environ.get("QNA_TEST_BANDED_SWEEP", "4")), 2026))
]


@pytest.fixture
def banded(monkeypatch):
    monkeypatch.setenv(tuning.ALGO_ENV, "banded")


@pytest.mark.parametrize("case, dtype", SWEEP)
def test_banded_forward_and_gradients_match_oracle(case, dtype, monkeypatch, banded, nan_poison):
    # the layer's query-minor layout where it differs from [N, h]
    assert_op_matches_oracle(case, dtype, monkeypatch, query_minor=case.N > 1 and case.h > 1)


@pytest.mark.parametrize("case, dtype, query_minor", RANDOM_SWEEP)
def test_banded_random_shapes_match_oracle(case, dtype, query_minor, monkeypatch, banded, nan_poison):
    assert_op_matches_oracle(case, dtype, monkeypatch, query_minor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_banded_lse_and_output_equal_the_direct_form(dtype):
    """float32 and float16 inputs use float32-accurate (tf32x3) products: the saved lse and the output
    agree with the float64 direct form to float32 / float16 rounding."""
    case = Case(B=2, H=17, W=20, N=3, h=2, d=16, k=7, s=1, p=3)
    logits, values, rpb, scale = make_inputs(case, dtype=dtype, device=DEVICE)
    out, lse = qna_forward(logits, values, rpb, scale, *case.geometry, config=BANDED)
    out_ref, lse_ref = direct_qna_attention(*(t.double().cpu() for t in (logits, values, rpb, scale)), *case.geometry)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().cpu(), out_ref, rtol=tol, atol=tol)


def test_bad_banded_tiles_raise_before_any_launch():
    logits, values = torch.randn(1, 5, 5, 1, 1), torch.randn(1, 5, 5, 1, 4)
    for bw, br in ((8, 16), (16, 24), (0, 16)):
        with pytest.raises(ValueError, match="block_w|block_r"):
            qna_forward(
                logits,
                values,
                torch.zeros(9, 1, 1),
                None,
                (3, 3),
                (1, 1),
                (1, 1),
                config=KernelConfig(1, 1, 4, 1, "banded", bw, br),
            )


def test_forcing_banded_on_a_gpu_without_bf16_tensor_cores_raises(monkeypatch):
    monkeypatch.setattr(tuning.selection, "_capability", lambda index: (7, 5))
    logits, values = torch.empty(1, 8, 8, 2, 4, device="meta"), torch.empty(1, 8, 8, 4, 8, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    with tuning.kernel_algorithm("banded"), pytest.raises(RuntimeError, match="sm_80"):
        tuning.get_config("fwd", logits, values, (7, 7), (1, 1))


def test_banded_non_contiguous_inputs():
    """Head-major logits and spatially transposed values (neither in the layer's layout: the generic
    strides path of the banded kernel) give the float64 direct form."""
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 1, 18, 17, 2, 3, 8, 5
    logits = torch.randn(B, h, N, H, W).permute(0, 3, 4, 2, 1)
    values = torch.randn(B, W, H, h, d).transpose(1, 2)
    rpb, scale = torch.randn(k * k, N, h), torch.randn(k * k, N, h)
    geo = ((k, k), (1, 1), (2, 2))
    out, lse = qna_forward(logits, values, rpb, scale, *geo, config=BANDED)
    out_ref, lse_ref = direct_qna_attention(*(t.double() for t in (logits, values, rpb, scale)), *geo)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ["direct", "banded"])
@pytest.mark.parametrize("query_minor", [False, True])
def test_64bit_offsets_give_the_same_results(query_minor, algo, monkeypatch):
    """The 64-bit offsets (``WIDE``, taken for tensors beyond 2^31 elements) forced on small tensors, in
    the generic and the layer's layout, through every kernel: bitwise the 32-bit results."""
    monkeypatch.setenv(tuning.ALGO_ENV, algo)
    case = Case(B=1, H=9, W=10, N=2, h=2, d=8, k=5, s=1, p=2)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.bfloat16, device=DEVICE, query_minor_logits=query_minor)
    values = values.transpose(-1, -2).contiguous().transpose(-1, -2)  # not [h, d] per pixel

    def run():
        out, lse = qna_forward(logits, values, rpb, scale, *case.geometry)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        return (out, lse, *qna_backward(g, logits, values, rpb, scale, lse, *case.geometry))

    narrow = run()
    monkeypatch.setattr(launch, "_wide_offsets", lambda *tensors: True)
    tuning.clear_cache()  # the layout constants of the first run's inputs are cached
    for a, b in zip(run(), narrow):
        assert torch.equal(a, b)


def test_tiles_too_wide_for_one_shift_take_the_exact_fallback():
    """One launch where some tiles' logits span more than RANGE_LIMIT (those run the direct algorithm)
    and others do not (the banded products): every pixel equals the float64 direct form. With a single
    shift those wide tiles would underflow to an lse of -inf."""
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 1, 20, 36, 2, 2, 8, 7
    logits = torch.randn(B, H, W, N, h)
    logits[:, :, 20:] *= 3 * RANGE_LIMIT  # the right-hand tiles only
    values, rpb, scale = torch.randn(B, H, W, h, d), torch.randn(k * k, N, h), torch.randn(k * k, N, h)
    geo = ((k, k), (1, 1), (3, 3))
    out, lse = qna_forward(logits, values, rpb, scale, *geo, config=BANDED)
    out_ref, lse_ref = direct_qna_attention(*(t.double() for t in (logits, values, rpb, scale)), *geo)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-4)


def test_banded_empty_windows_and_masked_offsets():
    """Windows entirely in the padding, and offsets masked by a -inf bias: output 0 and lse -inf
    exactly where the direct form has them, finite everywhere else."""
    torch.manual_seed(0)
    logits, values = torch.randn(1, 4, 5, 2, 1), torch.randn(1, 4, 5, 1, 3)
    rpb = torch.zeros(25, 2, 1)
    rpb[10:, 0] = -math.inf  # query 0 sees only the two top window rows
    geo = ((5, 5), (1, 1), (4, 4))  # windows of the outer output rows/columns fall in the padding
    out, lse = qna_forward(logits, values, rpb, None, *geo, config=BANDED)
    out_ref, lse_ref = direct_qna_attention(logits.double(), values.double(), rpb.double(), None, *geo)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and torch.isinf(lse_ref).any()
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    assert (out[torch.isinf(lse_ref).all(-2).all(-1)] == 0).all()


def test_algorithm_selection(monkeypatch):
    """QNA_TRITON_ALGO forces an algorithm; by default GPUs with tensor cores take the banded
    forward from a 7 x 7 window up, the banded delta from 11 x 11 and the main backward kernel from
    13 x 13 (bfloat16; the main backward kernel at stride 1 on sm_90, also float16, up to head dim 16),
    CPU tensors (the interpreter) the direct ones; a bad value names the variable."""
    logits, values = torch.empty(1, 8, 8, 2, 4), torch.empty(1, 8, 8, 4, 8)
    get = lambda kernel, k: tuning.get_config(kernel, logits, values, (k, k), (1, 1))  # noqa: E731
    monkeypatch.delenv(tuning.ALGO_ENV, raising=False)
    assert get("fwd", 15).algo == "direct"
    with tuning.kernel_algorithm("banded"):
        assert get("fwd", 3).algo == "banded"
        with tuning.kernel_algorithm("direct"):
            assert get("fwd", 15).algo == "direct"
        assert get("fwd", 3).algo == "banded"
    assert get("fwd", 3).algo == "direct"
    with pytest.raises(ValueError, match="algo"):
        with tuning.kernel_algorithm("fast"):
            pass
    monkeypatch.setenv(tuning.ALGO_ENV, "banded")
    assert get("fwd", 3) == banded_config((3, 3), 8, torch.float32)
    assert get("bwd", 3) == banded_config((3, 3), 8, torch.float32, kernel="bwd")
    # forcing applies where a banded form exists: the main backward kernel at stride 1 only
    assert tuning.get_config("bwd", logits, values, (3, 3), (2, 2)).algo == "direct"
    assert get("bwd_delta", 3) == banded_config((3, 3), 8, torch.float32, kernel="bwd_delta")
    monkeypatch.setenv(tuning.ALGO_ENV, "sideways")
    with pytest.raises(ValueError, match=tuning.ALGO_ENV):
        get("fwd", 3)
    monkeypatch.setenv(tuning.ALGO_ENV, "auto")
    monkeypatch.setattr(tuning.selection, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    assert tuning._heuristic_for("fwd", 4, 8, (7, 7), cuda) == banded_config((7, 7))
    assert tuning._heuristic_for("fwd", 4, 8, (5, 5), cuda).algo == "direct"
    assert tuning._heuristic_for("fwd", 4, 8, (7, 7), cuda, torch.float16).algo == "direct"
    assert tuning._heuristic_for("fwd", 4, 8, (11, 11), cuda, torch.float16).algo == "banded"
    assert tuning._heuristic_for("bwd", 4, 8, (7, 7), cuda).algo == "direct"
    assert tuning._heuristic_for("bwd", 4, 8, (11, 11), cuda).algo == "direct"
    assert tuning._heuristic_for("bwd", 4, 8, (13, 13), cuda) == banded_config((13, 13), kernel="bwd")
    assert tuning._heuristic_for("bwd", 4, 8, (21, 21), cuda).algo == "direct"  # a second chunk, mostly padding
    assert tuning._heuristic_for("bwd", 4, 8, (3, 15), cuda).algo == "banded"  # by width: 1400 / 15 per offset
    assert tuning._heuristic_for("bwd", 4, 8, (13, 13), cuda, st=(2, 2)).algo == "direct"
    assert tuning._heuristic_for("bwd", 4, 8, (15, 15), cuda, torch.float32).algo == "direct"
    assert tuning._heuristic_for("bwd", 4, 16, (15, 15), cuda).algo == "banded"
    assert tuning._heuristic_for("bwd", 4, 32, (15, 15), cuda).algo == "direct"  # would spill on sm_80
    assert tuning._heuristic_for("bwd", 4, 8, (31, 31), cuda) == banded_config((31, 31), kernel="bwd")
    assert tuning._heuristic_for("bwd", 4, 8, (13, 13), cuda, torch.float16).algo == "banded"
    assert tuning._heuristic_for("bwd_delta", 4, 8, (9, 9), cuda).algo == "direct"
    assert tuning._heuristic_for("bwd_delta", 4, 8, (11, 11), cuda) == banded_config((11, 11), kernel="bwd_delta")
    assert tuning._heuristic_for("bwd_delta", 4, 8, (13, 13), cuda, torch.float32).algo == "direct"
    assert tuning._heuristic_for("bwd_delta", 4, 8, (15, 15), cuda, torch.float32).algo == "banded"
    monkeypatch.setattr(tuning.selection, "_capability", lambda index: (8, 0))  # the main backward kernel from sm_90
    assert tuning._heuristic_for("bwd", 4, 8, (15, 15), cuda).algo == "direct"
    assert tuning._heuristic_for("bwd_delta", 4, 8, (15, 15), cuda).algo == "banded"
    monkeypatch.setattr(tuning.selection, "_capability", lambda index: (7, 5))
    assert tuning._heuristic_for("fwd", 4, 8, (7, 7), cuda).algo == "direct"
    assert banded_config((31, 31)).num_warps == 8 and banded_config((15, 15)).num_warps == 4
    assert banded_config((15, 15), 64).num_warps == 8 and banded_config((15, 15), 8, torch.float32).num_warps == 8
    assert banded_config((7, 7)).num_warps == 4 and banded_config((7, 7), stride=(2, 2)).num_warps == 8  # halo 37
    # the delta's split products hold twice the operands: 8 warps from head dim 16
    assert banded_config((15, 15), 8, kernel="bwd_delta").num_warps == 4
    assert banded_config((15, 15), 16, kernel="bwd_delta").num_warps == 8
    assert banded_config((15, 15), 8, kernel="bwd").num_warps == 8
    with pytest.raises(ValueError, match="stride"):
        banded_config((15, 15), kernel="bwd", stride=(2, 2))
    with pytest.raises(ValueError, match="kernel"):
        banded_config((15, 15), kernel="main")


def test_banded_config_entries_round_trip_and_are_validated(tmp_path):
    """A tuned file may hold banded forward, delta and (stride 1) main backward entries: written, read
    back equal; bad tiles rejected, and so is a banded main backward entry at stride 2 (it has no
    banded form there)."""
    key = "kernel=fwd;dtype=bfloat16;window=15x15;stride=1x1;heads=16;head_dim=8;queries=2;bucket=65536"
    cfg = KernelConfig(1, 1, 8, 1, "banded", 32, 16)
    path = tmp_path / "gpu.json"
    entries = {k: {"config": cfg.as_dict()} for k in (key, key.replace("fwd", "bwd_delta"), key.replace("fwd", "bwd"))}
    tuning.write_config_file(path, {"gpu_name": "x"}, entries)
    table = tuning.read_config_file(path)
    assert list(table.entries.values()) == [cfg, cfg, cfg] and not table.invalid
    strided = key.replace("fwd", "bwd").replace("stride=1x1", "stride=2x2")
    with pytest.raises(ValueError, match="banded"):
        tuning.write_config_file(path, {"gpu_name": "x"}, {strided: {"config": cfg.as_dict()}})
    raw = json.loads(path.read_text())
    raw["entries"][strided] = {"config": cfg.as_dict()}
    path.write_text(json.dumps(raw))
    table = tuning.read_config_file(path)
    assert len(table.entries) == 3 and "banded" in table.invalid[strided]
    assert "algo" not in KernelConfig(8, 16).as_dict()  # direct entries keep the original schema
    for bad in (
        {"algo": "banded", "block_w": 8, "block_r": 16},
        {"algo": "banded", "block_w": 24, "block_r": 16},
        {"algo": "banded", "block_r": 16},
        {"algo": "fft"},
    ):
        with pytest.raises(ValueError, match="block_w|algo"):
            tuning.validate_config(dict(block_p=1, block_h=1, num_warps=4, num_stages=1, **bad))


def test_qna_layer_under_banded_forward(monkeypatch, banded):
    """The QnA layer (packed query-minor projection) with the banded forward equals the reference path."""
    from qna_triton import QnA

    torch.manual_seed(0)
    layer = QnA(8, 12, 3, kernel_size=7, stride=1, n_queries=2, attn_scale="normal").to(DEVICE)
    assert_layer_matches_reference_path(layer, torch.randn(1, 9, 10, 8, device=DEVICE), monkeypatch)


def _grads(case_inputs, geo, lse, g, dcfg, cfg=None):
    logits, values, rpb, scale = case_inputs
    return qna_backward(g, logits, values, rpb, scale, lse, *geo, config=cfg, delta_config=dcfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banded_delta_equals_the_direct_delta(dtype):
    """The backward with the banded delta gives the direct delta's gradients to float32 accuracy, in
    every dtype: its value products are float32-accurate (bfloat16 inputs: operands split into two
    bfloat16 parts), because the main kernel subtracts ``D`` from ``a t``. With plain bfloat16 operands
    (the forward's) ``dlogits`` and ``drpb`` of this case are off by ~1 % (checked), beyond the bounds here. Head
    dim 40 spans three value chunks; the second tile takes the fallback (logits too wide for one shift)."""
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 1, 9, 20, 2, 1, 40, 3
    logits = torch.randn(B, H, W, N, h)
    logits[:, :, 18:] *= 3 * RANGE_LIMIT  # in the second tile's halo only
    inputs = (
        logits.to(dtype),
        (torch.randn(B, H, W, h, d) + 2).to(dtype),
        torch.randn(k * k, N, h),
        torch.randn(k * k, N, h),
    )
    geo = ((k, k), (1, 1), (1, 1))
    out, lse = qna_forward(*inputs, *geo)
    g = torch.randn(out.shape).to(dtype)
    got = _grads(inputs, geo, lse, g, BANDED)
    ref = _grads(inputs, geo, lse, g, tuning.heuristic_config("bwd_delta", h, d))
    _assert_grads_close(got, ref, dtype)


def _assert_grads_close(got, ref, dtype):
    """(dlogits, dvalues, drpb, dscale) of a banded kernel against the direct kernels': finite, and
    16-bit gradients about one rounding of the result apart; float32 ones (drpb, dscale; all for float32
    inputs): float32 sums (tf32x3), or sums of the ~2^-16-accurate split bfloat16 products."""
    for name, a, r in zip(("dlogits", "dvalues", "drpb", "dscale"), got, ref):
        assert torch.isfinite(a).all(), name
        err = (a.double() - r.double()).abs().max() / r.double().abs().max()
        if a.dtype != torch.float32:
            bound = 2**-7 if a.dtype == torch.bfloat16 else 2**-10
        else:
            bound = 2e-4 if dtype == torch.bfloat16 else 1e-5
        assert err <= bound, (name, err.item())


def _nan_pattern_test(poison, dtype=torch.float32):
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 1, 12, 13, 2, 2, 8, 5
    t = dict(
        logits=torch.randn(B, H, W, N, h),
        values=torch.randn(B, H, W, h, d),
        rpb=torch.randn(k * k, N, h),
        scale=torch.randn(k * k, N, h),
    )
    geo = ((k, k), (1, 1), (2, 2))
    g = torch.randn(B, H, W, h, d)
    poison(t, g)
    inputs = tuple(t[n].to(dtype) if n in ("logits", "values") else t[n] for n in ("logits", "values", "rpb", "scale"))
    with tuning.kernel_algorithm("direct"):
        out_ref, lse_ref = qna_forward(*inputs, *geo)
        ref = _grads(inputs, geo, lse_ref, g.to(dtype), None)
    out, lse = qna_forward(*inputs, *geo, config=BANDED)
    got = _grads(inputs, geo, lse_ref, g.to(dtype), BANDED, BANDED_BWD)
    assert torch.isnan(out_ref).any() and not torch.isnan(out_ref).all()
    named = ("dlogits", "dvalues", "drpb", "dscale")
    for name, a, r in (("out", out, out_ref), ("lse", lse, lse_ref), *zip(named, got, ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        torch.testing.assert_close(a[~torch.isnan(r)].double(), r[~torch.isnan(r)].double(), rtol=1e-5, atol=1e-5)


def test_nan_in_a_logit_stays_in_its_windows():
    """A NaN logit makes NaN exactly the outputs (and lse, gradients) whose windows hold it, as in the
    direct kernels: the banded products would spread it along their tile rows (``0 * NaN`` off the
    band), so such a tile is redone by the direct algorithm (forward, delta and main backward kernel;
    ``drpb`` / ``dscale`` are NaN exactly where the direct kernel's are)."""

    def poison(t, g):
        t["logits"][0, 3, 4, 1, 0] = float("nan")

    _nan_pattern_test(poison)


def test_nan_in_a_value_or_gradient_stays_in_its_windows():
    """The same for a NaN value (forward and delta products) and an infinite output gradient."""

    def poison(t, g):
        t["values"][0, 9, 10, 1, 3] = float("nan")
        g[0, 2, 3, 0, 0] = float("inf")

    _nan_pattern_test(poison)


def test_interpreter_rounds_bfloat16_operands_as_a_gpu_does():
    """The interpreter's emulation rounds operands to the nearest bfloat16 (ties to even), as a GPU's
    conversion does, bit-exact with PyTorch's; its own ``.to(tl.bfloat16)`` truncates instead."""
    torch.manual_seed(0)
    x = torch.randn(1024) * torch.exp(torch.randn(1024) * 10)
    x[:5] = torch.tensor([math.inf, -math.inf, 3.3895313892515355e38, 1 + 2**-8, 1 + 3 * 2**-8])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, 1024)
    assert torch.equal(y, x.bfloat16().float())


@pytest.mark.parametrize("dtype, chunk", [(torch.bfloat16, 16), (torch.float16, 16), (torch.float32, 32)], ids=str)
def test_banded_backward_equals_the_direct_backward(dtype, chunk, monkeypatch):
    """The banded main backward kernel gives the direct kernel's gradients to float32 accuracy in every
    dtype (its products are float32-accurate: ``v . Z - U`` and ``a da - sum P D`` cancel as ``a t - D``
    does), with its halo in one chunk or (16-column chunks) two. Head dim 20 spans three 8-wide chunks
    (one partial); a non-square window with asymmetric padding; three queries; two tiles across, the
    second partial and in the fallback (logits too wide for one shift), so the scratch rows of drpb /
    dscale are written by both paths in one launch."""
    torch.manual_seed(0)
    B, H, W, N, h, d, kh, kw = 1, 7, 21, 3, 2, 20, 3, 4
    logits = torch.randn(B, H, W, N, h)
    logits[:, :, 17:] *= 3 * RANGE_LIMIT  # the second tile only (source tiles: no halo)
    inputs = (
        logits.to(dtype),
        (torch.randn(B, H, W, h, d) + 2).to(dtype),
        torch.randn(kh * kw, N, h),
        torch.randn(kh * kw, N, h),
    )
    geo = ((kh, kw), (1, 1), (1, 2))
    with tuning.kernel_algorithm("direct"):
        out, lse = qna_forward(*inputs, *geo)
        g = torch.randn(out.shape).to(dtype)
        ref = _grads(inputs, geo, lse, g, None)
    monkeypatch.setattr(launch, "halo_chunk", lambda halo: chunk)
    got = _grads(inputs, geo, lse, g, tuning.heuristic_config("bwd_delta", h, d), BANDED_BWD)
    _assert_grads_close(got, ref, dtype)


def test_banded_backward_needs_stride_1():
    """A banded main backward config at stride 2 is refused by name before any launch, and a tuned
    stride-1 entry is not borrowed for a stride-2 problem."""
    logits, values = torch.randn(1, 8, 8, 1, 1), torch.randn(1, 8, 8, 1, 4)
    rpb = torch.zeros(9, 1, 1)
    out, lse = qna_forward(logits, values, rpb, None, (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="stride"):
        qna_backward(torch.randn_like(out), logits, values, rpb, None, lse, (3, 3), (2, 2), (1, 1), config=BANDED_BWD)
    entry = tuning.EntryKey("bwd", "bfloat16", 15, 15, 1, 1, 16, 8, 2, 65536)
    want = tuning.EntryKey("bwd", "bfloat16", 15, 15, 2, 2, 16, 8, 2, 65536)
    assert tuning._adapt(entry, BANDED_BWD, want) == tuning.heuristic_config("bwd", 16, 8)
    assert tuning._adapt(entry, BANDED_BWD, entry) == BANDED_BWD


@pytest.mark.parametrize("algo", ["direct", "banded"])
def test_dlogits_keeps_the_logits_layout(algo, monkeypatch):
    """The main backward kernels write dlogits in the logits' own layout (each pixel's [N, h] block
    contiguous, or query-minor), with no copy after: both equal the float64 direct backward."""
    from qna_triton.layout import is_query_minor

    monkeypatch.setenv(tuning.ALGO_ENV, algo)
    case = Case(B=1, H=7, W=9, N=3, h=2, d=8, k=3, s=1, p=1)
    geo = case.geometry
    results = {}
    for query_minor in (False, True):
        logits, values, rpb, scale = make_inputs(
            case, dtype=torch.float32, device=DEVICE, query_minor_logits=query_minor
        )
        assert is_query_minor(logits) == query_minor and logits.is_contiguous() != query_minor
        out, lse = qna_forward(logits, values, rpb, scale, *geo)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        dl, dv, dr, da = qna_backward(g, logits, values, rpb, scale, lse, *geo)
        assert (dl.is_contiguous(), is_query_minor(dl)) == (not query_minor, query_minor)
        ref = [t.detach().double().requires_grad_() for t in (logits, values, rpb, scale)]
        ref_out, _ = direct_qna_attention(*ref, *geo)
        want = torch.autograd.grad(ref_out, ref, g.double())
        for got, w in zip((dl, dv, dr, da), want):
            torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-4)
        results[query_minor] = dl
    torch.testing.assert_close(results[False], results[True], rtol=0, atol=0)


def _gradient_layouts(g):
    """``(name, the same output gradient laid out so, whether the kernels read it in place)``."""
    B, Ho, Wo, h, d = g.shape
    wide = torch.zeros(B, Ho, Wo, h, 2 * d, dtype=g.dtype)
    wide[..., :d] = g
    return [
        ("contiguous", g, True),
        ("dims_then_heads", g.transpose(-1, -2).contiguous().transpose(-1, -2), True),
        ("pixels_padded", wide[..., :d], True),
        ("expanded", g[:1, :1, :1, :1, :1].expand(g.shape), True),  # a sum's gradient is stride 0 so
        ("image_transposed", g.transpose(1, 2).contiguous().transpose(1, 2), False),
        ("cropped", torch.zeros(B, Ho + 1, Wo, h, d, dtype=g.dtype)[:, :Ho].copy_(g), False),
    ]


@pytest.mark.parametrize("algo", ["direct", "banded"])
def test_output_gradient_read_where_it_lies(algo, monkeypatch):
    """The backward kernels read an output gradient of any layout with evenly spaced pixels in place
    (its own strides, no copy: the delta and main kernels get that very tensor) and copy any other; every
    layout gives the contiguous gradient's results bit for bit. Direct and banded kernels, the banded
    ones with a tile in their exact fallback (logits too wide for one shift)."""
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 2, 6, 19, 2, 2, 8, 3
    logits = torch.randn(B, H, W, N, h)
    logits[:, :, 17:] *= 3 * RANGE_LIMIT  # the second banded tile takes the fallback
    inputs = (logits, torch.randn(B, H, W, h, d), torch.randn(k * k, N, h), torch.randn(k * k, N, h))
    geo = ((k, k), (1, 1), (1, 1))
    cfgs = (BANDED, BANDED_BWD) if algo == "banded" else (None, None)
    out, lse = qna_forward(*inputs, *geo)
    read = []
    run = launch._launch

    def recording(fn, grid, args, options):
        read.append(args[fn.arg_names.index("G")])
        return run(fn, grid, args, options)

    monkeypatch.setattr(launch, "_launch", recording)
    for name, g, in_place in _gradient_layouts(torch.randn(out.shape)):
        assert torch.equal(g, g.contiguous()) and (launch.grad_strides(g) is not None) == in_place, name
        read.clear()
        got = _grads(inputs, geo, lse, g, *cfgs)
        assert len(read) == 2 and all((t.data_ptr() == g.data_ptr()) == in_place for t in read), name
        want = _grads(inputs, geo, lse, g.contiguous(), *cfgs)
        for a, b in zip(got, want):
            assert torch.equal(a, b), name


def test_grad_strides():
    """The (pixel, head, dim) strides the backward kernels read an output gradient with."""
    g = torch.randn(2, 3, 4, 5, 6)
    assert launch.grad_strides(g) == (30, 6, 1)
    assert launch.grad_strides(g[:1, :1, :1].expand(g.shape)) == (0, 6, 1)  # one pixel, repeated
    assert launch.grad_strides(torch.ones(()).expand(g.shape)) == (0, 0, 0)
    assert launch.grad_strides(g[:, :, :1]) == (30 * 4, 6, 1)  # one column: the row stride
    assert launch.grad_strides(g[:, :2]) is None  # a crop of the image
    # the kernels' arguments: the pixel and head strides divided by their alignment (elements)
    assert launch.grad_args(g) == ((15, 3, 1), 2)
    assert launch.grad_args(torch.randn(1, 2, 2, 16, 8, dtype=torch.bfloat16)) == ((16, 1, 1), 8)
    assert launch.grad_args(torch.ones(()).expand(g.shape)) == ((0, 0, 0), 4)
    copy, args = launch.readable_grad(g[:, :2])
    assert copy.is_contiguous() and args == ((15, 3, 1), 2) and torch.equal(copy, g[:, :2])
    p = launch.Problem.of(*make_inputs(Case(B=2, H=3, W=4, N=1, h=5, d=6, k=3, s=1, p=1)), (3, 3), (1, 1), (1, 1))
    lse = torch.zeros(p.stats_shape)
    with pytest.raises(ValueError, match="grad_out"):
        launch.delta_launch(p, tuning.heuristic_config("bwd_delta", 5, 6), torch.zeros(2, 4, 4, 5, 6)[:, :3], lse)


@pytest.mark.parametrize("algo", ["direct", "banded"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no_scale"])
def test_backward_buffers_need_no_initialisation(algo, with_scale, monkeypatch):
    """Every buffer of the backward is written before it is read: the partial-sum rows the main kernels
    add into are zeroed by the launch, the rest written whole. Buffers handed over full of NaN give the
    usual gradients bit for bit, on the launcher's path (explicit configs: the rows of _partial_rows)
    and on a cached plan's (every float buffer it allocates). Several tiles per program, a padded head
    block (3 heads in blocks of 2), and a banded tile in the exact fallback."""
    torch.manual_seed(0)
    B, H, W, N, h, d, k = 2, 5, 19, 2, 3, 4, 3
    logits = torch.randn(B, H, W, N, h)
    logits[:, :, 17:] *= 3 * RANGE_LIMIT
    scale = torch.randn(k * k, N, h) if with_scale else None
    inputs = (logits, torch.randn(B, H, W, h, d), torch.randn(k * k, N, h), scale)
    geo = ((k, k), (1, 1), (1, 1))
    out, lse = qna_forward(*inputs, *geo)
    g = torch.randn(out.shape)
    cfg = BANDED_BWD if algo == "banded" else KernelConfig(16, 2, 4, 1, "direct")
    dcfg = tuning.heuristic_config("bwd_delta", h, d)
    want = _grads(inputs, geo, lse, g, dcfg, cfg)
    assert (want[3] is None) != with_scale and all(torch.isfinite(t).all() for t in want if t is not None)

    def same(got):
        return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))

    allocate = launch._partial_rows
    monkeypatch.setattr(launch, "_partial_rows", lambda *a: allocate(*a).fill_(float("nan")))
    assert same(_grads(inputs, geo, lse, g, dcfg, cfg))
    monkeypatch.undo()

    monkeypatch.setenv(tuning.ALGO_ENV, algo)
    with tuning.kernel_algorithm(algo):
        cached = qna_backward(g, *inputs, lse, *geo)  # describes and files the plan
        empty = torch.empty_strided

        def nan_filled(*args, **kwargs):
            t = empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, "empty_strided", nan_filled)
        assert all(
            (a is None and b is None) or torch.equal(a, b) for a, b in zip(qna_backward(g, *inputs, lse, *geo), cached)
        )
