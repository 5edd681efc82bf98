"""QnA-ViT (examples/): parameter counts, golden layers through the model, LSA against its definition,
original checkpoints (load, export, convert from msgpack, errors), torch.compile, FLOPs, timm API."""

import copy
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import EXAMPLES, FIXTURES

import qna_vit
from qna_triton import CheckpointError
from qna_triton.flax_params import flatten_tree
from qna_vit import create_model, export_flax_params, flops, load_flax_params
from qna_vit.flax import convert, load_converted, read_flax_checkpoint, split_train_state

msgpack = pytest.importorskip("msgpack")

PARAMS = {
    "qna_vit_tiny": 15_715_560,
    "qna_vit_tiny_7x7": 15_753_960,
    "qna_vit_small": 24_971_560,
    "qna_vit_base": 55_670_008,
}

# A small configuration of the same architecture for the slow paths (compile): maps 16, 8, 4, 2 at 64x64.
MINI = dict(
    base_dim=16,
    qna_layers=(1, 1, 1, 0),
    lsa_layers=(0, 0, 1, 1),
    qna_heads=(2, 4, 8, 16),
    lsa_heads=(1, 2, 4, 8),
    lsa_window=(7, 7, 2, 2),
    num_classes=10,
)


@functools.cache
def pristine(name):
    """One model per name for the read-only tests (building the large ones takes seconds on CPU)."""
    torch.manual_seed(0)
    return create_model(name).eval()


def perturbed_tree(model, seed=0):
    """The model's original-format parameters plus noise, so zero-initialised tables and biases matter."""
    rng = np.random.default_rng(seed)
    flat = flatten_tree(export_flax_params(model))
    return unflatten({k: (v + rng.normal(size=v.shape) * 0.02).astype(np.float32) for k, v in flat.items()})


def unflatten(flat):
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def assert_same_model(got, expected, x, tree):
    """``got`` gives ``expected``'s output on ``x`` bit for bit and exports exactly the parameter ``tree``."""
    with torch.no_grad():
        assert torch.equal(got(x), expected(x))
    back = flatten_tree(export_flax_params(got))
    for key, value in flatten_tree(tree).items():
        assert np.array_equal(back[key], value), key


# ------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    model = pristine(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert len(flatten_tree(export_flax_params(model))) == len(list(model.parameters()))


def test_options_change_the_model():
    plain = create_model("qna_vit_tiny", **MINI)
    ls = create_model("qna_vit_tiny", **MINI, layer_scale=1e-5)
    # Two scales per block, as wide as the block's output: 1 QnA block per stage 0-2, the down-sampling
    # blocks (widths 32, 64, 128), 1 LSA block in stages 2 and 3.
    widths = (16 + 32 + 64) + (32 + 64 + 128) + (64 + 128)
    assert sum(p.numel() for p in ls.parameters()) == sum(p.numel() for p in plain.parameters()) + 2 * widths
    assert torch.all(ls.stages[0].qna_blocks[0].ls1.gamma == 1e-5)
    assert plain.head.fc.out_features == 10 and plain(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="head"):
        create_model("qna_vit_tiny", head="cls")
    with pytest.raises(ValueError, match="stem"):
        create_model("qna_vit_tiny", stem="conv")
    with pytest.raises(TypeError, match="unknown QnAViT option"):
        create_model("qna_vit_tiny", depth=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("qna_vit_huge")


def test_drop_path_linear_over_all_blocks_in_network_order():
    model = create_model("qna_vit_tiny", **{**MINI, "qna_layers": (2, 1, 1, 0)})
    rates = []
    for stage in model.stages:
        for blk in list(stage.lsa_blocks) + list(stage.qna_blocks):
            assert blk.drop_path1.drop_prob == blk.drop_path2.drop_prob
            rates.append(blk.drop_path2.drop_prob)
        if stage.downsample is not None:
            # The mixer branch of a down-sampling block is never dropped (as in the original).
            assert isinstance(stage.downsample.drop_path1, torch.nn.Identity)
            rates.append(stage.downsample.drop_path2.drop_prob)
    # stage 0: 2 QnA + down; stage 1: QnA + down; stage 2: LSA, QnA, down; stage 3: LSA
    assert len(rates) == 9
    np.testing.assert_allclose(rates, np.linspace(0, 0.05, 9))


def test_input_sizes():
    model = create_model("qna_vit_tiny", **MINI).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert model(torch.randn(1, 3, 61, 64)).shape == (1, 10)  # 'SAME' stem: 61 -> 16 pixels
    # Maps the LSA windows do not tile (stage 2 is 3x4 here, window 2) are padded and masked
    # (tests/test_timm.py checks the padding against the unpadded computation).
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 64, 64, 3))
    even = create_model("qna_vit_tiny", **{**MINI, "kernel_size": (2, 3, 3, 3)})
    with pytest.raises(
        ValueError,
        match=r"input size 36x64 .*stage 0's down-sampling QnA gives \(4, 8\) but "
        r"its strided skip gives \(5, 8\)",
    ):
        even(torch.randn(1, 3, 36, 64))
    tiny = pristine("qna_vit_tiny")
    assert tiny.stage_sizes(448, 448) == [(112, 112), (56, 56), (28, 28), (14, 14), (14, 14)]
    assert tiny.stage_sizes(800, 1333) == [(200, 334), (100, 167), (50, 84), (25, 42), (25, 42)]
    qnav = create_model("qna_vit_tiny", **MINI, head="qnav1", img_size=64).eval()
    assert qnav.head.qna.kernel_size == (2, 2) and qnav(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"input size 128x128 .*'qnav1' head"):
        qnav(torch.randn(1, 3, 128, 128))


