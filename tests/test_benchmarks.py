"""The benchmark harness on CPU: floors, provider agreement, reports, and an end-to-end smoke run."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest
import torch

from benchmarks import SMOKE_LABEL, floors
from benchmarks.cli import main
from benchmarks.peers import dense_neighbourhood_attention
from benchmarks.providers import CORE_PROVIDERS, CoreShape, Options
from benchmarks.report import COLUMNS, derive, read_rows, summary_markdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = Options(torch.device("cpu"), compile=False)
# plots need matplotlib (the `benchmarks` extra); tables fall back to a plain writer without tabulate
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: threads only contend for a busy CI machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- floors
def test_floors_match_kernel_notes():
    """docs/backward.md, "Floors": batch 32, 64x64, C=128, h=16 (d=8), N=2, bf16: 704 B/pixel, 92 MB, ~31 us at
    3.0 TB/s, 608·k² FLOP/pixel, k=3 -> 11 us, k=7 -> 58 us, k=15 -> 268 us, k=31 -> 1.14 ms at 67 TFLOP/s."""
    assert floors.forward_bytes_per_pixel(2, 16, 128, 2) == 704
    shape = CoreShape(32, 64, 64, 128, 16, 3, torch.bfloat16)
    assert shape.bytes_floor() == 704 * 32 * 64 * 64
    assert round(shape.bytes_floor() / 1e6) == 92
    assert shape.bytes_floor() / 3.0e12 == pytest.approx(31e-6, rel=0.02)
    for k in (3, 7, 15, 31):
        assert floors.forward_flops_per_pixel(k, k, 16, 2, 8) == 608 * k * k
    rate, source = floors.datasheet_fp32_rate("NVIDIA H100 80GB HBM3")
    assert rate == 67e12 and "datasheet" in source
    pixels = 32 * 64 * 64
    for k, as_written in ((3, "11"), (7, "58"), (15, "268")):  # microseconds, as docs/backward.md rounds them
        t = CoreShape(32, 64, 64, 128, 16, k, torch.bfloat16).flops() / rate
        assert f"{t * 1e6:.0f}" == as_written, k
    assert f"{CoreShape(32, 64, 64, 128, 16, 31, torch.bfloat16).flops() / rate * 1e3:.2f}" == "1.14"
    for k in (3, 7, 15, 31):
        assert CoreShape(32, 64, 64, 128, 16, k, torch.bfloat16).flops() == 608 * k * k * pixels


def test_stride_two_bytes_count_output_pixels():
    s = CoreShape(2, 8, 8, 16, 4, 3, torch.bfloat16, stride=2)
    assert s.out_hw == (4, 4)
    assert s.bytes_floor() == 2 * 64 * (2 * 2 * 4 + 2 * 16) + 2 * 16 * (2 * 16 + 4 * 2 * 4)


# ----------------------------------------------------------------------------------- providers
def _outputs(name: str, shape: CoreShape, opts: Options = CPU):
    wl = CORE_PROVIDERS[name](shape, opts)
    inputs = wl.make_inputs()
    with torch.no_grad():
        return wl.forward(*inputs), inputs


@pytest.mark.parametrize("stride", [1, 2])
def test_qna_providers_compute_the_same_function(stride):
    shape = CoreShape(2, 7, 9, 12, 3, 5, torch.float64, stride=stride)
    naive, inputs = _outputs("naive_window", shape)
    for name in ("paper_eager", "qna_triton"):
        out, other = _outputs(name, shape)
        for a, b in zip(inputs, other):  # same seed: same inputs for every provider
            assert torch.equal(a, b)
        assert out.shape == naive.shape == (2, *shape.out_hw, 3, 4)
        assert torch.allclose(out, naive, rtol=1e-9, atol=1e-12), name


def test_flex_nat_is_neighbourhood_attention():
    shape = CoreShape(2, 6, 7, 12, 3, 3, torch.float32)
    out, (q, k, v, bias) = _outputs("flex_nat", shape)
    assert out.shape == (2, 3, 6 * 7, 4)
    ref = dense_neighbourhood_attention(q.double(), k.double(), v.double(), bias.double(), 6, 7, 3, 3)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_swin_depthwise_copy_shapes():
    shape = CoreShape(2, 7, 9, 12, 3, 3, torch.float32)
    out, _ = _outputs("swin_sdpa", shape)
    assert out.shape == (2, 7, 9, 3, 4) and torch.isfinite(out).all()
    out, _ = _outputs("depthwise_conv", shape)
    assert out.shape == (2, 12, 7, 9)
    out, (src, dst) = _outputs("copy", shape)
    assert torch.equal(out, src) and 2 * src.numel() == shape.bytes_floor() - shape.bytes_floor() % 2


def test_peers_reject_stride():
    from benchmarks.runner import Unsupported

    shape = CoreShape(1, 8, 8, 8, 2, 3, torch.float32, stride=2)
    for name in ("flex_nat", "swin_sdpa"):
        with pytest.raises(Unsupported):
            CORE_PROVIDERS[name](shape, CPU)


def test_paper_forward_matches_layer():
    from benchmarks.model_bench import paper_forward
    from qna_triton import QnA

    torch.manual_seed(0)
    layer = QnA(16, 32, 4, kernel_size=3, stride=2).double()
    with torch.no_grad():
        layer.rpe_bias.normal_()
        x = torch.randn(2, 9, 8, 16, dtype=torch.float64)
        assert torch.allclose(paper_forward(layer, x), layer(x), rtol=1e-9, atol=1e-12)


def test_fma_kernel_counts_its_work():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from benchmarks.hw import fma_chain, fma_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.rand(2048, device=device)
    out = fma_chain(x, 0.999, 0.001, 3)
    ref = torch.zeros_like(x)
    for c in range(8):
        y = x + c
        for _ in range(3):
            y = y * 0.999 + 0.001
        ref += y
    assert torch.allclose(out, ref, atol=1e-4)
    assert fma_flops(2048, 3) == 2 * 8 * 2048 * 3


# ----------------------------------------------------------------------------------- reports
def _row(**kw):
    row = {c: None for c in COLUMNS}
    row.update(
        mode="measurement",
        gpu="NVIDIA H100 80GB HBM3",
        torch="t",
        triton="tr",
        date="2026-01-01T00:00:00",
        dtype="bf16",
        status="ok",
        device_mem_mb=80000.0,
    )
    row.update(kw)
    return row


def _window_rows(k, ours_ms, peers_ms, mode="measurement"):
    shape = CoreShape(32, 64, 64, 128, 16, k, torch.bfloat16)
    common = dict(suite="window_bf16_d8", shape=shape.label(), mode=mode, **shape.fields())
    rows = [
        _row(provider="qna_triton", **{"pass": "fwd+bwd"}, p50_ms=ours_ms, peak_mb=150.0, extra_mb=100.0, **common),
        _row(provider="qna_triton", **{"pass": "fwd"}, p50_ms=0.040, **common),
        _row(provider="copy", **{"pass": "fwd"}, p50_ms=0.031, **common),
        _row(provider="naive_window", **{"pass": "fwd+bwd"}, status="OOM", **common),
    ]
    for name, ms in peers_ms.items():
        rows.append(_row(provider=name, **{"pass": "fwd+bwd"}, p50_ms=ms, peak_mb=500.0, extra_mb=450.0, **common))
    return rows


def test_summary_verdicts_follow_the_targets():
    """Synthetic rows (never written anywhere): the PASS/MISS logic and the derived columns."""
    rows = _window_rows(3, 1.0, {"paper_eager": 3.5, "paper_compiled": 1.5})
    derived, meta = derive(rows)
    fwd = next(r for r in derived if r["provider"] == "qna_triton" and r["pass"] == "fwd")
    assert fwd["gb_s"] == pytest.approx(fwd["bytes_floor"] / 0.040e6)
    assert fwd["pct_copy"] == pytest.approx(100 * 0.031 / 0.040)
    assert fwd["flop_floor_ms"] == pytest.approx(fwd["flops"] / 67e12 * 1e3)
    assert "datasheet" in meta["fp32_rate_source"]
    text, verdicts = summary_markdown(derived, meta)
    assert verdicts["eager3"] == [True] and verdicts["compiled2"] == [False]
    assert verdicts["copy75"] == [True]  # 77.5 % of the copy
    assert "PASS" in text and "MISS" in text
    rows7 = _window_rows(7, 1.0, {"paper_eager": 3.5})
    _, v7 = summary_markdown(*derive(rows7))
    assert v7["naive10"] == [True]  # OOM on 80 GB vs 100 MB extra: a bound far above 10x
    assert v7["compiled2"] == [None]  # not measured is never a pass


def test_smoke_rows_never_pass():
    rows = _window_rows(3, 1.0, {"paper_eager": 3.5}, mode=SMOKE_LABEL)
    text, _ = summary_markdown(*derive(rows))
    assert "PASS" not in text and SMOKE_LABEL in text


# ----------------------------------------------------------------------------------- end to end
def test_smoke_refuses_results_folder(tmp_path):
    assert main(["--smoke", "--out", os.path.join(REPO, "benchmarks", "results", "x")]) == 2


def test_smoke_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "smoke")
    rc = main(
        [
            "--smoke",
            "--out",
            out,
            "--no-compile",
            "--windows",
            "3",
            "--suite",
            "window_bf16_d8",
            "--suite",
            "vit_tiny",
            "--suite",
            "layer_d16",
            "--suite",
            "model",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert SMOKE_LABEL.upper() in printed
    files = ["rows.jsonl", "results.csv", "results.json", "results.md", "summary.md"]
    if HAVE_MATPLOTLIB:
        files += ["plots/window_bf16_d8.png", "plots/layer_d16.png"]
    for name in files:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert all(r["mode"] == SMOKE_LABEL for r in rows)
    for col in (
        "gpu",
        "torch",
        "triton",
        "date",
        "suite",
        "shape",
        "dtype",
        "provider",
        "pass",
        "p50_ms",
        "p20_ms",
        "p80_ms",
        "gb_s",
        "pct_copy",
        "peak_mb",
    ):
        assert col in COLUMNS
    ok = {(r["suite"], r["provider"], r["pass"]) for r in rows if r["status"] == "ok"}
    for prov in ("copy", "qna_triton", "paper_eager", "naive_window", "swin_sdpa", "depthwise_conv"):
        assert ("window_bf16_d8", prov, "fwd") in ok, prov
    for prov in ("qna_triton", "paper_eager", "naive_window", "swin_sdpa", "depthwise_conv"):
        assert ("window_bf16_d8", prov, "fwd+bwd") in ok, prov
    assert ("window_bf16_d8", "flex_nat", "fwd") in ok
    assert ("vit_tiny", "qna_triton", "fwd+bwd") in ok
    assert ("layer_d16", "qna_layer", "fwd+bwd") in ok and ("layer_d16", "flex_na_layer", "fwd") in ok
    assert ("model", "qna_triton", "train_step") in ok
    statuses = {(r["suite"], r["provider"]): r["status"] for r in rows}
    assert statuses[("window_bf16_d8", "paper_compiled")].startswith("unsupported")
    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    assert data["meta"]["smoke"] is True and data["columns"] == COLUMNS
    for r in rows:  # timed rows carry their quantiles in order
        if r["status"] == "ok" and r["p50_ms"]:
            assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
    with open(os.path.join(out, "summary.md")) as f:
        summary = f.read()
    assert SMOKE_LABEL in summary and "PASS" not in summary and "MISS" not in summary
    # the reports rebuild from the rows alone, and merging the same rows twice changes nothing
    again = str(tmp_path / "again")
    assert main(["--report-from", out, os.path.join(out, "rows.jsonl"), "--out", again]) == 0
    assert len(read_rows([again])) == len(rows)
    if HAVE_MATPLOTLIB:
        assert os.path.getsize(os.path.join(again, "plots", "window_bf16_d8.png")) > 0


def test_suites_and_groups():
    from benchmarks.suites import CPU_SUITES, SUITES, resolve_suites, window_shapes

    assert resolve_suites([]) == [s for s in SUITES if s not in CPU_SUITES]
    assert resolve_suites(["layer", "window_bf16_d8"]) == ["layer_d16", "layer_d32", "window_bf16_d8"]
    with pytest.raises(ValueError):
        resolve_suites(["nope"])
    shapes = window_shapes("window_fp32_d32", smoke=False)
    assert [s.window for s in shapes] == [3, 5, 7, 9, 11, 13, 15, 21, 31]
    assert {(s.batch, s.height, s.width, s.channels, s.heads, s.head_dim, s.queries, s.dtype) for s in shapes} == {
        (32, 64, 64, 128, 4, 32, 2, torch.float32)
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_measuring_needs_a_gpu(tmp_path):
    assert main(["--out", str(tmp_path)]) == 2
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_compiled_provider_times_every_pass():
    """torch.compile'd peers: the backward is timed after its own forward (a compiled backward with
    donated buffers refuses a retained graph), and nothing falls back or errors."""
    from benchmarks.runner import Deadline, run_workload
    from benchmarks.timing import TimingConfig

    shape = CoreShape(1, 6, 6, 8, 2, 3, torch.float32)
    opts = Options(torch.device("cpu"), compile=True, compile_mode="default")
    results, notes = run_workload(
        lambda: CORE_PROVIDERS["paper_compiled"](shape, opts),
        opts.device,
        TimingConfig(cpu_warmup=1, cpu_reps=2),
        Deadline(None),
    )
    torch._dynamo.reset()
    assert {p: r["status"] for p, r in results.items()} == {"fwd": "ok", "bwd": "ok", "fwd+bwd": "ok"}
    assert any("torch.compile" in n for n in notes)


def _fake_workload(fail_forward=False, oom_backward=False, fallback=None):
    from benchmarks.runner import Workload

    class OomOnBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    def fwd(x):
        if fail_forward:
            raise RuntimeError("backend broke")
        return OomOnBackward.apply(x) if oom_backward else x * 2

    return Workload(lambda: [torch.randn(4, requires_grad=True)], fwd, fallback=fallback)


def test_runner_records_failures_and_falls_back():
    from benchmarks.runner import Deadline, run_workload
    from benchmarks.timing import TimingConfig

    cfg, cpu = TimingConfig(cpu_warmup=0, cpu_reps=1), torch.device("cpu")
    res, _ = run_workload(lambda: _fake_workload(oom_backward=True), cpu, cfg, Deadline(None))
    assert [res[p]["status"] for p in ("fwd", "bwd", "fwd+bwd")] == ["ok", "OOM", "OOM"]
    res, notes = run_workload(
        lambda: _fake_workload(fail_forward=True, fallback=_fake_workload), cpu, cfg, Deadline(None)
    )
    assert all(r["status"] == "ok" for r in res.values()) and "fell back after" in notes[0]
    res, _ = run_workload(lambda: _fake_workload(fail_forward=True), cpu, cfg, Deadline(None))
    assert all(r["status"].startswith("error: RuntimeError: backend broke") for r in res.values())
    res, _ = run_workload(_fake_workload, cpu, cfg, Deadline(-1.0))
    assert all(r["status"].startswith("skipped") for r in res.values())


def test_results_folder_matches_the_library_gpu_key():
    from benchmarks.env import sanitise
    from qna_triton.tuning import sanitize_gpu_name

    assert sanitise("NVIDIA H100 80GB HBM3") == sanitize_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_workload_context_covers_forward_and_backward():
    """A workload's context (``qna_triton_direct``: the direct kernels forced) is active in every run
    of it, the backward included (autograd runs it after the forward has returned)."""
    from benchmarks.providers import qna_triton_direct
    from benchmarks.runner import Deadline, Workload, run_workload
    from benchmarks.timing import TimingConfig
    from qna_triton import tuning

    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", tuning._algo_override()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", tuning._algo_override()))
            return g * 2

    cfg, cpu = TimingConfig(cpu_warmup=0, cpu_reps=1), torch.device("cpu")
    wl = lambda: Workload(
        lambda: [torch.randn(4, requires_grad=True)],
        Record.apply,  # noqa: E731
        context=lambda: tuning.kernel_algorithm("direct"),
    )
    res, _ = run_workload(wl, cpu, cfg, Deadline(None))
    assert all(r["status"] == "ok" for r in res.values())
    assert {kind for kind, _ in seen} == {"fwd", "bwd"} and all(algo == "direct" for _, algo in seen)
    assert tuning._algo_override() == "auto"
    with qna_triton_direct(CoreShape(1, 6, 6, 8, 2, 3, torch.float32), CPU).context():
        assert tuning._algo_override() == "direct"


def test_deploy_suite_is_cpu_only_and_not_default():
    from benchmarks.suites import resolve_suites

    assert "deploy" not in resolve_suites([])
    assert resolve_suites(["deploy"]) == ["deploy"]


def test_deploy_smoke_writes_rows_table_and_plot(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qna_triton import export

    if not export.LEAN_ONNX:  # the harness is the same; only its ONNX export (~1-2 min of CI) differs
        pytest.skip("the deploy suite's runs use torch >= 2.15's exporter (test_onnx covers the older one)")
    out = str(tmp_path / "deploy")
    args = ["--smoke", "--out", out, "--suite", "deploy", "--engines", "eager", "onnxruntime"]
    rc = main(args + ["--batches", "1", "--rounds", "1", "--min-time", "0.01"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert SMOKE_LABEL.upper() in printed
    rows = [r for r in read_rows([out]) if r["suite"] == "deploy"]
    measured = {(r["shape"].split()[0], r["provider"]) for r in rows if r["status"] == "ok"}
    for model in ("qna_vit_tiny", "swin_tiny", "convnext_tiny"):
        for engine in ("eager", "onnxruntime"):
            assert (model, engine) in measured, (model, engine)
    ours = next(r for r in rows if r["shape"].startswith("qna_vit_tiny") and r["provider"] == "onnxruntime")
    assert ours["images_s"] > 0 and ours["batch"] == 1 and "nodes in the main graph" in ours["note"]
    host = {r["shape"] for r in rows if r["provider"] == "host_overhead" and r["status"] == "ok"}
    assert {"qna_attention forward", "trivial torch.library op"} <= host
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## Deploy" in summary and "vs ConvNeXt-T" in summary
    assert "qna_vit_tiny on onnxruntime (CPU) >= 1.3x" in summary  # the target is listed, smoke verdict
    files = ["rows.jsonl", "results.csv", "results.md"] + (["plots/deploy.png"] if HAVE_MATPLOTLIB else [])
    for name in files:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
