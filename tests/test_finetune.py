"""Fine-tuning from a checkpoint of another geometry: the bicubic table resize (jax.image.resize's
semantics, against a direct implementation and values measured with JAX), resizing loads of original
(Flax) and our own checkpoints with their reports and errors, timm's pretrained=True from a file, and
train.py's fine-tuning recipe and --initial-checkpoint.

The models are reduced in width and depth (both block kinds, the paper's windows), so a 384 px forward
and backward stays quick on CPU.
"""

import copy
import math

import numpy as np
import pytest
import torch
from test_qna_vit import perturbed_tree, train_state, write_flax_checkpoint

from qna_triton import CheckpointError
from qna_triton.flax_params import flatten_tree
from qna_vit import FINETUNE_384, create_model, export_flax_params, load_flax_params, load_weights, resize_table
from qna_vit.flax import convert
from qna_vit.training import train_cli as train_script
from qna_vit.training.engine import parse_model_kwargs

# Width 16, one block of each kind per stage, LSA in stages 2-3 with the paper's windows (7, 7, 14, 7).
SMALL = dict(
    base_dim=16, qna_layers=(1, 1, 1, 0), qna_heads=(2, 4, 8, 16), lsa_layers=(0, 0, 1, 1), lsa_heads=(1, 2, 4, 8)
)
SMALL_ARGS = [f"{k}={v if isinstance(v, int) else ','.join(map(str, v))}" for k, v in SMALL.items()]


# ------------------------------------------------------------------------------------------- the resize
def direct_bicubic(a, size):
    """jax.image.resize(a, size + a.shape[2:], 'bicubic') written out per output sample: half-pixel
    centre c = (i + 0.5) / scale - 0.5, weight K((j - c) * t) * t with t = min(1, scale) (antialiasing
    when shrinking), Keys' cubic a = -0.5, weights normalised over the taps inside the input."""

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return 1.5 * x**3 - 2.5 * x**2 + 1
        if x < 2:
            return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
        return 0.0

    def weights(n, m):
        scale = m / n
        t = min(1.0, scale)
        rows = []
        for i in range(m):
            c = (i + 0.5) / scale - 0.5
            w = [kernel((j - c) * t) * t for j in range(n)]
            total = sum(w)
            rows.append([v / total for v in w])
        return rows

    wh, ww = weights(a.shape[0], size[0]), weights(a.shape[1], size[1])
    out = np.zeros(tuple(size) + a.shape[2:])
    for i in range(size[0]):
        for j in range(size[1]):
            for y in range(a.shape[0]):
                for x in range(a.shape[1]):
                    out[i, j] += wh[i][y] * ww[j][x] * a[y, x]
    return out


@pytest.mark.parametrize(
    "shape, size",
    [
        ((3, 3, 2), (5, 5)),
        ((13, 13, 2), (23, 23)),
        ((12, 12, 3), (7, 7)),
        ((5, 5, 1), (1, 1)),
        ((1, 1, 2), (3, 3)),
        ((4, 6, 2), (9, 3)),
    ],
)
def test_resize_matches_the_direct_definition(shape, size):
    """Up-sampling (a 7-window table to a 12-window one is 13 -> 23), antialiased down-sampling, 1 pixel
    in or out, and different factors per axis."""
    a = np.random.default_rng(0).normal(size=shape)
    np.testing.assert_allclose(resize_table(a, size), direct_bicubic(a, size), rtol=1e-12, atol=1e-12)


def test_resize_matches_values_measured_with_jax():
    # jax 0.10.2, float64: jax.image.resize(x, shape, 'bicubic') (not torch's bicubic: a = -0.75, edge clamping)
    a = np.arange(9.0).reshape(3, 3, 1)
    up = [
        [-0.301886792453, 0.079555054914, 0.77358490566, 1.467614756407, 1.849056603774],
        [0.842438749648, 1.223880597015, 1.917910447761, 2.611940298507, 2.993382145874],
        [2.924528301887, 3.305970149254, 4.0, 4.694029850746, 5.075471698113],
        [5.006617854126, 5.388059701493, 6.082089552239, 6.776119402985, 7.157561250352],
        [6.150943396226, 6.532385243593, 7.22641509434, 7.920444945086, 8.301886792453],
    ]
    np.testing.assert_allclose(resize_table(a, (5, 5))[..., 0], up, atol=1e-11)
    down = [[1.239165329053, 2.619582664526], [5.380417335474, 6.760834670947]]
    np.testing.assert_allclose(resize_table(a, (2, 2))[..., 0], down, atol=1e-11)
    b = np.array([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0], [1.0, 0.0, 3.0, 0.0]]).reshape(
        4, 4, 1
    )
    mixed = [
        [0.17954353848, 0.467114715668, 1.523786583163],
        [1.290752456589, 0.412609871535, 0.890429398304],
        [2.119761208577, 0.494262851213, 0.275171624714],
        [0.823952241715, 0.930924728608, 0.569094838546],
        [0.500471126666, 1.354166666667, 0.803472876565],
        [0.579429122004, 1.605612900786, 0.931109237625],
    ]
    np.testing.assert_allclose(resize_table(b, (6, 3))[..., 0], mixed, atol=1e-11)
    torch_bicubic = torch.nn.functional.interpolate(
        torch.from_numpy(a[None, :, :, 0]).unsqueeze(0), (5, 5), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    assert np.abs(torch_bicubic - np.array(up)).max() > 1e-2  # a different resize: it must not be used


# ------------------------------------------------------------------------------------------- loads
def _source(**extra):
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **SMALL, num_classes=10, **extra)
    return model, perturbed_tree(model)