def naive_window_attention(attn, x):
    """The LSA mixer (docs/spec.md 2.3) written out in float64: per-head packing, logits + table lookup, softmax."""
    w, h, d = attn.window, attn.heads, attn.head_dim
    qkv = (x @ attn.to_qkv.weight.t()).reshape(x.shape[0], w * w, h, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    table = attn.relative_position_bias_table
    bias = torch.empty(h, w * w, w * w, dtype=x.dtype)
    for i in range(w * w):
        for i2 in range(w * w):
            (r, c), (r2, c2) = divmod(i, w), divmod(i2, w)
            bias[:, i, i2] = table[(r - r2 + w - 1) * (2 * w - 1) + (c - c2 + w - 1)]
    logits = torch.einsum("bijt,bkjt->bjik", q, k) / math.sqrt(d) + bias
    out = torch.einsum("bjik,bkjt->bijt", logits.softmax(-1), v).reshape(x.shape[0], w * w, h * d)
    return out @ attn.to_out.weight.t()


def test_lsa_matches_its_definition():
    torch.manual_seed(0)
    attn = qna_vit.layers.WindowAttention(24, 3, 4).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(5, 16, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_window_attention(attn, x), rtol=1e-10, atol=1e-10)


def test_lsa_stage_partitions_row_major_windows():
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **MINI).double().eval()
    stage = model.stages[2]  # 1 LSA block (window 2), then 1 QnA block and the down-sampling block
    stage.qna_blocks, stage.downsample = torch.nn.ModuleList(), None
    block = stage.lsa_blocks[0]
    x = torch.randn(2, 4, 6, 64, dtype=torch.float64)
    expected = torch.empty_like(x)
    for by in range(0, 4, 2):
        for bx in range(0, 6, 2):
            window = x[:, by : by + 2, bx : bx + 2].reshape(2, 4, 64)
            expected[:, by : by + 2, bx : bx + 2] = block(window).reshape(2, 2, 2, 64)
    torch.testing.assert_close(stage(x), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- golden layers
with open(os.path.join(FIXTURES, "layers.json")) as f:
    FIXTURE_CFGS = json.load(f)


@pytest.mark.parametrize(
    "fixture, flax_block, get_block",
    [
        ("tiny_stage1", ("QnAStage_0", "QnA_Block_1"), lambda m: m.stages[0].qna_blocks[0]),
        ("down_s2", ("QnAStage_0", "QnA_Block_3_stride_2"), lambda m: m.stages[0].downsample),
    ],
)
def test_golden_layer_fixture_through_the_model(fixture, flax_block, get_block):
    data = np.load(os.path.join(FIXTURES, f"layer_{fixture}.npz"))
    c = FIXTURE_CFGS[fixture]
    model = copy.deepcopy(pristine("qna_vit_tiny"))
    mixer = get_block(model).mixer
    assert (mixer.in_features, mixer.features, mixer.heads, mixer.kernel_size[0], mixer.stride[0]) == (
        c["cin"],
        c["features"],
        c["heads"],
        c["k"],
        c["stride"],
    )
    tree = export_flax_params(model)
    stage, block = flax_block
    tree[stage][block]["FusedKQnA_0"] = unflatten({k[2:]: data[k] for k in data.files if k.startswith("p:")})
    load_flax_params(model, tree)  # the whole model's loader maps the layer's original names
    with torch.no_grad():
        y = mixer(torch.from_numpy(data["x"]))
    ref = torch.from_numpy(data["y"])
    assert y.shape == ref.shape
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "options", [dict(), dict(head="qnav2", stem="resnet", layer_scale=0.1, num_classes=7, img_size=64)]
)
def test_export_load_round_trip(options):
    torch.manual_seed(0)
    src = create_model("qna_vit_tiny", **{**MINI, **options}).eval()
    tree = perturbed_tree(src)
    stats = qna_vit.export_flax_batch_stats(src)
    if options.get("stem") == "resnet":
        assert set(flatten_tree(stats)) == {"StemBlock_0/BatchNorm_0/mean", "StemBlock_0/BatchNorm_0/var"}
        stats["StemBlock_0"]["BatchNorm_0"]["mean"] += 0.5
        assert "ClassificationHead_0/FusedKQnA_0/rpe_bias" in flatten_tree(tree)
        assert "QnAStage_0/QnA_Block_2_stride_2/LayerScale_0/scale_param" in flatten_tree(tree)
    else:
        assert stats == {}
    load_flax_params(src, tree, stats or None)
    dst = create_model("qna_vit_tiny", **{**MINI, **options}).eval()
    dst.load_flax_params(export_flax_params(src), qna_vit.export_flax_batch_stats(src) or None)
    assert_same_model(dst, src, torch.randn(2, 3, 64, 64), tree)


