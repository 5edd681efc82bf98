"""QnA-ViT as a timm model and backbone: our port of timm's generic model checks (its tests/test_models.py:
default cfgs, forward/backward, features_only, forward_intermediates, pruning, fx tracing, reset_classifier,
grad checkpointing), any input size (LSA padding and masking), and the dense-prediction example.

Structure checks build the four full models on the meta device (no weights, no compute); numerical checks
run each architecture at a reduced width and depth (same kernels, heads per stage pattern, both block
kinds) on small inputs, so the file stays fast on CPU.
"""

import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._manipulate import group_parameters

import qna_vit
from qna_vit import MODEL_CONFIGS, create_model

pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402

NAMES = sorted(MODEL_CONFIGS)


def reduced(name, **extra):
    """``name``'s architecture at width 16, one block of each kind per stage (LSA in stages 2-3), its own
    QnA window; the LSA windows stay (7, 7, 14, 7), larger than the maps of small inputs."""
    return dict(
        base_dim=16,
        qna_layers=(1, 1, 1, 0),
        qna_heads=(2, 4, 8, 16),
        lsa_layers=(0, 0, 1, 1),
        lsa_heads=(1, 2, 4, 8),
        kernel_size=MODEL_CONFIGS[name].kernel_size,
        **extra,
    )


# ------------------------------------------------------------------------------------------- default cfgs
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_and_head_contract(name):
    """timm's test_model_default_cfgs and its API-contract checks, on the full model (meta device)."""
    model = timm.create_model(name, device="meta").eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7) and cfg["fixed_input_size"] is False
    assert cfg["num_classes"] == 1000 and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert model.in_chans == 3 and model.output_fmt == "NHWC"
    width = MODEL_CONFIGS[name].base_dim * 8
    assert model.num_features == model.head_hidden_size == width and model.num_classes == 1000
    assert all(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))

    x = torch.randn(1, 3, 224, 224, device="meta")
    feats = model.forward_features(x)
    assert feats.shape == (1, 7, 7, width)  # NHWC, spatial = pool_size
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (1, width)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 7, 7, width)
    model.reset_classifier(3, "avg")
    assert model(x).shape == (1, 3)
    unpooled = timm.create_model(name, num_classes=0, global_pool="", device="meta").eval()
    assert unpooled(x).shape == (1, 7, 7, width)

    # reset_classifier keeps the model's device, dtype and mode; global_pool defaults to "keep"
    model.to(dtype=torch.float64).train()
    model.reset_classifier(2)
    assert model.head.fc.weight.dtype == torch.float64 and model.head.fc.weight.device.type == "meta"
    assert model.head.fc.training
    # layer-wise lr decay groups and weight-decay exemptions name real parameters
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 3
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    with pytest.raises(TypeError, match="unknown QnAViT option"):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    overlaid = timm.create_model(
        name, device="meta", pretrained_cfg_overlay=dict(crop_pct=1.0, test_input_size=(3, 288, 288))
    )
    assert overlaid.pretrained_cfg["crop_pct"] == 1.0 and overlaid.pretrained_cfg["test_input_size"] == (3, 288, 288)
    assert set(NAMES) <= set(timm.list_models("qna_vit*"))
    assert timm.models.get_pretrained_cfg_value(name, "pool_size") == (7, 7)


def test_pooling_options_and_errors():
    model = create_model("qna_vit_tiny", **reduced("qna_vit_tiny"), num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, model.head.norm(feats).mean((1, 2)))
        model.reset_classifier(4, "")  # no pooling: the classifier runs per pixel
        assert model(x).shape == (2, 2, 2, 4)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(4, "catavgmax")
    with pytest.raises(ValueError, match="needs a QnA head"):
        model.reset_classifier(4, "qnav1")
    qnav = create_model("qna_vit_tiny", **reduced("qna_vit_tiny"), head="qnav2", img_size=64)
    assert qnav.pretrained_cfg["fixed_input_size"] is True
    qnav.reset_classifier(5, "qnav1")
    assert qnav.head.global_pool == "qnav1" and qnav(x).shape == (2, 5)
    qnav.reset_classifier(5, "avg")  # leaving the QnA head drops its layer
    assert qnav.head.qna is None and qnav(torch.randn(1, 3, 96, 80)).shape == (1, 5)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("qna_vit_tiny", pretrained=True)


# ------------------------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    """timm's test_model_backward at a reduced size: every parameter gets a gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, **reduced(name)).train()
    out = model(torch.randn(2, 3, 48, 32))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


