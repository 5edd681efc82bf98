"""Training, evaluation and the demo on CPU: learning, exact resume, torchrun, checkpoints, data.

Every run uses a reduced QnA-ViT (width 16, one block per stage, windowed attention in stages 2-3) on
16x16 generated images, so a training step takes milliseconds.
"""

import csv
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from qna_vit.training import demo
from qna_vit.training import eval_cli as eval_script
from qna_vit.training import train_cli as train_script
from qna_vit.training.checkpoint import atomic_save, load_checkpoint, truncate_csv
from qna_vit.training.data import (
    AugConfig,
    DataSpec,
    ImageFolderDataset,
    ResumableSampler,
    SeededDataset,
    SyntheticShapes,
    build_dataset,
    build_transform,
)
from qna_vit.training.engine import (
    build_optimizer,
    build_scheduler,
    decayed_parameter_count,
    derive_seed,
    set_step_lr,
)
from qna_vit.training.mixup import SeededMixup, cross_entropy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# 16x16 input: feature maps 4, 2, 1, 1, so the LSA windows are 1 and 1 in stages 2 and 3.
TINY = [
    "base_dim=16",
    "qna_layers=1,1,1,0",
    "qna_heads=2,4,8,16",
    "lsa_layers=0,0,1,1",
    "lsa_heads=1,2,4,8",
    "lsa_window=4,2,1,1",
]
STEP_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm")
SUMMARY_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "top1",
    "top5",
    "ema_val_loss",
    "ema_top1",
    "ema_top5",
)