def test_bad_checkpoints_name_the_key_and_leave_the_model_untouched():
    tiny, small = pristine("qna_vit_tiny"), pristine("qna_vit_small")
    tree = export_flax_params(tiny)
    before = snapshot(tiny)

    def check(model, bad, pattern, snap):
        with pytest.raises(CheckpointError, match=pattern):
            load_flax_params(model, bad)
        assert_untouched(model, snap)

    missing = copy.deepcopy(tree)
    del missing["QnAStage_1"]["QnA_Block_2"]["FusedKQnA_0"]["rpe_bias"]
    check(tiny, missing, "missing key 'QnAStage_1/QnA_Block_2/FusedKQnA_0/rpe_bias'", before)
    wrong = copy.deepcopy(tree)
    wrong["LSAStage_2"]["MSA_Block_3"]["MultiHeadSelfAttention_0"]["to_qkv"]["kernel"] = np.zeros(
        (256, 256), np.float32
    )
    check(
        tiny,
        wrong,
        r"'LSAStage_2/MSA_Block_3/MultiHeadSelfAttention_0/to_qkv/kernel' has shape \(256, 256\), "
        r"expected \(256, 768\)",
        before,
    )
    extra = copy.deepcopy(tree)
    extra["QnAStage_3"] = {"QnA_Block_1": {"LayerNorm_0": {"scale": np.ones(512, np.float32)}}}
    check(tiny, extra, "unexpected key 'QnAStage_3/QnA_Block_1/LayerNorm_0/scale'", before)
    bad_dtype = copy.deepcopy(tree)
    bad_dtype["StemBlock_0"]["conv_1x1"]["kernel"] = np.zeros((4, 4, 3, 64), np.int32)
    check(tiny, bad_dtype, "'StemBlock_0/conv_1x1/kernel' has dtype int32", before)
    # The tiny checkpoint into the small model: the small model's extra blocks are missing.
    check(small, tree, "missing key 'LSAStage_2/MSA_Block_10/", snapshot(small))
    # ... and a resnet-stem model needs the BatchNorm statistics.
    resnet = create_model("qna_vit_tiny", **MINI, stem="resnet")
    with pytest.raises(CheckpointError, match="batch_stats: missing key 'StemBlock_0/BatchNorm_0/mean'"):
        load_flax_params(resnet, export_flax_params(resnet))
    with pytest.raises(CheckpointError, match="batch_stats: unexpected key 'BatchNorm_0/mean'"):
        load_flax_params(tiny, tree, {"BatchNorm_0": {"mean": np.zeros(3, np.float32)}})
    assert_untouched(tiny, before)