def test_flax_checkpoint_at_224_fine_tunes_at_384():
    """The original's recipe: a 224 checkpoint into the 384 geometry (LSA windows 12, 24 in stages 2, 3)
    with another class count; then a forward and backward at 384."""
    _, tree = _source()
    torch.manual_seed(1)
    model = create_model("qna_vit_tiny", **SMALL, num_classes=5, **FINETUNE_384)
    report = load_flax_params(model, tree, resize=True)
    flat, back = flatten_tree(tree), flatten_tree(export_flax_params(model))
    lsa2 = "LSAStage_2/MSA_Block_1/MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias"
    lsa3 = lsa2.replace("LSAStage_2", "LSAStage_3")
    assert report.resized == {lsa2: ((27**2, 4), (47**2, 4)), lsa3: ((13**2, 8), (23**2, 8))}
    assert report.initialised == ["ClassificationHead_0/head_logits/bias", "ClassificationHead_0/head_logits/kernel"]
    assert sorted(report.loaded) == sorted(set(flat) - set(report.resized) - set(report.initialised))
    for key in report.loaded:
        np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
    expected = resize_table(flat[lsa2].reshape(27, 27, 4), (47, 47)).reshape(47**2, 4)
    np.testing.assert_allclose(back[lsa2], expected, rtol=1e-6, atol=1e-7)
    assert "resized" in str(report) and "newly initialised ClassificationHead_0/head_logits/kernel" in str(report)

    model.train()
    out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_qna_window_and_head_tables_resize():
    """Another QnA window (3 -> 5: rpe_bias [9, N*h] and attn_scale_weights [1, 1, 9, N*h]) and a qnav
    head at another resolution (its window is the final map: 2x2 at 64 px, 3x3 at 96 px)."""
    _, tree = _source(head="qnav1", img_size=64)
    model = create_model("qna_vit_tiny", **SMALL, num_classes=10, head="qnav1", img_size=96, kernel_size=5)
    report = load_flax_params(model, tree, resize=True)
    assert report.resized["QnAStage_0/QnA_Block_1/FusedKQnA_0/rpe_bias"] == ((9, 4), (25, 4))
    assert report.resized["QnAStage_0/QnA_Block_2_stride_2/FusedKQnA_0/attn_scale_weights"] == (
        (1, 1, 9, 8),
        (1, 1, 25, 8),
    )
    assert report.resized["ClassificationHead_0/FusedKQnA_0/rpe_bias"] == ((4, 32), (9, 32))
    assert not report.initialised
    scale = flatten_tree(tree)["QnAStage_0/QnA_Block_1/FusedKQnA_0/attn_scale_weights"]
    np.testing.assert_allclose(
        model.stages[0].qna_blocks[0].mixer.attn_scale_weights.detach().numpy(),
        resize_table(scale.reshape(3, 3, 4), (5, 5)).reshape(1, 1, 25, 4),
        rtol=1e-6,
        atol=1e-7,
    )
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_mismatches_that_are_not_tables_name_the_parameter():
    _, tree = _source()
    wider = create_model(
        "qna_vit_tiny",
        **{**SMALL, "base_dim": 24, "qna_heads": (3, 6, 12, 24), "lsa_heads": (1, 2, 4, 8)},
        num_classes=10,
    )
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(
        CheckpointError,
        match=r"key 'ClassificationHead_0/LayerNorm_0/bias' has shape \(128,\), "
        r"expected \(192,\)",
    ):
        load_flax_params(wider, tree, resize=True)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # untouched
    heads = create_model("qna_vit_tiny", **{**SMALL, "lsa_heads": (1, 2, 8, 8)}, num_classes=10)
    with pytest.raises(
        CheckpointError,
        match=r"'LSAStage_2/.*rpe_bias' has shape \(729, 4\), expected "
        r"\(729, 8\): a table is resized over its positions only",
    ):
        load_flax_params(heads, tree, resize=True)
    at384 = create_model("qna_vit_tiny", **SMALL, num_classes=10, **FINETUNE_384)
    with pytest.raises(CheckpointError, match=r"rpe_bias' has shape \(729, 4\), expected \(2209, 4\) \(resize=True"):
        load_flax_params(at384, tree)  # strict without resize
    deeper = create_model("qna_vit_tiny", **{**SMALL, "qna_layers": (2, 1, 1, 0)}, num_classes=10)
    with pytest.raises(CheckpointError, match="missing key 'QnAStage_0/QnA_Block_2/"):
        load_flax_params(deeper, tree, resize=True)


