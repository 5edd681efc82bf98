"""Training data on disk: unreadable images (skipped, replaced, counted, verified) and WebDataset shards.

Every file here is real and written to ``tmp_path``: truncated, empty and non-image ``.jpg`` files, valid
but unusual ones (CMYK, greyscale, palette, 16-bit, a PNG named ``.jpg``), and tar shards written with
``tarfile``. The training runs use test_train.py's reduced model on 16x16 images (seconds each).
"""

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import EXAMPLES, ROOT, STEP_COLUMNS, read_csv, run_train, subprocess_env, tiny_args
from torch.utils.data import DataLoader

from qna_vit.training import eval_cli as eval_script
from qna_vit.training import train_cli as train_script
from qna_vit.training.checkpoint import load_checkpoint
from qna_vit.training.data import (
    BadSampleError,
    BadSampleLog,
    ImageFolderDataset,
    ResumableSampler,
    SeededDataset,
    ShardSampler,
    SyntheticShapes,
    TarShardDataset,
    collate_samples,
    decode_image,
    image_folder,
    load_image_file,
    shard_files,
    split_dataset,
    verify_dataset,
)

SIDE = 20


def _shapes(n, classes=3, split="train"):
    return SyntheticShapes(classes, n, SIDE, seed=1, split=split)