# Writer of the original checkpoint format (flax.serialization's msgpack encoding, written from its
# description): arrays are msgpack extension 1 holding a packed (shape, dtype name, C-order bytes).
def _pack_ext(obj):
    if isinstance(obj, np.ndarray):
        payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(1, payload)
    if isinstance(obj, np.generic):
        arr = np.asarray(obj)
        return msgpack.ExtType(3, msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_flax_checkpoint(path, state):
    with open(path, "wb") as f:
        f.write(msgpack.packb(state, default=_pack_ext, strict_types=True))


def train_state(params, nested, batch_stats=None):
    """A saved ``flax.training.train_state.TrainState``-like tree, as ``to_state_dict`` lays it out."""
    opt_state = {"0": {"count": np.int32(300), "mu": {"w": np.zeros(2, np.float32)}}, "1": {}}
    return {
        "step": 300,
        "params": {"params": params} if nested else params,
        "opt_state": opt_state,
        "batch_stats": batch_stats,
        "dynamic_scale": None,
    }


def test_convert_command_round_trip(tmp_path):
    model = copy.deepcopy(pristine("qna_vit_tiny"))
    tree = perturbed_tree(model, seed=1)
    load_flax_params(model, tree)
    src, dst = tmp_path / "checkpoint_300", tmp_path / "out" / "tiny.pt"
    (tmp_path / "checkpoint_20").write_bytes(b"")  # an older checkpoint of the same run
    write_flax_checkpoint(src, train_state(tree, nested=True))
    convert("qna_vit_tiny", str(tmp_path), str(dst))  # the newest checkpoint in the folder
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["model_name"] == "qna_vit_tiny" and isinstance(ckpt["model"], dict)
    converted = load_converted(str(dst)).eval()
    assert_same_model(converted, model, torch.randn(1, 3, 224, 224), tree)


def test_convert_command_runs_as_a_script_and_reports_errors(tmp_path):
    small_tree = perturbed_tree(create_model("qna_vit_tiny", **MINI, head="qnav1", img_size=64))
    src = tmp_path / "ckpt.msgpack"
    write_flax_checkpoint(src, train_state(small_tree, nested=False))
    out = tmp_path / "x.pt"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "convert_flax.py"), "--model", "qna_vit_tiny", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and not out.exists()
    assert "--head qnav1 or --head qnav2" in proc.stderr
    with pytest.raises(CheckpointError):
        convert("qna_vit_tiny", str(src), str(out), head="qnav1")
    assert not out.exists()  # a mini checkpoint is not a qna_vit_tiny one: the loader names the first bad key