def tiny_args(out, *extra, classes=4, train_size=96, val_size=32, batch=16, epochs=2):
    return [
        "--synthetic",
        "--synthetic-classes",
        str(classes),
        "--synthetic-train-size",
        str(train_size),
        "--synthetic-val-size",
        str(val_size),
        "--img-size",
        "16",
        "--model-kwargs",
        *TINY,
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--workers",
        "0",
        "--threads",
        "1",
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "0.5",
        "--aa",
        "none",
        "--output",
        str(out),
        "--progress",
        "plain",
        "--log-interval",
        "5",
        "--no-tensorboard",
        "--seed",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def run_train(argv):
    """train.py in this process, leaving torch's thread count and global RNG as they were."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            return train_script.train(train_script.parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def read_csv(path, columns):
    with open(path, newline="") as f:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------- building blocks
def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_at_any_step():
    full = ResumableSampler(100, batch_size=4, seed=7)
    full.set_epoch(3)
    order = list(full)
    assert len(order) == full.steps_per_epoch * 4 == 100
    again = ResumableSampler(100, batch_size=4, seed=7)
    again.set_epoch(3, start_step=5)
    assert list(again) == order[20:]
    other = ResumableSampler(100, batch_size=4, seed=7)
    other.set_epoch(4)
    assert [i for i, _ in other] != [i for i, _ in order]
    assert sorted(i for i, _ in order) == list(range(100))


def test_sampler_splits_each_step_identically_over_ranks_and_accumulation():
    single = ResumableSampler(90, batch_size=12, seed=1)
    single.set_epoch(0)
    ref = list(single)  # 7 steps of 12, 6 images dropped
    assert single.steps_per_epoch == 7 and len(ref) == 84
    for world, accum in ((2, 1), (3, 2), (1, 4)):
        b = 12 // (world * accum)
        shards = []
        for rank in range(world):
            s = ResumableSampler(90, batch_size=b, world_size=world, rank=rank, accum_steps=accum, seed=1)
            s.set_epoch(0)
            shards.append(list(s))
        per_step = 12 // world
        for step in range(7):
            got = sorted(x for shard in shards for x in shard[step * per_step : (step + 1) * per_step])
            assert got == sorted(ref[step * 12 : (step + 1) * 12]), (world, accum, step)


def test_seeded_transforms_do_not_depend_on_call_order_or_disturb_global_rng():
    ds = SeededDataset(
        SyntheticShapes(3, 6, 20, as_pil=True),
        build_transform(AugConfig(img_size=16, reprob=0.5), train=True),  # RandAugment on
    )
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    random.seed(5)
    np.random.seed(5)
    py_before, np_before = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    a = ds[(2, 1234)][0]
    ds[(4, 99)]
    b = ds[(2, 1234)][0]
    assert torch.equal(torch.rand(3), before)
    assert (random.random(), np.random.rand()) == (py_before, np_before)
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    assert not torch.equal(a, ds[(2, 1235)][0])


def test_mixup_is_a_function_of_the_seed_and_keeps_the_batch():
    mix = SeededMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    x = torch.randn(6, 3, 8, 8)
    x0 = x.clone()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    outs = []
    for seed in range(8):
        xm, t = mix(x, y, seed)
        assert xm.shape == x.shape and t.shape == (6, 5)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        again = mix(x, y, seed)
        assert torch.equal(again[0], xm) and torch.equal(again[1], t)
        outs.append(xm)
    assert torch.equal(x, x0)  # timm mixes in place; the caller's batch is untouched
    assert np.array_equal(np.random.get_state()[1], before)  # the global numpy stream is restored
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(ValueError, match="even batch"):
        mix(x[:5], y[:5], 0)
    logits = torch.randn(6, 5)
    hard = cross_entropy(logits, y, smoothing=0.1)
    soft = cross_entropy(logits, mixup_target(y, 5, lam=1.0, smoothing=0.1))
    torch.testing.assert_close(hard, soft)


def test_schedule_warmup_cosine_and_optimizer_groups():
    from qna_vit import create_model

    model = create_model("qna_vit_tiny", num_classes=3, img_size=16, **train_script.parse_model_kwargs(TINY))
    optimizer = build_optimizer(model, 1e-3, 0.05)
    s = build_scheduler(optimizer, total_steps=100, warmup_steps=10, warmup_lr=0.0, min_lr=1e-5)
    lrs = {step: set_step_lr(s, optimizer, step) for step in (0, 5, 10, 55, 100, 120)}
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5)) and lrs[100] == pytest.approx(1e-5)
    assert lrs[120] == pytest.approx(1e-5)
    constant = build_scheduler(build_optimizer(model, 1e-3, 0.05), total_steps=100, warmup_steps=0, min_lr=1e-3)
    assert [set_step_lr(constant, constant.optimizer, t) for t in (0, 50, 99)] == pytest.approx([1e-3] * 3)
    # weight decay on the weight matrices only: never on 1-D parameters nor the position tables and
    # attention scales the model lists in no_weight_decay()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for n, p in model.named_parameters():
        leaf = n.rsplit(".", 1)[-1]
        special = leaf in ("rpe_bias", "attn_scale_weights", "relative_position_bias_table") or p.ndim == 1
        assert (n not in decayed) == special, n
    assert decayed_parameter_count(optimizer) == sum(p.numel() for n, p in model.named_parameters() if n in decayed)
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)


def test_layer_decay_scales_the_lr_by_depth():
    from qna_vit import create_model

    model = create_model("qna_vit_tiny", num_classes=3, img_size=16, **train_script.parse_model_kwargs(TINY))
    optimizer = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    set_step_lr(build_scheduler(optimizer, total_steps=10, min_lr=1e-3), optimizer, 0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    head, stem = lr_of[id(named["head.fc.weight"])], lr_of[id(named["stem.conv.weight"])]
    assert head == pytest.approx(1e-3) and stem < head / 4
    with pytest.raises(SystemExit):
        train_script.parse_args(["--synthetic", "--layer-decay", "0"])


def test_atomic_save_and_csv_truncation(tmp_path):
    path = tmp_path / "ck.pth"
    atomic_save({"step": 1, "t": torch.ones(2), "shape": (1, 2)}, str(path))
    atomic_save({"step": 2, "t": torch.zeros(2), "shape": (1, 2)}, str(path))
    assert load_checkpoint(str(path))["step"] == 2
    assert load_checkpoint(str(tmp_path / "ck.pth"))["shape"] == (1, 2)
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]  # no temporary file left behind

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, str(path))
    assert load_checkpoint(str(path))["step"] == 2 and sorted(os.listdir(tmp_path)) == ["ck.pth"]
    log = tmp_path / "steps.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n")
    assert truncate_csv(str(log), lambda r: int(r["step"]) <= 2) == 1
    assert log.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]


def test_image_folder_fallback_reads_pngs_and_trains(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="the ImageFolder reader needs pillow")

    shapes = SyntheticShapes(3, 24, 20)
    for split, count in (("train", 24), ("val", 6)):
        for i in range(count):
            img, label = shapes[i]
            folder = tmp_path / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    (tmp_path / "train" / "class_0" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path / "train"))
    assert ds.classes == ["class_0", "class_1", "class_2"] and len(ds) == 24
    img, label = ds[0]
    assert img.size == (20, 20) and img.mode == "RGB" and label == 0
    assert np.array_equal(np.asarray(img), shapes[0][0])  # PNG is lossless
    assert sorted(ds.targets) == sorted(shapes.targets)
    x = build_transform(AugConfig(img_size=16), train=False)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    val, n_classes = build_dataset(DataSpec(data_dir=str(tmp_path)), "val", as_pil=False)
    assert n_classes == 3 and len(val) == 6
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path / "train" / "class_0"))

    argv = tiny_args(tmp_path / "run", epochs=1, batch=8)
    argv[argv.index("--synthetic") : argv.index("--img-size")] = ["--data-dir", str(tmp_path)]
    summary = run_train(argv)
    assert summary["steps"] == 3 and summary["metrics"]["images"] == 6


# ----------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    argv = tiny_args(
        out,
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--reprob",
        "0",
        "--scale",
        "0.5",
        "1",
        "--drop-path",
        "0",
        train_size=640,
        val_size=64,
        batch=16,
        epochs=3,
    )
    return out, run_train(argv)


def test_short_run_learns(learned_run):
    out, summary = learned_run
    assert summary["steps"] == 120
    assert summary["first_loss_mean"] > 1.3  # ln(4) = 1.39 at the start
    assert summary["last_loss_mean"] < 1.0, summary  # 0.73 when written; label smoothing keeps it > 0.3
    assert summary["metrics"]["top1"] >= 65.0, summary["metrics"]  # 83% when written, chance is 25%
    rows = read_csv(out / "steps.csv", STEP_COLUMNS)
    assert [int(r[0]) for r in rows] == list(range(1, 121))
    assert len(read_csv(out / "summary.csv", SUMMARY_COLUMNS)) == 3
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 120 and ckpt["model_name"] == "qna_vit_tiny" and ckpt["best"]["top1"] is not None
    assert os.path.isfile(out / "best.pth")


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_eval_script_reports_the_training_metrics(learned_run, tmp_path, capsys, keep_threads):
    out, summary = learned_run
    result = eval_script.run(
        [
            "--checkpoint",
            str(out / "last.pth"),
            "--synthetic",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--batch-size",
            "16",
            "--bench-steps",
            "2",
            "--results-file",
            str(tmp_path / "r.json"),
        ]
    )
    text = capsys.readouterr().out
    assert re.search(
        r"^checkpoint: .*last\.pth \(qna_vit_tiny, 0\.\d\dM parameters, 4 classes, step 120\)$", text, re.M
    )
    assert re.search(r"^device: cpu \| QnA backend: reference \| precision: float32", text, re.M)
    assert re.search(r"^data: generated shapes \(val, 4 classes, 16px, seed 0\): 64 images at 16x16", text, re.M)
    m = re.search(r"^top-1 (\d+\.\d{3})% \| top-5 (\d+\.\d{3})% \| loss (\d+\.\d{4}) \| 64 images$", text, re.M)
    assert m, text
    assert re.search(
        r"^throughput: \d+\.\d images/s end-to-end \| \d+\.\d images/s model only "
        r"\(batch 16, 2 timed passes\)$",
        text,
        re.M,
    )
    trained = summary["metrics"]
    assert float(m.group(1)) == pytest.approx(trained["top1"], abs=1e-3)
    assert float(m.group(2)) == pytest.approx(trained["top5"], abs=1e-3)
    assert result["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert (tmp_path / "r.json").is_file()

    # convert_flax.py's format: weights, model name and architecture arguments only.
    ckpt = load_checkpoint(str(out / "last.pth"))
    flax_like = tmp_path / "converted.pt"
    torch.save(
        {
            "model": ckpt["model"],
            "model_name": "qna_vit_tiny",
            "model_args": dict(ckpt["model_kwargs"], num_classes=4, head="gap"),
        },
        flax_like,
    )
    again = eval_script.run(
        [
            "--checkpoint",
            str(flax_like),
            "--synthetic",
            "--synthetic-classes",
            "4",
            "--synthetic-val-size",
            "64",
            "--synthetic-image-size",
            "16",
            "--img-size",
            "16",
            "--workers",
            "0",
            "--bench-steps",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert again["top1"] == pytest.approx(trained["top1"], abs=1e-3)


def test_resume_after_a_kill_mid_epoch_repeats_the_uninterrupted_run(tmp_path):
    # The whole recipe: mixup + cutmix, label smoothing, random erasing, colour jitter, stochastic
    # depth, EMA. 6 steps per epoch, 2 epochs; mid-epoch checkpoints at steps 4 and 8.
    common = ["--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--ckpt-interval", "4"]
    ref = run_train(tiny_args(tmp_path / "ref", *common))
    assert ref["steps"] == 12

    killed = tmp_path / "killed"
    argv = tiny_args(killed, *common, "--debug-exit-after-step", "10")
    argv[argv.index("--workers") + 1] = "2"  # the order and augmentations do not depend on the workers
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), *argv],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == train_script.DEBUG_EXIT_CODE, proc.stderr[-3000:]
    assert load_checkpoint(str(killed))["step"] == 8
    assert int(read_csv(killed / "steps.csv", STEP_COLUMNS)[-1][0]) == 10  # logged past the checkpoint

    resumed = run_train(tiny_args(killed, *common, "--resume", str(killed)))
    assert resumed["steps"] == 12
    assert read_csv(killed / "steps.csv", STEP_COLUMNS) == read_csv(tmp_path / "ref" / "steps.csv", STEP_COLUMNS)
    assert read_csv(killed / "summary.csv", SUMMARY_COLUMNS) == read_csv(
        tmp_path / "ref" / "summary.csv", SUMMARY_COLUMNS
    )
    a, b = load_checkpoint(str(killed)), load_checkpoint(str(tmp_path / "ref"))
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)


def test_torchrun_and_gradient_accumulation_match_one_process(tmp_path):
    # Same global batch (2 x 8 vs 1 x 16), no mixup and no stochastic depth: the two runs see the same
    # images with the same augmentations and differ only in floating-point summation order.
    common = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0"]
    single = run_train(tiny_args(tmp_path / "one", *common, train_size=64, batch=16))
    argv = tiny_args(tmp_path / "two", *common, train_size=64, batch=8)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLES / "train.py"),
            *argv,
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2 (gloo)" in proc.stdout
    assert proc.stdout.count("optimizer: AdamW") == 1  # only rank 0 logs
    one = read_csv(tmp_path / "one" / "steps.csv", ("step", "loss", "lr"))
    two = read_csv(tmp_path / "two" / "steps.csv", ("step", "loss", "lr"))
    assert len(one) == len(two) == single["steps"] == 8
    for (s1, l1, lr1), (s2, l2, lr2) in zip(one, two):
        assert s1 == s2 and lr1 == lr2
        assert float(l1) == pytest.approx(float(l2), rel=1e-4, abs=1e-5)
    v1 = read_csv(tmp_path / "one" / "summary.csv", ("top1", "val_loss"))
    v2 = read_csv(tmp_path / "two" / "summary.csv", ("top1", "val_loss"))
    for (t1, vl1), (t2, vl2) in zip(v1, v2):
        assert float(t1) == pytest.approx(float(t2), abs=1e-6) and float(vl1) == pytest.approx(float(vl2), rel=1e-4)
    ckpt = load_checkpoint(str(tmp_path / "two"))
    assert ckpt["data_order"]["global_batch"] == 16 and ckpt["step"] == 8

    # Gradient accumulation (8 x 2 accumulation steps) is the same run again; stopped by --max-steps
    # mid-epoch (evaluated and saved there) and resumed to the end.
    accum = tiny_args(tmp_path / "accum", *common, "--grad-accum-steps", "2", train_size=64, batch=8)
    assert run_train(accum + ["--max-steps", "6"])["steps"] == 6
    assert run_train(accum + ["--resume", str(tmp_path / "accum")])["steps"] == 8
    acc = read_csv(tmp_path / "accum" / "steps.csv", ("step", "loss", "lr"))
    assert [r[0] for r in acc] == [r[0] for r in one] and [r[2] for r in acc] == [r[2] for r in one]
    for (_, l1, _), (_, l2, _) in zip(one, acc):
        assert float(l1) == pytest.approx(float(l2), rel=1e-4, abs=1e-5)
    assert [r[0] for r in read_csv(tmp_path / "accum" / "summary.csv", ("step",))] == ["4", "6", "8"]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    argv = tiny_args(out, "--ckpt-interval", "3", "--debug-nan-at-step", "7", train_size=192)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), *argv],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss (nan) at step 7 (epoch 0, batch 7 of 12)"), message
    assert f"last good checkpoint: {out / 'last.pth'} (step 6), left untouched" in message
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 6
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    # No torn or temporary files; the checkpoint before the last one is kept (--keep-checkpoints).
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000003.pth", "last.pth", "steps.csv"]
    last = read_csv(out / "steps.csv", ("step", "loss"))[-1]
    assert last[0] == "7" and math.isnan(float(last[1]))

    with pytest.raises(train_script.NonFiniteLossError, match="at step 2 .* no checkpoint had been written yet"):
        run_train(tiny_args(tmp_path / "nan2", "--debug-nan-at-step", "2", "--log-interval", "1"))


def test_demo_runs_end_to_end(tmp_path, capsys, keep_threads):
    with torch.random.fork_rng(devices=[]):
        summary = demo.main(
            [
                "--epochs",
                "1",
                "--train-size",
                "64",
                "--val-size",
                "32",
                "--workers",
                "0",
                "--threads",
                "1",
                "--progress",
                "plain",
                "--output",
                str(tmp_path / "demo"),
                "--device",
                "cpu",
            ]
        )
    text = capsys.readouterr().out
    assert summary["steps"] == 2
    assert "device: cpu | QnA backend: reference" in text
    assert re.search(r"^  loss        \d+\.\d{4} \(mean of the first steps\) -> \d+\.\d{4}", text, re.M)
    assert re.search(r"^  throughput  \d+\.\d training images/s \(CPU, PyTorch reference path\)$", text, re.M)
