"""Run-time config look-up (qna_triton.tuning): file schema, nearest-entry rule, fallbacks and their
warnings, environment variables, caching, and that a tuned config reaches the kernels without
changing results (through the Triton interpreter on CPU)."""

import contextlib
import json
import math
import re
import warnings

import pytest
import torch

import qna_triton.kernels.launch as kernels
from qna_triton import tuning
from qna_triton.kernels import qna_backward, qna_forward
from qna_triton.tuning import EntryKey, KernelConfig, heuristic_config, lookup_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GPU = "Test GPU 80GB"


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """Each test starts with no caches, no warnings issued, and an empty shipped folder."""
    monkeypatch.delenv(tuning.CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv(tuning.DISABLE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # not the real user's tuned configs
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tuning.lookup, "SHIPPED_CONFIG_DIR", shipped)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


def key(kernel="fwd", dtype="bfloat16", k=3, s=1, heads=16, head_dim=8, nq=2, bucket=4**8) -> str:
    return EntryKey(kernel, dtype, k, k, s, s, heads, head_dim, nq, bucket).to_str()


def cfg(bp, bh, w=4, st=1) -> dict:
    return {"block_p": bp, "block_h": bh, "num_warps": w, "num_stages": st}


def write(folder, entries, gpu=GPU, **extra):
    path = folder / tuning.config_file_name(gpu)
    tuning.write_config_file(path, {"gpu_name": gpu, **extra}, {k: {"config": v} for k, v in entries.items()})
    return path


def lookup(kernel="fwd", dtype="bfloat16", heads=16, head_dim=8, nq=2, k=3, s=1, pixels=4**8, dirs=None):
    return lookup_config(kernel, GPU, dtype, heads, head_dim, nq, (k, k), (s, s), pixels, dirs)


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------ basics
def test_heuristic_is_valid_for_every_kernel():
    for kernel in tuning.KERNELS:
        for heads, hd in ((1, 1), (16, 8), (64, 8), (4, 32), (1, 128), (3, 12)):
            c = heuristic_config(kernel, heads, hd)
            assert tuning.validate_config(c.as_dict()) == c
            assert c.block_h <= max(1, 2 ** math.ceil(math.log2(heads)))
    with pytest.raises(ValueError, match="kernel"):
        heuristic_config("nope", 4, 4)


@pytest.mark.parametrize(
    "pixels, bucket",
    [(0, 1), (1, 1), (3, 1), (4, 4), (15, 4), (16, 16), (4**8 - 1, 4**7), (4**8, 4**8), (2 * 4**10, 4**10)],
)
def test_size_bucket(pixels, bucket):
    assert tuning.size_bucket(pixels) == bucket


def test_sanitize_gpu_name():
    assert tuning.sanitize_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert tuning.sanitize_gpu_name(" NVIDIA  A100-SXM4-40GB ") == "nvidia_a100_sxm4_40gb"
    assert tuning.config_file_name("../../etc/passwd") == "etc_passwd.json"


def test_entry_key_round_trip_and_rejects():
    k = EntryKey("bwd_delta", "float16", 5, 7, 2, 1, 12, 16, 4, 4**9)
    assert EntryKey.from_str(k.to_str()) == k
    for bad in (
        "",
        "kernel=fwd",
        k.to_str().replace("bucket=262144", "bucket=1000"),
        k.to_str().replace("bwd_delta", "fwd2"),
        k.to_str().replace("float16", "float64"),
        k.to_str().replace("heads=12", "heads=0"),
    ):
        with pytest.raises(ValueError):
            EntryKey.from_str(bad)


# ------------------------------------------------------------------------------------ schema
def test_write_and_read_back(tmp_path):
    entries = {
        key(): {"config": cfg(32, 8, 8, 2), "time_ms": 0.5, "heuristic_time_ms": 0.6},
        key("bwd", "float32", 7, 2): {"config": cfg(16, 4)},
    }
    path = tmp_path / "x.json"
    tuning.write_config_file(
        path, {"gpu_name": GPU, "torch_version": "t"}, entries, {key("bwd_delta"): {"reason": "r"}}
    )
    data = json.loads(path.read_text())
    assert data["schema_version"] == tuning.SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "metadata", "entries", "skipped"}
    table = tuning.read_config_file(path)
    assert table.metadata["gpu_name"] == GPU
    assert table.entries == {
        EntryKey.from_str(key()): KernelConfig(32, 8, 8, 2),
        EntryKey.from_str(key("bwd", "float32", 7, 2)): KernelConfig(16, 4, 4, 1),
    }
    assert table.raw_entries[key()]["time_ms"] == 0.5
    assert table.skipped == {key("bwd_delta"): {"reason": "r"}}
    assert not table.invalid