def _jpeg_bytes(arr, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _bad_files(folder):
    """The three kinds of unreadable .jpg of real ImageNet copies, written into ``folder``."""
    good = _jpeg_bytes(_shapes(1)[0][0])
    paths = {
        "truncated": folder / "zz_truncated.jpg",
        "empty": folder / "zz_empty.jpg",
        "text": folder / "zz_text.jpg",
    }
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("<html>404 Not Found</html>\n")
    return paths


def _image_folder(root, train=24, val=8, bad_train=True, bad_val=True):
    """root/{train,val}/class_<c>/*.jpg from the generated shapes, plus unreadable files."""
    for split, count in (("train", train), ("val", val)):
        shapes = _shapes(count, split=split)
        for i in range(count):
            arr, label = shapes[i]
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img_{i:03d}.jpg").write_bytes(_jpeg_bytes(arr))
    bad = {}
    if bad_train:
        bad.update({f"train_{k}": v for k, v in _bad_files(root / "train" / "class_1").items()})
    if bad_val:
        text = root / "val" / "class_2" / "zz_broken.jpg"
        text.write_text("not an image")
        bad["val_text"] = text
    return bad


def _data_args(out, data_dir, *extra, batch=8, epochs=2):
    argv = tiny_args(out, *extra, batch=batch, epochs=epochs, classes=3)
    start, end = argv.index("--synthetic"), argv.index("--img-size")
    argv[start:end] = ["--data-dir", str(data_dir)]
    return argv


# ----------------------------------------------------------------------------------- decoding
def test_unusual_valid_images_load_as_rgb_and_unreadable_ones_name_the_file(tmp_path):
    arr = _shapes(1)[0][0]
    files = {
        "cmyk.jpg": _jpeg_bytes(arr, "CMYK"),
        "grey.jpg": _jpeg_bytes(arr, "L"),
        "palette.png": _jpeg_bytes(arr, "P", "PNG"),
        "png_named.jpg": _jpeg_bytes(arr, "RGB", "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    trans = Image.fromarray(arr).convert("P")
    trans.info["transparency"] = 0
    trans.save(tmp_path / "palette_transparent.png", transparency=0)
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    for name in [*files, "palette_transparent.png", "grey16.png"]:
        img = decode_image(str(tmp_path / name), name)
        assert img.mode == "RGB" and img.size == (SIDE, SIDE), name
        rgb = np.asarray(img).astype(np.float32)
        if name == "grey16.png":
            assert np.abs(rgb[..., 0] - arr[..., 0]).max() <= 1  # scaled to 8 bits, not clipped to 255
        elif name in ("grey.jpg",):
            assert np.abs(rgb.mean(-1) - arr.mean(-1)).mean() < 20
        else:
            assert np.abs(rgb - arr).mean() < 20, name  # the same picture (lossy formats, palettes)

    bad = _bad_files(tmp_path)
    for kind, path in bad.items():
        with pytest.raises(BadSampleError) as e:
            load_image_file(str(path))
        assert e.value.name == str(path)
        assert {"truncated": "truncated", "empty": "empty file", "text": "not an image format"}[
            kind
        ] in e.value.reason.lower()


def test_folder_readers_raise_for_unreadable_files_and_seeded_dataset_replaces_them(tmp_path):
    bad = _image_folder(tmp_path, train=12, val=2, bad_val=False)
    ds = image_folder(str(tmp_path / "train"))
    assert isinstance(ds, ImageFolderDataset) and ds.classes == ["class_0", "class_1", "class_2"]
    names = [p for p, _ in ds.samples]
    i = names.index(str(bad["train_truncated"]))
    with pytest.raises(BadSampleError, match=re.escape(str(bad["train_truncated"]))):
        ds[i]
    seeded = SeededDataset(ds, lambda img: torch.from_numpy(np.asarray(img).copy()))
    a = seeded[(i, 12345)]
    assert a[0] is not None and a[2][0][0] == str(bad["train_truncated"])
    b = seeded[(i, 12345)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]  # the replacement is a function of the seed
    others = {seeded[(i, s)][0].sum().item() for s in range(8)}
    assert len(others) > 1  # ... and another seed draws another replacement
    skip = SeededDataset(ds, seeded.transform, replace_bad=False)
    assert skip[i][0] is None and skip[i][2][0][0] == str(bad["train_truncated"])
    x, y, unreadable = collate_samples([skip[i], skip[0]])
    assert x.shape[0] == 1 and y.tolist() == [ds[0][1]] and len(unreadable) == 1
    x, y, unreadable = collate_samples([skip[i]])
    assert x.shape[0] == 0 and len(y) == 0

    log = BadSampleLog("skipped", warn=lambda line: lines.append(line))
    lines = []
    log.record(0, [("a.jpg", "x"), ("a.jpg", "x")])
    log.record(1, [("a.jpg", "x"), ("b.jpg", "y")])
    assert log.count() == 0  # nothing merged before sync
    log.sync()
    assert log.count() == 2 and log.count(0) == 1 and log.count(1) == 2
    assert lines == ["warning: unreadable image a.jpg skipped (x)", "warning: unreadable image b.jpg skipped (y)"]
    again = BadSampleLog()
    again.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert again.summary() == log.summary() == {"per_epoch": {0: 1, 1: 2}, "files": {"a.jpg": "x", "b.jpg": "y"}}


def test_image_folder_is_listed_by_timms_reader(tmp_path):
    # timm's find_images_and_targets: the class is the folder holding the image, in natural order.
    arr = _shapes(1)[0][0]
    for rel in ("c10/a.jpg", "c2/b.JPEG", "c2/sub/c.png", "c1/d.webp", "c1/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_jpeg_bytes(arr, fmt="WEBP" if rel.endswith("webp") else "PNG"))
    ds = image_folder(str(tmp_path))
    assert ds.classes == ["c1", "c2", "c10", "sub"]
    assert [(p[len(str(tmp_path)) + 1 :], t) for p, t in ds.samples] == [
        ("c1/d.webp", 0),
        ("c2/b.JPEG", 1),
        ("c2/sub/c.png", 3),
        ("c10/a.jpg", 2),
    ]
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        image_folder(str(tmp_path / "c2"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"holds neither train-\*\.tar shards nor an ImageFolder train/"):
        split_dataset(str(tmp_path), "train")


# ----------------------------------------------------------------------------------- training
def test_training_replaces_unreadable_images_warns_counts_and_resumes_exactly(tmp_path, capsys):
    bad = _image_folder(tmp_path / "data")
    ref = run_train(_data_args(tmp_path / "ref", tmp_path / "data"))
    err = capsys.readouterr().err
    for key in ("train_truncated", "train_empty", "train_text"):
        assert re.search(rf"^warning: unreadable image {re.escape(str(bad[key]))} replaced by another image", err, re.M)
        assert err.count(str(bad[key])) == 1  # once per file, not once per epoch
    assert f"warning: unreadable image {bad['val_text']} left out of the evaluation" in err
    train_bad = {str(bad[k]) for k in ("train_truncated", "train_empty", "train_text")}
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["steps"] == 6  # 27 images, batch 8: 3 steps per epoch
    assert summary["bad_samples"]["train"]["per_epoch"] == {"0": 3, "1": 3}  # JSON keys
    assert set(summary["bad_samples"]["train"]["files"]) == train_bad
    assert list(summary["bad_samples"]["val"]["files"]) == [str(bad["val_text"])]
    assert summary["bad_samples"]["max_bad_samples"] == 10
    assert ref["metrics"]["images"] == 8  # 9 files in val/, one unreadable and left out
    assert [r[0] for r in read_csv(tmp_path / "ref" / "summary.csv", ("bad_samples",))] == ["3", "3"]

    # Stopped after 4 steps (mid-epoch 1) and resumed: the replacements, so the losses, are the same.
    argv = _data_args(tmp_path / "cut", tmp_path / "data")
    assert run_train(argv + ["--max-steps", "4"])["steps"] == 4
    assert run_train(argv + ["--resume", str(tmp_path / "cut")])["steps"] == 6
    assert read_csv(tmp_path / "cut" / "steps.csv", STEP_COLUMNS) == read_csv(
        tmp_path / "ref" / "steps.csv", STEP_COLUMNS
    )
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert resumed["bad_samples"]["train"] == summary["bad_samples"]["train"]


def test_more_unreadable_images_than_allowed_stop_after_saving(tmp_path, capsys):
    bad = _image_folder(tmp_path / "data", bad_val=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_script.main(_data_args(out, tmp_path / "data", "--max-bad-samples", "0", "--log-interval", "1"))
    assert e.value.code == train_script.BAD_SAMPLES_EXIT_CODE
    message = capsys.readouterr().err.strip().splitlines()[-1]
    m = re.match(
        r"error: (\d) unreadable training images, more than --max-bad-samples 0: (.*); progress saved in "
        r"(.*last\.pth) \(step (\d)\): fix or remove the files and --resume, or raise --max-bad-samples$",
        message,
    )
    assert m, message
    named = [str(p) for p in bad.values() if str(p) in m.group(2)]
    assert len(named) == int(m.group(1)) >= 1
    step = int(m.group(4))
    assert load_checkpoint(str(out))["step"] == step  # stopped at the first step that met one, saved
    assert len(read_csv(out / "steps.csv", STEP_COLUMNS)) == step

    # Checked at the epoch's end too (--log-interval past the epoch), after the epoch's checkpoint;
    # raising the limit then resumes the run.
    out2 = tmp_path / "run2"
    with pytest.raises(train_script.TooManyBadSamplesError, match=r"^3 unreadable training images, more than"):
        run_train(_data_args(out2, tmp_path / "data", "--max-bad-samples", "2"))
    assert load_checkpoint(str(out2))["step"] == 3
    summary = run_train(_data_args(out2, tmp_path / "data", "--max-bad-samples", "3", "--resume", str(out2)))
    assert summary["steps"] == 6 and summary["bad_samples"]["train"]["per_epoch"] == {0: 3, 1: 3}


def test_verify_data_lists_unreadable_files_without_training(tmp_path, capsys):
    bad = _image_folder(tmp_path / "data", train=6, val=3)
    with pytest.raises(SystemExit) as e:
        train_script.main(["--data-dir", str(tmp_path / "data"), "--verify-data", "--workers", "0"])
    assert e.value.code == train_script.BAD_SAMPLES_EXIT_CODE
    out = capsys.readouterr().out
    listed = re.findall(r"^unreadable: (\S+) \((.+)\)$", out, re.M)
    assert sorted(name for name, _ in listed) == sorted(str(p) for p in bad.values())
    assert "train: 9 images (ImageFolder), 3 unreadable" in out and "val: 4 images (ImageFolder), 1 unreadable" in out
    for path in bad.values():
        path.unlink()
    with pytest.raises(SystemExit) as e:
        train_script.main(["--data-dir", str(tmp_path / "data"), "--verify-data", "--workers", "0"])
    assert e.value.code == 0 and "unreadable: " not in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        train_script.parse_args(["--synthetic", "--verify-data"])
    assert "--verify-data checks the files of --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_script.parse_args(["--synthetic", "--max-bad-samples", "-1"])
    assert "--max-bad-samples must be >= 0, got -1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- tar shards
def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(root, split, n, per_shard, classes=3, bad=()):
    """``root/<split>-NNNNNN.tar``: samples ``<key>.jpg`` + ``<key>.cls``; ``bad`` indices get a truncated
    image. Returns the keys in order."""
    shapes = _shapes(n, classes=classes, split=split)
    keys = []
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"{split}-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                arr, label = shapes[i]
                key = f"sample{i:05d}"
                data = _jpeg_bytes(arr)
                _add(tar, f"{key}.jpg", data[: len(data) // 3] if i in bad else data)
                _add(tar, f"{key}.cls", f"{label}\n".encode())
                keys.append(key)
    return keys


def test_tar_shards_train_and_evaluate_with_no_other_flag(tmp_path, capsys):
    data = tmp_path / "shards"
    data.mkdir()
    _write_shards(data, "train", 27, per_shard=10, bad=(5,))
    _write_shards(data, "val", 9, per_shard=4)
    with tarfile.open(data / "val-000099.tar", "w") as tar:  # a key without .cls, one without an image
        _add(tar, "orphan.jpg", _jpeg_bytes(_shapes(1)[0][0]))
        _add(tar, "lonely.cls", b"1")
    assert [p.rsplit("/", 1)[1] for p in shard_files(str(data), "train")] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    train = split_dataset(str(data), "train")
    assert isinstance(train, TarShardDataset) and len(train) == 27 and train.classes == ["0", "1", "2"]
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (SIDE, SIDE) and label == _shapes(1)[0][1]
    with pytest.raises(BadSampleError, match=r"(?i)^train-000000\.tar:sample00005\.jpg: OSError: .*truncated"):
        train[5]

    out = tmp_path / "run"
    summary = run_train(_data_args(out, data))
    err = capsys.readouterr()
    assert "(3 tar shard(s)), 27 train / 11 val images" in err.out
    assert "warning: unreadable image train-000000.tar:sample00005.jpg replaced by another image" in err.err
    assert "warning: unreadable image val-000099.tar:orphan.jpg left out of the evaluation (no .cls member)" in err.err
    assert summary["steps"] == 6 and summary["metrics"]["images"] == 9
    assert summary["bad_samples"]["train"]["per_epoch"] == {0: 1, 1: 1}
    assert set(summary["bad_samples"]["val"]["files"]) == {"val-000099.tar:orphan.jpg", "val-000099.tar:lonely"}

    # Resume from shards is exact too, with loader workers: stopped mid-epoch 1, resumed, the same losses.
    cut = _data_args(tmp_path / "cut", data)
    cut[cut.index("--workers") + 1] = "2"
    assert run_train(cut + ["--max-steps", "4"])["steps"] == 4
    assert run_train(cut + ["--resume", str(tmp_path / "cut")])["steps"] == 6
    assert read_csv(tmp_path / "cut" / "steps.csv", STEP_COLUMNS) == read_csv(out / "steps.csv", STEP_COLUMNS)
    capsys.readouterr()

    threads = torch.get_num_threads()
    try:
        result = eval_script.run(
            ["--checkpoint", str(out), "--data-dir", str(data), "--workers", "0", "--device", "cpu"]
            + ["--threads", "1", "--batch-size", "4", "--bench-steps", "0"]
        )
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "(4 tar shard(s) val-*.tar): 11 images" in text
    assert "2 unreadable image(s) left out: val-000099.tar:lonely (no image member" in text
    assert result["images"] == 9 and result["top1"] == pytest.approx(summary["metrics"]["top1"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["metrics"]["loss"], rel=1e-5)

    with pytest.raises(SystemExit) as e:
        train_script.main(["--data-dir", str(data), "--verify-data", "--workers", "2"])
    assert e.value.code == train_script.BAD_SAMPLES_EXIT_CODE
    out_text = capsys.readouterr().out
    assert "train: 27 images (3 tar shard(s)), 1 unreadable" in out_text
    assert "val: 11 images (4 tar shard(s)), 2 unreadable" in out_text


def _target_only(img):
    return torch.zeros(1)


def test_ranks_and_workers_cover_each_shard_sample_exactly_once(tmp_path):
    # One class per sample, so the targets name the samples.
    n = 24
    shapes = _shapes(n)
    for s in range(0, n, 5):
        with tarfile.open(tmp_path / f"train-{s // 5:03d}.tar", "w") as tar:
            for i in range(s, min(n, s + 5)):
                _add(tar, f"k{i}.jpg", _jpeg_bytes(shapes[i][0]))
                _add(tar, f"k{i}.cls", str(i).encode())
    ds = TarShardDataset(shard_files(str(tmp_path), "train"))
    assert ds.targets == list(range(n))
    ds.max_open = 2  # 5 shards: files are closed and reopened as the reads move between them
    for world, workers in ((1, 0), (2, 2), (3, 0), (3, 2)):
        seen = []
        evaluated = []
        for rank in range(world):
            sampler = ResumableSampler(n, batch_size=4, world_size=world, rank=rank, seed=5)
            sampler.set_epoch(1)
            loader = DataLoader(
                SeededDataset(ds, _target_only),
                batch_size=4,
                sampler=sampler,
                num_workers=workers,
                collate_fn=collate_samples,
            )
            seen += [t for _, y, _ in loader for t in y.tolist()]
            val = DataLoader(
                SeededDataset(ds, _target_only, replace_bad=False),
                batch_size=3,
                sampler=ShardSampler(n, world, rank),
                num_workers=workers,
                collate_fn=collate_samples,
            )
            evaluated += [t for _, y, _ in val for t in y.tolist()]
        assert sorted(seen) == list(range(n)), (world, workers)
        assert len(ds._files) <= 2
        assert sorted(evaluated) == list(range(n)), (world, workers)
    assert verify_dataset(ds, workers=2) == []
    with tarfile.open(tmp_path / "zipped-000.tar", "w:gz") as tar:
        _add(tar, "k0.cls", b"0")
    with pytest.raises(ValueError, match=r"zipped-000\.tar: not a readable uncompressed tar file"):
        TarShardDataset(shard_files(str(tmp_path), "zipped"))


def test_two_processes_merge_their_unreadable_files_and_stop_together(tmp_path):
    # The same global batch (2 x 4 vs 1 x 8): the two processes meet different unreadable files, and
    # the merged counts (and the losses) are the single process's.
    data = tmp_path / "shards"
    data.mkdir()
    _write_shards(data, "train", 24, per_shard=7, bad=(2, 9, 17))
    _write_shards(data, "val", 8, per_shard=8, bad=(3,))
    common = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0"]
    single = run_train(_data_args(tmp_path / "one", data, *common, batch=8))
    procs = {}
    for name, extra in (("two", []), ("stop", ["--max-bad-samples", "1", "--log-interval", "1"])):
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            + [str(EXAMPLES / "train.py"), *_data_args(tmp_path / name, data, *common, *extra, batch=4)],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    (out, err), code = results["two"]
    assert code == 0, err[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["bad_samples"]["train"] == json.loads(json.dumps(single["bad_samples"]["train"]))
    assert two["bad_samples"]["train"]["per_epoch"] == {"0": 3, "1": 3}
    assert two["metrics"]["images"] == single["metrics"]["images"] == 7
    # not anchored at a line start: the other process (or torch's C++ logging) may have written part of
    # a line to the shared stderr just before
    assert re.search(r"\[rank [01]\] warning: unreadable image train-000000\.tar:sample00002\.jpg", err), err
    for (s1, l1), (s2, l2) in zip(
        read_csv(tmp_path / "one" / "steps.csv", ("step", "loss")),
        read_csv(tmp_path / "two" / "steps.csv", ("step", "loss")),
    ):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), rel=1e-4, abs=1e-5)

    (out, err), code = results["stop"]
    assert code != 0 and "exitcode  : 4" in err, err[-3000:]  # torchrun exits 1, naming the rank's status
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unreadable training images, more than --max-bad-samples 1" in errors[0]
    step = int(re.search(r"\(step (\d+)\)", errors[0]).group(1))
    assert load_checkpoint(str(tmp_path / "stop"))["step"] == step