def test_msgpack_reader_formats(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.normal(size=(3, 5)).astype(np.float32)
    bf16 = np.array([1.0, -2.5, 3.140625], np.float32)  # exactly representable in bfloat16
    bf16_bits = (bf16.view(np.uint32) >> 16).astype(np.uint16)
    state = {
        "params": {
            # Flax splits arrays over 1 GiB into chunks; a small one in the same layout.
            "chunked": {
                "__msgpack_chunked_array__": True,
                "shape": {"0": 3, "1": 5},
                "chunks": {"0": big.reshape(-1)[:8], "1": big.reshape(-1)[8:]},
            },
            "half": np.arange(4, dtype=np.float16),
            "bf16": msgpack.ExtType(1, msgpack.packb(((3,), "bfloat16", bf16_bits.tobytes()), use_bin_type=True)),
        },
        "step": np.int64(7),
    }
    path = tmp_path / "state"
    write_flax_checkpoint(path, state)
    restored = read_flax_checkpoint(str(path))
    assert restored["step"] == 7
    np.testing.assert_array_equal(restored["params"]["chunked"], big)
    assert restored["params"]["half"].dtype == np.float16
    np.testing.assert_array_equal(restored["params"]["bf16"], bf16)
    params, stats = split_train_state({"params": {"params": {"StemBlock_0": {}}, "batch_stats": {"a": 1}}})
    assert params == {"StemBlock_0": {}} and stats == {"a": 1}
    params, stats = split_train_state(train_state({"StemBlock_0": {}}, nested=False))
    assert params == {"StemBlock_0": {}} and stats is None
    with pytest.raises(CheckpointError, match="no 'params'"):
        split_train_state({"step": 1})
    (tmp_path / "junk").write_bytes(b"\xc1\xc1")
    with pytest.raises(CheckpointError, match="not a Flax msgpack checkpoint"):
        read_flax_checkpoint(str(tmp_path / "junk"))


# ------------------------------------------------------------------------------------------- compile
def test_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    # Tiny drop-path rates: the DropPath code path is traced, but its masks are all ones in practice,
    # so the compiled step must equal the eager one.
    model = create_model("qna_vit_tiny", **MINI, drop_path=1e-7).train()
    x = torch.randn(2, 3, 72, 100)  # stage maps 5x7 and 3x4: the LSA windows (2) pad and mask them
    eager = model(x)
    eager.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_flops_within_ten_percent_of_the_paper(name):
    gflops = flops.count_flops(pristine(name), 224) / 1e9
    assert abs(gflops / flops.PAPER[name][1] - 1) <= 0.10, gflops


def test_flops_count_the_qna_layer():
    layer = qna_vit.layers._qna_layer(16, 16, 2, 3, stride=2)
    assert flops.qna_core_macs(layer, (1, 6, 7, 16)) == 3 * 4 * 2 * 2 * 9 * (8 + 1)
    projections = 42 * 16 * (2 * 2 + 16) + 12 * 16 * 16  # logits and values per input pixel, to_out per output
    folding = 2 * 2 * 8 * 16  # the queries folded into W_k
    assert flops.count_flops(layer, (1, 6, 7, 16)) == projections + folding + 3 * 4 * 2 * 2 * 9 * 9


# ------------------------------------------------------------------------------------------- timm API
def test_timm_style_api():
    model = create_model("qna_vit_tiny", **MINI).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 128)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 128)
    torch.testing.assert_close(model.forward_head(feats), model.head.fc(pooled))
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    assert "stages.2.lsa_blocks.0.mixer.relative_position_bias_table" in nwd
    assert "stages.0.qna_blocks.0.mixer.rpe_bias" in nwd and "stages.0.qna_blocks.0.mixer.attn_scale_weights" in nwd
    assert {
        "stages.0.qna_blocks.0.norm1.weight",
        "head.norm.bias",
        "head.fc.bias",
        "stages.0.qna_blocks.0.mlp.fc1.bias",
    } <= nwd
    assert not {"head.fc.weight", "stages.0.qna_blocks.0.mixer.query", "stem.conv.weight"} & nwd
    assert all(
        p.ndim <= 1 or n.endswith(("rpe_bias", "attn_scale_weights", "bias_table"))
        for n, p in names.items()
        if n in nwd
    )
    order = model.group_matcher()
    in_network_order = [
        "stem.conv.weight",
        "stages.0.qna_blocks.0.mixer.Wk",
        "stages.0.downsample.skip.proj.weight",
        "stages.1.qna_blocks.0.norm1.weight",
        "stages.2.lsa_blocks.0.mlp.fc1.weight",
        "stages.2.qna_blocks.0.mixer.query",
        "stages.2.downsample.norm2.bias",
        "stages.3.lsa_blocks.0.norm1.weight",
        "head.norm.weight",
    ]
    assert sorted(in_network_order, key=order) == in_network_order
    assert set(in_network_order) <= set(names)
    assert model.group_matcher(coarse=True)("stages.2.downsample.norm2.bias") == (1, 2)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    with pytest.raises(ValueError, match="head"):
        model.reset_classifier(5, global_pool="qnav1")
    with pytest.raises(ValueError, match="no downloadable weights"):
        qna_vit.qna_vit_tiny(pretrained=True)
    m = qna_vit.qna_vit_tiny(
        pretrained_cfg=None,
        pretrained_cfg_overlay=None,
        cache_dir=None,
        drop_path_rate=0.3,
        **{k: v for k, v in MINI.items()},
    )
    assert m.config.drop_path == 0.3


def test_timm_registration():
    import timm

    model = timm.create_model("qna_vit_tiny", num_classes=5, drop_path_rate=0.1)
    assert isinstance(model, qna_vit.QnAViT) and model.num_classes == 5 and model.config.drop_path == 0.1
    assert set(PARAMS) <= set(timm.list_models("qna_vit*"))