def test_writer_refuses_invalid_entries(tmp_path):
    with pytest.raises(ValueError):
        tuning.write_config_file(tmp_path / "x.json", {}, {key(): {"config": cfg(48, 8)}})
    with pytest.raises(ValueError):
        tuning.write_config_file(tmp_path / "x.json", {}, {"fwd": {"config": cfg(32, 8)}})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "bad",
    [
        cfg(48, 8),
        cfg(0, 8),
        cfg(-16, 8),
        cfg(32, 3),
        cfg(32, 8, 3),
        cfg(32, 8, 4, 0),
        cfg(True, 8),
        cfg("32", 8),
        cfg(32.0, 8),
        {"block_p": 32, "block_h": 8},
        [32, 8, 4, 1],
        cfg(8192, 1024),
    ],
)
def test_validate_config_rejects(bad):
    with pytest.raises(ValueError):
        tuning.validate_config(bad)


# ------------------------------------------------------------------------------------ matching
def test_nearest_bucket(tmp_path):
    write(tmp_path, {key(bucket=4**6): cfg(16, 16), key(bucket=4**8): cfg(32, 8), key(bucket=4**10): cfg(64, 4)})
    d = [str(tmp_path)]
    assert lookup(pixels=4**8 + 5, dirs=d)[0].block_p == 32  # exact bucket
    assert lookup(pixels=4**9, dirs=d)[1].bucket in (4**8, 4**10)  # tie, deterministic
    assert lookup(pixels=4**9, dirs=d)[0] == lookup(pixels=4**9 + 1, dirs=d)[0]
    assert lookup(pixels=10, dirs=d)[0].block_p == 16  # below every bucket: the smallest
    assert lookup(pixels=4**13, dirs=d)[0].block_p == 64  # above: the largest
    assert lookup(pixels=4**11 - 1, dirs=d)[1].bucket == 4**10


def test_nearest_window_head_dim_dtype_and_limits(tmp_path):
    write(
        tmp_path,
        {
            key(k=3): cfg(32, 8),
            key(k=9): cfg(64, 8),
            key(s=2): cfg(8, 16),
            key(head_dim=32, heads=4): cfg(16, 4),
            key(dtype="float16", k=5): cfg(128, 2),
        },
    )
    d = [str(tmp_path)]
    assert lookup(k=5, dirs=d)[1].kh == 3  # nearest window
    assert lookup(k=8, dirs=d)[1].kh == 9
    assert lookup(k=3, s=2, dirs=d)[0] == KernelConfig(8, 16)  # stride matched before window
    assert lookup(k=7, s=2, dirs=d)[1].sh == 2
    assert lookup(heads=4, head_dim=32, dirs=d)[1].head_dim == 32
    assert lookup(heads=4, head_dim=64, dirs=d)[1].head_dim == 32  # nearest head_dim
    assert lookup(dtype="float16", k=5, dirs=d)[0] == KernelConfig(128, 2)  # exact dtype preferred
    assert lookup(dtype="float16", k=3, dirs=d)[0] == KernelConfig(128, 2)  # same dtype beats nearer window
    assert lookup(dtype="bfloat16", k=5, dirs=d)[1].dtype == "bfloat16"
    # float32 never borrows 16-bit entries; nor does a head_dim 8x away; other kernels have none
    assert lookup(dtype="float32", dirs=d) == (heuristic_config("fwd", 16, 8), None)
    assert lookup(heads=16, head_dim=256, dirs=d)[1] is None
    assert lookup("bwd", dirs=d) == (heuristic_config("bwd", 16, 8), None)


def test_borrowed_entry_is_capped_to_the_problem(tmp_path):
    write(tmp_path, {key(heads=16, head_dim=8): cfg(64, 16, 8, 2)})
    d = [str(tmp_path)]
    # fewer heads: block_h capped at next_pow2(heads)
    assert lookup(heads=4, dirs=d)[0] == KernelConfig(64, 4, 8, 2)
    # a larger head_dim: the tile shrinks to the footprint that was measured
    c = lookup(heads=16, head_dim=32, dirs=d)[0]
    measured = tuning.tile_footprint(KernelConfig(64, 16), 2, 8)
    assert tuning.tile_footprint(c, 2, 32) <= measured and (c.num_warps, c.num_stages) == (8, 2)
    assert c.block_p < 64