def test_our_checkpoints_resize_and_timm_pretrained_from_a_file(tmp_path):
    """A converted checkpoint (convert_flax.py's format) into the 384 geometry: load_weights, and timm's
    pretrained=True with pretrained_cfg_overlay=dict(file=...), which resizes through the filter fn."""
    source, tree = _source()
    msgpack_path, pt = tmp_path / "checkpoint_1", tmp_path / "src.pt"
    write_flax_checkpoint(msgpack_path, train_state(tree, nested=False))
    convert("qna_vit_tiny", str(msgpack_path), str(pt), model_kwargs=parse_model_kwargs(SMALL_ARGS))
    ckpt = torch.load(pt, weights_only=True)
    model = create_model("qna_vit_tiny", **SMALL, num_classes=10, **FINETUNE_384)
    report = load_weights(model, str(pt))
    table = "stages.2.lsa_blocks.0.mixer.relative_position_bias_table"
    assert set(report.resized) == {table, table.replace("stages.2", "stages.3")} and not report.initialised
    np.testing.assert_allclose(
        model.state_dict()[table].numpy(),
        resize_table(ckpt["model"][table].double().numpy().reshape(27, 27, 4), (47, 47)).reshape(-1, 4),
        rtol=1e-6,
        atol=1e-7,
    )
    with pytest.raises(CheckpointError, match="resize=True"):
        load_weights(create_model("qna_vit_tiny", **SMALL, num_classes=10, **FINETUNE_384), str(pt), resize=False)
    # train.py --initial-checkpoint takes either file: ours, or the original msgpack
    flax_table = "LSAStage_2/MSA_Block_1/MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias"
    for path, key in ((pt, table), (msgpack_path, flax_table)):
        other = create_model("qna_vit_tiny", **SMALL, num_classes=10, **FINETUNE_384)
        assert key in train_script.load_initial_checkpoint(other, str(path)).resized
        assert torch.equal(other.state_dict()[table], model.state_dict()[table])

    import timm

    fine = timm.create_model(
        "qna_vit_tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(pt)),
        num_classes=3,
        **SMALL,
        **FINETUNE_384,
    )
    assert torch.equal(fine.state_dict()[table], model.state_dict()[table])
    assert fine.head.fc.out_features == 3
    key = "stages.1.qna_blocks.0.mixer.Wk"
    assert torch.equal(fine.state_dict()[key], ckpt["model"][key])
    same = timm.create_model("qna_vit_tiny", checkpoint_path=str(pt), num_classes=10, **SMALL)  # strict, as is
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in same.state_dict().items())


def test_train_finetune_recipe_from_an_initial_checkpoint(tmp_path):
    """--recipe finetune's settings, and a short run from a converted 224 checkpoint at a reduced size."""
    args = train_script.parse_args(["--synthetic", "--recipe", "finetune"])
    assert (args.img_size, args.epochs, args.lr_base, args.weight_decay, args.warmup_epochs, args.sched) == (
        384,
        30,
        1e-5,
        1e-8,
        0.0,
        "constant",
    )
    assert args.model_kwargs["lsa_window"] == (12, 12, 24, 12) and args.clip_grad is None
    assert train_script.parse_args(["--synthetic", "--recipe", "finetune", "--epochs", "3"]).epochs == 3

    source, _ = _source()
    src = tmp_path / "src.pt"
    torch.save({"model": source.state_dict(), "model_name": "qna_vit_tiny"}, src)
    # 64 px: maps 16, 8, 4, 2; LSA windows 4 and 2 replace the checkpoint's 14 and 7 (tables resized)
    argv = [
        "--synthetic",
        "--recipe",
        "finetune",
        "--initial-checkpoint",
        str(src),
        "--img-size",
        "64",
        "--model-kwargs",
        *SMALL_ARGS,
        "lsa_window=7,7,4,2",
        "--synthetic-classes",
        "4",
        "--synthetic-train-size",
        "16",
        "--synthetic-val-size",
        "8",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--threads",
        "1",
        "--aa",
        "none",
        "--output",
        str(tmp_path / "run"),
        "--progress",
        "none",
        "--no-tensorboard",
        "--device",
        "cpu",
        "--lr",
        "1e-4",
    ]
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            summary = train_script.train(train_script.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    run = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    schedule = run["schedule"]  # timm's CosineLRScheduler: lr_min equal to the lr is a constant schedule
    assert schedule["lr_min"] == pytest.approx(1e-4) and schedule["base_values"] == pytest.approx([1e-4] * 2)
    assert schedule["warmup_t"] == 0
    key = "stages.0.qna_blocks.0.mixer.query"  # the fine-tuned weights started from the checkpoint's
    assert (run["model"][key] - source.state_dict()[key]).abs().max() < 1e-2
    with pytest.raises(SystemExit):
        train_script.parse_args(["--synthetic", "--initial-checkpoint", str(tmp_path / "missing.pt")])