def test_grad_checkpointing_changes_nothing():
    """timm's test_model_forward checkpointing check, and the same gradients in training."""
    torch.manual_seed(0)
    model = timm.create_model("qna_vit_tiny", num_classes=42, **reduced("qna_vit_tiny"))
    x = torch.randn(2, 3, 48, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.train()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws in both passes
        model(x).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("name", NAMES)
def test_features_only_pyramid(name):
    """timm's test_model_forward_features: a 4-level NCHW pyramid at strides 4, 8, 16, 32."""
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, **reduced(name)).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert "num_classes" not in model.pretrained_cfg
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 18, 25), (1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4)]
    for f, r in zip(feats, model.feature_info.reduction()):  # timm's bounds on each level's size
        assert x.shape[2] / (2 * r) < f.shape[2] <= math.ceil(x.shape[2] / r) + 1
        assert torch.isfinite(f).all()
    some = timm.create_model(name, features_only=True, out_indices=(1, -1), **reduced(name))
    assert some.feature_info.channels() == [32, 128] and some.feature_info.reduction() == [8, 32]
    assert len(some(x)) == 2


def test_feature_wrappers_agree():
    """The getter (default, NCHW), hook and fx wrappers (the model's NHWC) give forward_intermediates' pyramid."""
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **reduced("qna_vit_tiny")).eval()
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(0, 2, 3), intermediates_only=True)
        for cls in ("getter", "hook", "fx"):
            torch.manual_seed(0)  # the same initialisation as ``model``
            net = timm.create_model(
                "qna_vit_tiny", features_only=True, feature_cls=cls, out_indices=(0, 2, 3), **reduced("qna_vit_tiny")
            ).eval()
            got = net(x)
            got = list(got.values()) if isinstance(got, dict) else got
            if str(getattr(net, "output_fmt", "NCHW")).endswith("NHWC"):
                got = [g.permute(0, 3, 1, 2) for g in got]
            assert len(got) == 3, cls
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, msg=cls)