# ---------------------------------------------------------------------------- fallbacks, env
def test_no_file_falls_back_and_warns_once(tmp_path):
    d = [str(tmp_path / "empty")]
    with pytest.warns(RuntimeWarning, match="no tuned kernel configs for GPU 'Test GPU 80GB'") as rec:
        assert lookup(dirs=d) == (heuristic_config("fwd", 16, 8), None)
        assert lookup("bwd", heads=4, dirs=d)[1] is None
        assert lookup("bwd_delta", pixels=17, dirs=[str(tmp_path / "other")])[1] is None
    assert len([w for w in rec if "no tuned" in str(w.message)]) == 1
    assert "python -m qna_triton.autotune" in str(rec[0].message)


def test_env_config_dir_is_searched_before_the_shipped_folder(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    write(tuning.lookup.SHIPPED_CONFIG_DIR, {key(): cfg(16, 16)})
    with no_warnings():
        assert lookup()[0] == KernelConfig(16, 16)
    write(user, {key(): cfg(64, 4)})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(user))
    assert tuning.config_dirs() == (str(user), str(tuning.lookup.SHIPPED_CONFIG_DIR))
    with no_warnings():
        assert lookup()[0] == KernelConfig(64, 4)
    # a user folder without this GPU's file: the shipped one, silently
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path / "nothing_here"))
    with no_warnings():
        assert lookup()[0] == KernelConfig(16, 16)


def test_disable_env(tmp_path, monkeypatch):
    write(tmp_path, {key(): cfg(64, 4)})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    assert lookup()[0] == KernelConfig(64, 4)
    monkeypatch.setenv(tuning.DISABLE_ENV, "1")
    with no_warnings():
        assert lookup() == (heuristic_config("fwd", 16, 8), None)
        assert lookup(dirs=[str(tmp_path / "missing")])[1] is None  # and no "no file" warning
    monkeypatch.setenv(tuning.DISABLE_ENV, "0")
    assert lookup()[0] == KernelConfig(64, 4)


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"schema_version": 1, "metadata": {"gpu_name": "x"}, "entries": {"kernel=fwd', "not valid JSON"),
        ("", "not valid JSON"),
        ("\x00\xff\xfe garbage", "not valid JSON|cannot be read"),
        ("[1, 2]", "JSON object"),
        ('{"schema_version": 2, "metadata": {}, "entries": {}}', "schema_version 2"),
        ('{"metadata": {}, "entries": {}}', "schema_version None"),
        ('{"schema_version": 1, "metadata": {}, "entries": []}', "'entries'"),
        ('{"schema_version": 1, "entries": {}}', "'metadata'"),
    ],
)
def test_corrupted_file_warns_and_falls_back(tmp_path, monkeypatch, content, reason):
    user = tmp_path / "user"
    user.mkdir()
    path = user / tuning.config_file_name(GPU)
    path.write_bytes(content.encode("utf-8", "surrogateescape") if "\x00" not in content else content.encode("latin-1"))
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(user))
    with pytest.warns(RuntimeWarning, match=reason) as rec:
        assert lookup() == (heuristic_config("fwd", 16, 8), None)
    assert any(str(path) in str(w.message) for w in rec)
    # with a valid shipped file behind it, that one is used
    write(tuning.lookup.SHIPPED_CONFIG_DIR, {key(): cfg(16, 16)})
    tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))):
        assert lookup()[0] == KernelConfig(16, 16)


def test_invalid_entries_are_dropped_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / tuning.config_file_name(GPU)
    entries = {
        key(k=3): {"config": cfg(32, 8)},
        key(k=5): {"config": cfg(48, 8)},  # not a power of two
        key(k=7): {"config": cfg(0, 8)},
        key(k=9): {"config": cfg(32, 8, 4, -1)},
        key(k=11): "not an object",
        "kernel=fwd;garbage": {"config": cfg(32, 8)},
    }
    path.write_text(json.dumps({"schema_version": 1, "metadata": {"gpu_name": GPU}, "entries": entries}))
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="5 invalid entries") as rec:
        assert lookup(k=5)[0] == KernelConfig(32, 8)  # the nearest valid entry
    assert str(path) in str(rec[0].message)
    with no_warnings():
        assert lookup(k=9)[0] == KernelConfig(32, 8)  # warned once per file


