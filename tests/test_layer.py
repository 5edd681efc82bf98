"""The QnA module: golden fixtures of the original layer, modes, init, checkpoints, bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import BAD_CORE, FIXTURES, small_core_inputs

from qna_triton import ATTN_SCALE_MODES, CheckpointError, QnA, qna_attention
from qna_triton.reference import naive_qna_attention

with open(os.path.join(FIXTURES, "layers.json")) as f:
    FIXTURE_CFGS = json.load(f)


def fixture_layer(name):
    c = FIXTURE_CFGS[name]
    data = np.load(os.path.join(FIXTURES, f"layer_{name}.npz"))
    layer = QnA(
        c["cin"],
        c["features"],
        c["heads"],
        c["k"],
        c["stride"],
        c["padding"],
        c["nq"],
        c["attn_scale"],
        c["normalize_q"],
        c["use_bias"],
    )
    tree = {}
    for key in data.files:
        if key.startswith("p:"):
            node = tree
            *parents, leaf = key[2:].split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = data[key]
    return layer, tree, data


@pytest.mark.parametrize("name", sorted(FIXTURE_CFGS))
def test_golden_fixture(name):
    layer, tree, data = fixture_layer(name)
    layer.load_flax_params(tree)
    y = layer(torch.from_numpy(data["x"]))
    ref = torch.from_numpy(data["y"])
    assert y.shape == ref.shape
    rel = (y - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5, rel


def naive_layer(layer: QnA, x: torch.Tensor) -> torch.Tensor:
    """The layer computed from its definition (docs/spec.md section 1.3, steps 1-5) with the naive core op."""
    N, h, d = layer.n_queries, layer.heads, layer.head_dim
    q = layer.query.reshape(N, h, d)
    if layer.normalize_q:
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
    q = q / math.sqrt(d)
    k = (x @ layer.Wk).unflatten(-1, (h, d))
    if layer.use_bias:
        k = k + layer.Wk_b
    logits = torch.einsum("byxjt,njt->byxnj", k, q)
    v = layer.to_v(x).unflatten(-1, (h, d))
    o = naive_qna_attention(
        logits,
        v,
        layer.rpe_bias.reshape(-1, N, h),
        layer.scale_tensor(),
        layer.kernel_size,
        layer.stride,
        layer.padding,
    )
    return layer.to_out(o.flatten(-2))


@pytest.mark.parametrize("mode", ATTN_SCALE_MODES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_modes_match_definition(mode, use_bias):
    torch.manual_seed(0)
    layer = QnA(
        6,
        12,
        3,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 2),
        n_queries=3,
        attn_scale=mode,
        use_bias=use_bias,
        out_features=5,
    ).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 7, 6, 6, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 4, 9, 5)
    torch.testing.assert_close(y, naive_layer(layer, x), rtol=1e-10, atol=1e-10)


def test_mode_fixed_scales():
    posneg = QnA(4, 8, 2, n_queries=3, attn_scale="posneg").scale_tensor()  # N*h = 6 columns n*h + j
    assert posneg.shape == (9, 3, 2)
    assert posneg[0].flatten().tolist() == [1, 1, 1, -1, -1, -1]
    avg = QnA(4, 8, 2, n_queries=4, attn_scale="avg").scale_tensor()
    assert torch.all(avg == 0.25)
    assert QnA(4, 8, 2, attn_scale="none").scale_tensor() is None


def test_parameters_and_init():
    torch.manual_seed(0)
    layer = QnA(256, 512, 64, kernel_size=3, n_queries=2)
    names = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert names == {
        "query": (2, 512),
        "Wk": (256, 512),
        "to_v.weight": (512, 256),
        "to_out.weight": (512, 512),
        "rpe_bias": (9, 128),
        "attn_scale_weights": (1, 1, 9, 128),
    }
    assert torch.all(layer.rpe_bias == 0)
    assert abs(layer.Wk.std().item() - math.sqrt(1 / 256)) < 0.1 * math.sqrt(1 / 256)
    assert layer.Wk.abs().max() <= 2 * math.sqrt(1 / 256) / 0.8796 + 1e-6  # truncated at two std
    assert abs(layer.attn_scale_weights.std().item() - 0.02) < 0.004
    assert layer.query.abs().max() <= 2 * math.sqrt(1 / 8) + 1e-6
    ones = QnA(8, 8, 2, attn_scale="ones")
    assert torch.all(ones.attn_scale_pos == 1) and ones.attn_scale_pos.shape == (1, 1, 9, 2, 2)


def test_gradcheck_every_parameter():
    torch.manual_seed(0)
    layer = QnA(3, 4, 2, kernel_size=3, stride=2, n_queries=2, use_bias=True, out_features=3).double()
    with torch.no_grad():
        layer.rpe_bias.normal_()
    x = torch.randn(1, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert len(params) == 9
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)


def test_load_flax_errors_name_the_key_and_leave_layer_untouched():
    layer, tree, _ = fixture_layer("tiny_stage1")
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def check(bad, pattern):
        with pytest.raises(CheckpointError, match=pattern):
            layer.load_flax_params(bad)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k

    missing = {k: v for k, v in tree.items() if k != "rpe_bias"}
    check(missing, "missing key 'rpe_bias'")
    check({**tree, "extra": np.zeros(3, np.float32)}, "unexpected key 'extra'")
    check({**tree, "to_v": {"kernel": np.zeros((64, 32), np.float32)}}, r"'to_v/kernel' has shape \(64, 32\)")
    check(
        {**tree, "to_out": {"kernel": tree["to_out"]["kernel"], "bias": np.zeros(64, np.float32)}},
        "unexpected key 'to_out/bias'",
    )
    flat = {("to_v/kernel" if k == "to_v" else k): (v["kernel"] if k == "to_v" else v) for k, v in tree.items()}
    layer.load_flax_params(flat)  # flat "/"-joined keys are accepted too


BAD_MODULE_ARGS = [
    (dict(features=10, heads=3), ValueError, "heads"),
    (dict(heads=0), ValueError, "heads"),
    (dict(n_queries=0), ValueError, "n_queries"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 0)), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(kernel_size=2.5), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(attn_scale="gaussian"), ValueError, "attn_scale"),
    (dict(in_features=0), ValueError, "in_features"),
    (dict(features=8.0), TypeError, "features"),
    (dict(out_features=0), ValueError, "out_features"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_MODULE_ARGS, ids=lambda v: str(v)[:40])
def test_bad_module_arguments(kwargs, exc, pattern):
    args = dict(in_features=4, features=8, heads=2)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        QnA(**args)


def test_meta_tensors_give_shapes():
    layer = QnA(4, 8, 2, kernel_size=3, stride=2, out_features=6).to("meta")
    assert layer(torch.empty(3, 9, 7, 4, device="meta")).shape == (3, 5, 4, 6)


def test_bad_module_input():
    layer = QnA(4, 8, 2, kernel_size=5, padding=0)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(4, 6, 6))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(1, 6, 6, 3))
    with pytest.raises(ValueError, match="kernel_size 5 is larger than the padded image height"):
        layer(torch.randn(1, 4, 6, 4))
    with pytest.raises(TypeError, match="x dtype"):
        layer(torch.randn(1, 6, 6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(np.zeros((1, 6, 6, 4), np.float32))


@pytest.mark.parametrize("call,exc,pattern", BAD_CORE, ids=[p for _, _, p in BAD_CORE])
def test_bad_core_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(*small_core_inputs())


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("QNA_TRITON_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="QNA_TRITON_BACKEND"):
        qna_attention(*small_core_inputs())


def test_forward_writes_only_projections_and_attention_output():
    """The layer is the fused logits+values projection, the core op and the output projection:
    no other tensor of size B*H*W*C is written (no keys, no windows, no weighted copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, H, W, C = 2, 8, 8, 32
    layer = QnA(C, C, 4, kernel_size=3)
    x = torch.randn(B, H, W, C)
    big = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= B * H * W * C // 2:
                    if t.untyped_storage().data_ptr() not in inputs:  # a new allocation, not a view
                        big.append(str(func))
            return out

    with torch.no_grad(), Record():
        layer(x)
    assert len(big) == 3, big
    assert "qna.attention_packed" in big[1]