def test_forward_intermediates_and_pruning():
    """timm's test_model_forward_intermediates and its pruning contract."""
    torch.manual_seed(0)
    model = create_model("qna_vit_small", **reduced("qna_vit_small"), drop_rate=0.5).eval()
    assert [f["module"] for f in model.feature_info] == [
        "stages.0.qna_blocks.0",
        "stages.1.qna_blocks.0",
        "stages.2.qna_blocks.0",
        "stages.3",
    ]
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [tuple(t.shape) for t in taps] == [(2, 16, 16, 20), (2, 32, 8, 10), (2, 64, 4, 5), (2, 128, 2, 3)]
        nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0].permute(0, 3, 1, 2), taps[2])
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, model.head.norm(taps[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        early, (tap1,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(tap1, taps[1], rtol=0, atol=0)
        torch.testing.assert_close(early.permute(0, 3, 1, 2), taps[1], rtol=0, atol=0)  # stops at the tap
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NCL")

    pruned = timm.create_model("qna_vit_small", **reduced("qna_vit_small"))
    pruned.load_state_dict(model.state_dict())
    assert pruned.prune_intermediate_layers([1], prune_norm=True) == [1]
    assert len(pruned.stages) == 2 and pruned.stages[1].downsample is None
    assert pruned.num_features == pruned.head_hidden_size == 32 and pruned.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval().forward_features(x).permute(0, 3, 1, 2), taps[1])
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x, indices=[1], intermediates_only=True)).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]  # nothing unused (DDP)
    pruned.reset_classifier(7, "avg")
    assert pruned(x).shape == (2, 7)
    kept = create_model("qna_vit_small", **reduced("qna_vit_small"))
    kept.load_state_dict(model.state_dict())
    kept.prune_intermediate_layers([3], prune_head=False)  # the last index with the head: unchanged
    with torch.no_grad():
        torch.testing.assert_close(kept.eval()(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- fx
def _fx_model(model, train):
    """timm's _create_fx_model: a feature extractor returning the graph's output node(s)."""
    kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs
    )


@pytest.mark.parametrize("name", ["qna_vit_tiny", "qna_vit_tiny_7x7"])
def test_fx_trace_forward_backward(name):
    """timm's test_model_forward_fx / test_model_backward_fx: the QnA layer and the shape-dependent
    helpers are leaves, the rest traces; an odd input exercises the padded LSA windows in the graph."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, **reduced(name)).eval()
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        expected = model(x)
        traced = _fx_model(model, train=False)
        torch.testing.assert_close(torch.cat(tuple(traced(x).values())), expected, rtol=1e-4, atol=1e-5)
    leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "stages.0.qna_blocks.0.mixer" in leaves
    assert {"window_partition", "window_key_mask", "pad_same"} <= {
        getattr(n.target, "__name__", "") for n in traced.graph.nodes
    }
    model.train()
    traced = _fx_model(model, train=True)
    out = torch.cat(tuple(traced(torch.randn(2, 3, 64, 64)).values()))
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in traced.parameters())


def test_fx_without_timm_registry():
    """qna_vit.symbolic_trace and fx_tracer_kwargs() trace as timm's lists do, without them."""
    model = create_model("qna_vit_tiny", **reduced("qna_vit_tiny"), num_classes=3).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(qna_vit.symbolic_trace(model)(x), model(x))
        nodes = get_graph_node_names(model, tracer_kwargs=qna_vit.fx_tracer_kwargs())[1]
        taps = create_feature_extractor(
            model, return_nodes={"stages.1.qna_blocks.0": "p8"}, tracer_kwargs=qna_vit.fx_tracer_kwargs()
        )(x)["p8"]
        torch.testing.assert_close(taps.permute(0, 3, 1, 2), model.forward_intermediates(x, indices=[1])[1][0])
    assert "stages.0.qna_blocks.0.mixer" in nodes
    kwargs = qna_vit.fx_tracer_kwargs()
    assert set(kwargs["autowrap_functions"]) <= set(get_notrace_functions())
    assert set(kwargs["leaf_modules"]) <= set(get_notrace_modules())


# ------------------------------------------------------------------------------------------- input sizes
def _naive_masked_window_attention(attn, x, rows, cols):
    """The LSA mixer on the tokens at (rows[i], cols[i]) of one window only, in float64."""
    w, h, d = attn.window, attn.heads, attn.head_dim
    n = x.shape[0]
    qkv = (x @ attn.to_qkv.weight.t()).reshape(n, h, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    table = attn.relative_position_bias_table
    logits = torch.einsum("ijt,kjt->jik", q, k) / math.sqrt(d)
    for i in range(n):
        for i2 in range(n):
            logits[:, i, i2] += table[(rows[i] - rows[i2] + w - 1) * (2 * w - 1) + (cols[i] - cols[i2] + w - 1)]
    out = torch.einsum("jik,kjt->ijt", logits.softmax(-1), v).reshape(n, h * d)
    return out @ attn.to_out.weight.t()


@pytest.mark.parametrize("size, window", [((5, 7), 3), ((3, 5), 7)])
def test_lsa_pads_and_masks_untiled_maps(size, window):
    """A map the windows do not tile: each window attends over its image pixels only (5x7, window 3);
    a window larger than the map is global attention over the whole map (3x5, window 7)."""
    torch.manual_seed(0)
    attn = qna_vit.layers.WindowAttention(12, 3, window).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    H, W = size
    x = torch.randn(2, H, W, 12, dtype=torch.float64)
    windows = qna_vit.layers.window_partition(x, window)
    got = qna_vit.layers.window_merge(attn(windows, qna_vit.layers.window_key_mask(x, window)), x, window)
    expected = torch.empty_like(x)
    for b in range(2):
        for r0 in range(0, H, window):
            for c0 in range(0, W, window):
                rr, cc = zip(*[(r, c) for r in range(r0, min(r0 + window, H)) for c in range(c0, min(c0 + window, W))])
                tokens = x[b, list(rr), list(cc)]
                out = _naive_masked_window_attention(attn, tokens, [r - r0 for r in rr], [c - c0 for c in cc])
                expected[b, list(rr), list(cc)] = out
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert qna_vit.layers.window_key_mask(torch.zeros(1, 6, 9, 1), 3).numel() == 0  # tiled: nothing to mask


def test_any_input_size_runs():
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **reduced("qna_vit_tiny"), num_classes=5).eval()
    with torch.no_grad():
        for size in ((32, 32), (33, 47), (61, 37), (800, 1333)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 5) and torch.isfinite(out).all(), size
        taps = model.forward_intermediates(torch.randn(1, 3, 800, 1333), intermediates_only=True)
    assert [tuple(t.shape[2:]) for t in taps] == [(200, 334), (100, 167), (50, 84), (25, 42)]


# ------------------------------------------------------------------------------------------- timm required
def test_qna_vit_without_timm_names_the_extra():
    """qna_vit requires timm (the ``vit`` extra): without it, importing the package says so in one line,
    and qna_triton itself still imports and runs."""
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import torch, qna_triton\n"
        "layer = qna_triton.QnA(8, 8, 2, kernel_size=3)\n"
        "assert layer(torch.randn(1, 5, 5, 8)).shape == (1, 5, 5, 8)\n"
        "import qna_vit\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "examples")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qna_vit requires timm") and "qna-triton[vit]" in last, proc.stderr


# ------------------------------------------------------------------------------------------- backbone example
def test_segmentation_example_trains(tmp_path):
    from qna_vit import segment

    summary = segment.main(
        [
            "--model",
            "qna_vit_tiny",
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--img-size",
            "64",
            "--width",
            "16",
            "--threads",
            "1",
            "--seed",
            "0",
            "--output",
            str(tmp_path / "seg.pt"),
        ]
    )
    assert summary["feature_channels"] == [16, 32, 64, 128] and summary["feature_strides"] == [4, 8, 16, 32]
    assert summary["logits_shape"] == [4, segment.NUM_CLASSES, 64, 64]
    assert summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "seg.pt").is_file()