def test_lookup_is_cached(tmp_path, monkeypatch):
    write(tmp_path, {key(): cfg(64, 4)})
    reads = []
    real = tuning.read_config_file
    monkeypatch.setattr(tuning.lookup, "read_config_file", lambda p: reads.append(p) or real(p))
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    for _ in range(100):
        assert lookup(pixels=4**8 + 7)[0] == KernelConfig(64, 4)
        assert lookup("bwd", pixels=4**9)[1] is None
    assert len(reads) == 1
    info = tuning._lookup_cached.cache_info()
    assert info.misses == 2 and info.hits == 198


# -------------------------------------------------------------------------------- get_config
class FakeCudaTensor:
    """What get_config reads of a tensor: shape, dtype, device."""

    def __init__(self, shape, dtype=torch.bfloat16, index=0):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda", index)


def test_get_config_cpu_tensors_use_the_heuristic_silently(tmp_path, monkeypatch):
    write(tmp_path, {key(): cfg(64, 4)})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    logits, values = torch.zeros(2, 56, 56, 2, 16), torch.zeros(2, 56, 56, 16, 8)
    with no_warnings():
        for kernel in tuning.KERNELS:
            assert tuning.get_config(kernel, logits, values, (3, 3), (1, 1)) == heuristic_config(kernel, 16, 8)


def test_get_config_cuda_path_uses_output_pixels(tmp_path, monkeypatch):
    write(tmp_path, {key(bucket=4**6): cfg(16, 16), key(bucket=4**8): cfg(64, 4)})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuning.selection, "_gpu_name", lambda index: GPU)
    values = FakeCudaTensor((42, 56, 56, 16, 8))
    # 42 x 56 x 56 output pixels (padding 1) = 131712: bucket 4^8
    assert tuning.get_config("fwd", FakeCudaTensor((42, 56, 56, 2, 16)), values, (3, 3), (1, 1)) == KernelConfig(64, 4)
    got = tuning.get_config("fwd", FakeCudaTensor((3, 56, 56, 2, 16)), values, (3, 3), (1, 1))
    assert got == KernelConfig(16, 16)  # 9408 pixels: bucket 4^6
    # an explicit padding of 0 on a global window: one output pixel per image
    one = tuning.get_config("fwd", FakeCudaTensor((42, 7, 7, 2, 16)), values, (7, 7), (1, 1), (0, 0))
    assert one == KernelConfig(16, 16)
    # dtypes without tuned entries and disabled tuning: the heuristic
    assert tuning.get_config(
        "fwd", FakeCudaTensor((42, 56, 56, 2, 16), torch.float32), values, (3, 3), (1, 1)
    ) == heuristic_config("fwd", 16, 8)
    monkeypatch.setenv(tuning.DISABLE_ENV, "1")
    assert tuning.get_config("fwd", FakeCudaTensor((42, 56, 56, 2, 16)), values, (3, 3), (1, 1)) == heuristic_config(
        "fwd", 16, 8
    )


# --------------------------------------------------------------- through the launchers (interpreter)
class Spy:
    """Stands in for a jitted kernel in qna_triton.kernels; records each launch's block sizes."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.arg_names = kernel, [], kernel.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kw):
            named = dict(zip(self.arg_names, args), **kw)  # the parameters come in order, options by name
            self.launches.append(
                KernelConfig(named["BLOCK_P"], named["BLOCK_H"], named["num_warps"], named["num_stages"])
            )
            return self.kernel[grid](*args, **kw)

        return launch


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, W, N, h, d, K = 1, 4, 5, 2, 3, 4, 4
    qv = torch.randn(B, H, W, N * h + h * d, generator=g)
    logits, values = qv[..., : N * h].unflatten(-1, (N, h)), qv[..., N * h :].unflatten(-1, (h, d))
    rpb, scale = 0.5 * torch.randn(K, N, h, generator=g), torch.randn(K, N, h, generator=g)
    return logits, values, rpb, scale, ((2, 2), (1, 1), (0, 0))  # a 2x2 window keeps the interpreter quick


def test_tuned_config_reaches_the_launcher_and_results_do_not_change(tmp_path, monkeypatch):
    """A tuned file for the (pretend) current GPU: qna_forward / qna_backward launch its configs,
    and give the same results as the heuristic configs."""
    if torch.cuda.is_available():
        pytest.skip("exercises the CPU interpreter path")
    # tiles that split the 12 pixels or the 3 heads across programs, unlike the heuristic ones
    tuned = {"fwd": cfg(8, 4, 2, 1), "bwd_delta": cfg(16, 2, 1, 2), "bwd": cfg(8, 4, 8, 1)}
    # output pixels = 1 x 3 x 4 = 12: bucket 4
    write(tmp_path, {key(kn, "float32", 2, 1, 3, 4, 2, 4): c for kn, c in tuned.items()})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuning.selection, "_TUNED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(tuning.selection, "_gpu_name", lambda index: GPU)
    spies = {name: Spy(getattr(kernels, name)) for name in ("qna_fwd_kernel", "qna_bwd_delta_kernel", "qna_bwd_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(kernels, name, spy)
    logits, values, rpb, scale, geom = _inputs()
    out, lse = qna_forward(logits, values, rpb, scale, *geom)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = qna_backward(g, logits, values, rpb, scale, lse, *geom)
    assert spies["qna_fwd_kernel"].launches == [tuning.validate_config(tuned["fwd"])]
    assert spies["qna_bwd_delta_kernel"].launches == [tuning.validate_config(tuned["bwd_delta"])]
    assert spies["qna_bwd_kernel"].launches == [tuning.validate_config(tuned["bwd"])]

    heur = {k: heuristic_config(k, 3, 4) for k in tuning.KERNELS}
    assert all(heur[k] != tuning.validate_config(tuned[k]) for k in heur)
    ref_out, ref_lse = qna_forward(logits, values, rpb, scale, *geom, config=heur["fwd"])
    ref_grads = qna_backward(
        g, logits, values, rpb, scale, ref_lse, *geom, config=heur["bwd"], delta_config=heur["bwd_delta"]
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_cached_launch_follows_the_tuned_files(tmp_path, monkeypatch):
    """Launches are described once per key; the tuned files they were chosen from are part of it: a file
    rewritten in this process is used after ``tuning.clear_cache()`` (as the autotuner calls), and
    another config folder (``QNA_TRITON_CONFIG_DIR``) at the next call."""
    if torch.cuda.is_available():
        pytest.skip("exercises the CPU interpreter path")
    monkeypatch.setattr(tuning.selection, "_TUNED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(tuning.selection, "_gpu_name", lambda index: GPU)
    spy = Spy(kernels.qna_fwd_kernel)
    monkeypatch.setattr(kernels, "qna_fwd_kernel", spy)
    logits, values, rpb, scale, geom = _inputs()
    first, other = tmp_path / "first", tmp_path / "other"
    for folder, c in ((first, cfg(8, 4, 2, 1)), (other, cfg(4, 1, 1, 1))):
        folder.mkdir()
        write(folder, {key("fwd", "float32", 2, 1, 3, 4, 2, 4): c})
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(first))
    out, _ = qna_forward(logits, values, rpb, scale, *geom)
    qna_forward(logits, values, rpb, scale, *geom)
    assert spy.launches == [KernelConfig(8, 4, 2, 1)] * 2

    (first / tuning.config_file_name(GPU)).unlink()  # the file rewritten: read again after clear_cache()
    write(first, {key("fwd", "float32", 2, 1, 3, 4, 2, 4): cfg(16, 2, 1, 1)})
    tuning.clear_cache()
    again, _ = qna_forward(logits, values, rpb, scale, *geom)
    assert spy.launches[-1] == KernelConfig(16, 2, 1, 1)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(other))
    qna_forward(logits, values, rpb, scale, *geom)
    assert spy.launches[-1] == KernelConfig(4, 1, 1, 1)
    torch.testing.assert_close(again, out, rtol=1e-6, atol=1e-6)  # tiles change speed, not results


@pytest.mark.gpu
def test_tuned_file_for_this_gpu_is_used_on_cuda(tmp_path, monkeypatch):
    name = torch.cuda.get_device_name()
    logits, values, rpb, scale, geom = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs())
    tuned = KernelConfig(8, 2, 2, 1)
    write(tmp_path, {key("fwd", "float32", 2, 1, 3, 4, 2, 4): tuned.as_dict()}, gpu=name)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    assert tuning.get_config("fwd", logits, values, (2, 2), (1, 1)) == tuned
    with pytest.warns(RuntimeWarning, match="no tuned kernel configs"):
        monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path / "none"))
        tuning.clear_cache()
        assert tuning.get_config("fwd", logits, values, (2, 2), (1, 1)) == heuristic_config("fwd", 3, 4)
    out, lse = qna_forward(logits, values, rpb, scale, *geom, config=tuned)
    ref_out, ref_lse = qna_forward(logits, values, rpb, scale, *geom, config=heuristic_config("fwd", 3, 4))
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
