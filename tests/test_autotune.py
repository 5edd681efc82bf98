"""``python -m autotune`` without a GPU: the plan builder, candidate pruning, the estimate, the dry run,
the tuning loop end to end with an injected fake bench (selection, failures, resume, report), model
shape collection, and the real bench's launch capture through the Triton interpreter."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import triton

from qna_triton import QnA, tuning
from qna_triton.autotune import cli, report, tuner
from qna_triton.autotune import plan as plan_mod
from qna_triton.autotune.bench import Session, _compare
from qna_triton.autotune.model_shapes import collect_qna_shapes, shapes_of_model
from qna_triton.autotune.plan import Shape
from qna_triton.tuning import EntryKey, KernelConfig, heuristic_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
FAKE_GPU = "Fake GPU 1"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(tuning.CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv(tuning.DISABLE_ENV, raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


# ---------------------------------------------------------------------------------- plan
def test_default_plan_covers_every_axis():
    plan = plan_mod.default_plan()
    shapes = plan.shapes
    s1 = {s.kh for s in shapes if s.sh == 1 and s.dtype == "bfloat16" and s.heads == 16}
    s2 = {s.kh for s in shapes if s.sh == 2 and s.dtype == "bfloat16" and s.heads == 16}
    assert s1 == set(range(1, 32, 2)) | {2, 4, 8}
    assert s2 == s1 - {1}
    assert {s.dtype for s in shapes} == {"bfloat16", "float16", "float32"}
    assert {(s.heads, s.head_dim, s.n_queries) for s in shapes} == set(plan_mod.HEAD_CONFIGS) | {plan_mod.BASE_HEADS}
    assert {s.bucket for s in shapes} == set(plan_mod.BUCKETS)
    assert plan.kernels == tuning.KERNELS
    keys = [s.key(k) for s, k in plan.entries()]
    assert len(keys) == len(set(keys)) == 3 * len(shapes)
    for s in shapes:
        assert s.out_hw[0] in plan_mod.MAP_SIDES and s.out_hw[0] == s.out_hw[1]
        assert 2 * s.bucket * s.kh * s.kw <= plan_mod.WORK_CAP
        assert (s.ph, s.pw) == ((s.kh - 1) // 2, (s.kw - 1) // 2)
    # large windows only on small maps, small windows on every size
    assert {s.bucket for s in shapes if s.kh == 31} == {4**6}
    assert {s.bucket for s in shapes if s.kh == 3 and s.sh == 1 and s.dtype == "bfloat16"} == set(plan_mod.BUCKETS)


@pytest.mark.parametrize("bucket", [4**3, 4**5, 4**6, 4**8, 4**10, 4**11])
@pytest.mark.parametrize("k, s", [(1, 1), (2, 1), (3, 2), (8, 2), (31, 1)])
def test_representative_shape_lands_in_its_bucket(bucket, k, s):
    shape = plan_mod.representative_shape(bucket, "float16", 4, 8, 2, k, s)
    assert shape.bucket == bucket
    assert shape.out_hw[0] in plan_mod.MAP_SIDES
    assert k <= shape.height + 2 * shape.ph


def test_quick_and_default_plans_fit_their_time_budgets():
    quick, default = plan_mod.quick_plan(), plan_mod.default_plan()
    assert plan_mod.estimate(quick).seconds < 120
    # (16 minutes: the estimate counts a compile per specialisation class of every argument the launch
    # description hands the kernels, the pixel strides divided by their alignment included)
    assert plan_mod.estimate(default).seconds < 16 * 60
    assert len(quick.entries()) < len(default.entries())
    # finished entries cost nothing
    done = {s.key(k).to_str() for s, k in quick.entries()}
    assert plan_mod.estimate(quick, done).entries == 0


@pytest.mark.parametrize("kernel", tuning.KERNELS)
@pytest.mark.parametrize("heads, head_dim, nq", [(16, 8, 2), (64, 8, 2), (3, 12, 1), (2, 64, 4), (1, 128, 8)])
def test_candidates_are_pruned_and_start_with_the_heuristic(kernel, heads, head_dim, nq):
    space = plan_mod.candidate_space(kernel, heads, head_dim, nq)
    heur = heuristic_config(kernel, heads, head_dim)
    assert heur in space and len(space) == len(set(space))
    for c in space:
        if c == heur:
            continue
        assert c.block_h <= triton.next_power_of_2(heads)
        assert plan_mod.elems_per_thread(c, nq, head_dim) <= plan_mod.MAX_ELEMS_PER_THREAD[kernel]
        assert c.block_p * c.block_h * triton.next_power_of_2(head_dim) >= 32 * c.num_warps
        tuning.validate_config(c.as_dict())
    cands = plan_mod.candidate_configs(kernel, heads, head_dim, nq, 8)
    assert cands[0] == heur and len(cands) == min(8, len(space)) and len(set(cands)) == len(cands)
    assert set(cands) <= set(space)


def test_dry_run_subprocess_prints_the_plan():
    env = {k: v for k, v in os.environ.items() if k not in (tuning.CONFIG_DIR_ENV,)}
    proc = subprocess.run(
        [sys.executable, "-m", "autotune", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    n = len(plan_mod.default_plan().entries())
    assert f"= {n} entries" in out
    assert "window sweep" in out and "dtype sweep" in out and "heads sweep" in out
    assert " 31x31 " in out and "float32" in out
    assert "candidates fwd" in out and "estimate:" in out and "min" in out
    assert "nothing was run" in out


def test_dry_run_options(capsys, tmp_path):
    assert cli.main(["--dry-run", "--quick", "--out-dir", str(tmp_path), "--gpu-name", "NVIDIA H100 80GB HBM3"]) == 0
    out = capsys.readouterr().out
    assert "plan 'quick'" in out and str(tmp_path / "nvidia_h100_80gb_hbm3.json") in out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    assert (
        cli.main(
            [
                "--dry-run",
                "--windows",
                "5,9",
                "--strides",
                "2",
                "--buckets",
                "4^6",
                "--dtypes",
                "float16",
                "--kernels",
                "bwd",
                "--candidates",
                "3",
                "--head-configs",
                "8x16x2,4x32x1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # windows 5 and 9 for the base, the heads sweep at window 5
    assert "3 shapes x 1 kernels" in out and "up to 3 candidates" in out
    assert "candidates bwd       heads   4 head_dim  32 queries 1" in out
    with pytest.raises(SystemExit):
        cli.main(["--dry-run", "--dtypes", "float64"])
    with pytest.raises(SystemExit):
        cli.main(["--gpu-name", "x"])


# ------------------------------------------------------------------------------ fake bench
def fake_time(kernel, cfg):
    """A deterministic 'GPU': bigger tiles and more warps help, up to a point."""
    t = 1.0 + 0.2 * abs(math.log2(cfg.block_p / 16)) + 0.1 * abs(math.log2(cfg.num_warps / 8))
    return t * (1.3 if kernel == "bwd" else 1.0) * (0.95 if cfg.num_stages == 2 else 1.0)


class FakeSession:
    def __init__(self, bench, shape):
        self.bench, self.shape = bench, shape

    def check(self, kernel, cfg):
        self.bench.log.append(("check", self.shape.key(kernel).to_str(), cfg))
        if cfg.num_stages == 2:  # pretend the two-stage variant computes something else
            return "out: relative error 0.5 > 0.016"
        return None

    def time(self, kernel, cfg):
        key = self.shape.key(kernel).to_str()
        self.bench.log.append(("time", key, cfg))
        if self.bench.interrupt_at == (key, len([e for e in self.bench.log if e[0] == "time" and e[1] == key])):
            raise KeyboardInterrupt
        if cfg.block_p == 4:
            raise RuntimeError("out of resources: shared memory, Required: 300000, Hardware limit: 232448")
        t = fake_time(kernel, cfg)
        return t, 0.99 * t, 1.01 * t


class FakeBench:
    def __init__(self, interrupt_at=None, fail_open=()):
        self.log, self.opened, self.interrupt_at, self.fail_open = [], [], interrupt_at, set(fail_open)

    def device_info(self):
        return {"gpu_name": FAKE_GPU, "compute_capability": "0.0"}

    def open(self, shape):
        self.opened.append(shape)
        if shape in self.fail_open:
            raise MemoryError("needs ~99.0 GiB, 1.0 GiB free")
        return FakeSession(self, shape)

    def release(self, session):
        pass

    def timed_keys(self):
        return {e[1] for e in self.log if e[0] == "time"}


def _store(path):
    return tuner.ResultStore(path, {"gpu_name": FAKE_GPU, "torch_version": torch.__version__})


def test_tuning_loop_picks_the_fastest_valid_candidate(tmp_path):
    plan = plan_mod.quick_plan()
    bench = FakeBench()
    summary = tuner.run_plan(plan, bench, _store(tmp_path / "r.json"), use_tqdm=False, log=lambda m: None)
    assert summary.complete and not summary.stopped_early and len(summary.tuned) == len(plan.entries())
    table = tuning.read_config_file(tmp_path / "r.json")
    assert not table.invalid and table.metadata["complete"] is True
    assert len(table.entries) == len(plan.entries())
    for shape, kernel in plan.entries():
        text = shape.key(kernel).to_str()
        entry = table.raw_entries[text]
        cands = plan.candidates(shape, kernel)
        ok = [c for c in cands if c.num_stages == 1 and c.block_p != 4]
        best = min(ok, key=lambda c: fake_time(kernel, c))
        heur = plan_mod.default_config(kernel, shape)
        assert cands[0] == heur
        if fake_time(kernel, best) > 0.98 * fake_time(kernel, heur):
            best = heur
        assert table.entries[EntryKey.from_str(text)] == best
        assert entry["heuristic"] == heur.as_dict()
        assert entry["speedup"] == pytest.approx(fake_time(kernel, heur) / fake_time(kernel, best))
        failed = entry["failed"]
        assert all("relative error" in failed[tuner.config_label(c)] for c in cands if c.num_stages == 2)
        assert all("out of resources" in failed[tuner.config_label(c)] for c in cands if c.block_p == 4)
        assert entry["timed"] == len(ok) and entry["problem"]["plan"] == "quick"
    # candidates that failed the check are never timed
    assert not [e for e in bench.log if e[0] == "time" and e[2].num_stages == 2]


def test_resume_continues_where_an_interrupted_run_stopped(tmp_path):
    plan = plan_mod.quick_plan()
    entries = plan.entries()
    path = tmp_path / "r.json"
    # interrupted while timing the 3rd candidate of the 5th entry
    stop = entries[4][0].key(entries[4][1]).to_str()
    first = FakeBench(interrupt_at=(stop, 3))
    s1 = tuner.run_plan(plan, first, _store(path), use_tqdm=False, log=lambda m: None)
    assert s1.stopped_early and not s1.complete and len(s1.tuned) == 4
    saved = json.loads(path.read_text())
    assert len(saved["entries"]) == 4 and saved["metadata"]["complete"] is False
    before = {k: saved["entries"][k]["config"] for k in saved["entries"]}

    second = FakeBench()
    s2 = tuner.run_plan(plan, second, _store(path), use_tqdm=False, log=lambda m: None)
    assert s2.complete and s2.already_done == 4 and len(s2.tuned) == len(entries) - 4
    assert second.timed_keys() == {s.key(k).to_str() for s, k in entries[4:]}
    assert entries[0][0] not in second.opened  # a fully tuned shape is not even set up again
    final = json.loads(path.read_text())
    assert len(final["entries"]) == len(entries) and final["metadata"]["complete"] is True
    assert all(final["entries"][k]["config"] == v for k, v in before.items())

    third = FakeBench()
    s3 = tuner.run_plan(plan, third, _store(path), use_tqdm=False, log=lambda m: None)
    assert s3.complete and not s3.tuned and not third.log and not third.opened


def test_time_limit_and_skipped_entries(tmp_path):
    plan = plan_mod.quick_plan()
    path = tmp_path / "r.json"
    s = tuner.run_plan(plan, FakeBench(), _store(path), time_limit_s=0.0, use_tqdm=False, log=lambda m: None)
    assert s.stopped_early and len(s.tuned) == len(plan.kernels)  # the first shape, then the limit
    bad = plan.shapes[1]
    s = tuner.run_plan(plan, FakeBench(fail_open=[bad]), _store(path), use_tqdm=False, log=lambda m: None)
    assert s.complete and len(s.skipped) == len(plan.kernels)
    table = tuning.read_config_file(path)
    assert set(table.skipped) == {bad.key(k).to_str() for k in plan.kernels}
    assert "GiB free" in next(iter(table.skipped.values()))["reason"]
    # skipped entries are not retried, unless asked
    again = FakeBench()
    tuner.run_plan(plan, again, _store(path), use_tqdm=False, log=lambda m: None)
    assert not again.opened
    tuner.run_plan(plan, again, _store(path), retry_skipped=True, use_tqdm=False, log=lambda m: None)
    assert again.opened == [bad]
    assert not tuning.read_config_file(path).skipped


def test_unrecoverable_gpu_error_stops_the_run(tmp_path):
    class Broken(FakeBench):
        def open(self, shape):
            session = super().open(shape)
            if len(self.opened) == 2:

                def time(kernel, cfg):
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

                session.time = time
            return session

    logs = []
    s = tuner.run_plan(plan_mod.quick_plan(), Broken(), _store(tmp_path / "r.json"), use_tqdm=False, log=logs.append)
    assert s.stopped_early and not s.complete and "illegal memory access" in s.error
    assert len(s.tuned) == 3 and not s.skipped  # nothing recorded as skipped: a re-run retries it
    table = tuning.read_config_file(tmp_path / "r.json")
    assert len(table.entries) == 3 and not table.skipped
    assert "Re-run the same command" in logs[-1]


def test_corrupted_results_file_is_moved_aside(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"schema_version": 1, "entr')
    logs = []
    store = tuner.ResultStore(path, {"gpu_name": FAKE_GPU}, log=logs.append)
    assert not store.entries and not path.exists() and "starting afresh" in logs[0]
    assert len(list(tmp_path.glob("r.json.corrupt-*"))) == 1
    tuning.write_config_file(path, {"gpu_name": "Other GPU"}, {})
    with pytest.raises(SystemExit, match="Other GPU"):
        tuner.ResultStore(path, {"gpu_name": FAKE_GPU})


def test_cli_run_writes_config_report_and_feeds_the_lookup(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: printed progress lines
    monkeypatch.setitem(sys.modules, "tabulate", None)  # no tabulate: plain-text tables
    out_dir, bench_md = tmp_path / "configs", tmp_path / "bench" / "autotune.md"
    argv = ["--quick", "--out-dir", str(out_dir), "--bench-report", str(bench_md)]
    assert cli.run(cli.build_parser().parse_args(argv), argv, bench=FakeBench()) == 0
    out = capsys.readouterr().out
    assert "[autotune] 9/9 (100%)" in out
    assert "geometric-mean speedup over the heuristic configs" in out and "heuristic ms" in out
    path = out_dir / "fake_gpu_1.json"
    meta = json.loads(path.read_text())["metadata"]
    assert meta["gpu_name"] == FAKE_GPU and meta["device_key"] == "fake_gpu_1"
    assert {"torch_version", "triton_version", "date", "command", "timing"} <= set(meta)
    md = (out_dir / "fake_gpu_1.md").read_text()
    assert md == bench_md.read_text() and md.startswith("# QnA kernel autotuning: Fake GPU 1")
    assert "| kernel" in md and "geometric-mean speedup" in md
    # a dry run sees what is done
    assert cli.main(["--dry-run", "--quick", "--out-dir", str(out_dir), "--gpu-name", FAKE_GPU]) == 0
    out = capsys.readouterr().out
    assert "9 entries already done" in out and "estimate: 0 entries" in out
    # the run-time look-up now finds these entries
    shape, kernel = plan_mod.quick_plan().entries()[0]
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(out_dir))
    cfg, hit = tuning.lookup_config(
        kernel,
        FAKE_GPU,
        shape.dtype,
        shape.heads,
        shape.head_dim,
        shape.n_queries,
        (shape.kh, shape.kw),
        (shape.sh, shape.sw),
        shape.pixels,
    )
    assert hit == shape.key(kernel)
    assert cfg == tuning.read_config_file(path).entries[hit]


def test_report_geomean_and_tables():
    entries = {
        EntryKey("fwd", "float16", 3, 3, 1, 1, 4, 8, 2, 4**6).to_str(): {
            "config": KernelConfig(16, 4).as_dict(),
            "heuristic": KernelConfig(8, 4).as_dict(),
            "time_ms": 1.0,
            "heuristic_time_ms": 2.0,
        },
        EntryKey("bwd", "float16", 3, 3, 1, 1, 4, 8, 2, 4**6).to_str(): {
            "config": KernelConfig(8, 4).as_dict(),
            "heuristic": KernelConfig(8, 4).as_dict(),
            "time_ms": 1.0,
            "heuristic_time_ms": 0.5,
        },
        EntryKey("bwd", "float16", 5, 5, 1, 1, 4, 8, 2, 4**6).to_str(): {"config": KernelConfig(8, 4).as_dict()},
    }
    rows = report.report_rows(entries)
    assert len(rows) == 2  # the entry without timings is left out
    g = report.speedups(rows)
    assert g["all"] == pytest.approx(1.0) and g["fwd"] == pytest.approx(2.0) and g["bwd"] == pytest.approx(0.5)
    plain = report.format_table(report.HEADERS, rows, markdown=True, use_tabulate=False)
    assert plain.splitlines()[0].startswith("| kernel") and "2.00x" in plain
    md = report.markdown_report({"gpu_name": "G"}, entries, skipped={"k": {"reason": "oom"}}, use_tabulate=False)
    assert "geometric-mean speedup over the heuristic configs: 1.000x (2 entries)" in md and "- `k`: oom" in md


# ------------------------------------------------------------------------------ model shapes
def _qna_stack():
    m = nn.Sequential(
        QnA(16, 16, 2, kernel_size=3),
        QnA(16, 32, 4, kernel_size=5, stride=2),
        QnA(32, 32, 4, kernel_size=(2, 4), padding=0, n_queries=3),
    )
    m.input_size = (12, 12, 16)  # channels-last, like the QnA layer
    return m


def test_collect_qna_shapes_from_a_model():
    shapes = shapes_of_model(_qna_stack, batch=6)
    assert [
        (s.batch, s.height, s.width, s.heads, s.head_dim, s.n_queries, s.kernel_size, s.stride, s.padding)
        for s in shapes
    ] == [
        (6, 12, 12, 2, 8, 2, (3, 3), (1, 1), (1, 1)),
        (6, 12, 12, 4, 8, 2, (5, 5), (2, 2), (2, 2)),
        (6, 6, 6, 4, 8, 3, (2, 4), (1, 1), (0, 0)),
    ]
    assert [s.name for s in shapes] == ["0", "1", "2"]
    # the layers' own forward is back after the collection
    model = _qna_stack()
    collect_qna_shapes(model, torch.zeros(1, 12, 12, 16))
    assert all("forward" not in m.__dict__ and m.forward.__func__ is QnA.forward for m in model)


def test_model_plan_from_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_qna_model.py").write_text(
        "import torch.nn as nn\nfrom qna_triton import QnA\n\n"
        "def make():\n"
        "    m = nn.Sequential(QnA(16, 16, 2, kernel_size=3), QnA(16, 16, 2, kernel_size=3),\n"
        "                      QnA(16, 32, 4, kernel_size=3, stride=2))\n"
        "    m.input_size = (56, 56, 16)\n"
        "    return m\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["--dry-run", "--model", "tiny_qna_model:make", "--batch", "32", "--dtypes", "bfloat16"]) == 0
    out = capsys.readouterr().out
    # two identical layers share their entries
    assert "plan 'model tiny_qna_model:make batch 32': 2 shapes x 3 kernels (fwd, bwd_delta, bwd) = 6 entries" in out
    assert "32 x 56 x 56" in out


# --------------------------------------------------------------------- real bench (interpreter)
def test_compare_reports_differences():
    a = torch.randn(4, 5, dtype=torch.float64)
    assert _compare([a.float()], [a.float()], "float32", ["x"]) is None
    assert "relative error" in _compare([a.float() * 1.01], [a.float()], "float32", ["x"])
    assert _compare([a.bfloat16()], [(a * (1 + 2**-9)).bfloat16()], "bfloat16", ["x"]) is None
    # float32 results of 16-bit problems (lse, drpb): the banded kernels' operand precision is allowed
    assert _compare([a.float() * (1 + 5e-4)], [a.float()], "bfloat16", ["lse"]) is None
    assert "relative error" in _compare([a.float() * (1 + 5e-4)], [a.float()], "float32", ["lse"])
    assert "relative error" in _compare([a.float() * 1.01], [a.float()], "bfloat16", ["lse"])
    b = a.float().clone()
    b[0, 0] = float("nan")
    assert "non-finite" in _compare([b], [a.float()], "float32", ["x"])
    assert "shape" in _compare([a[:2].float()], [a.float()], "float32", ["x"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the interpreter path")
def test_session_checks_and_replays_the_launchers_kernels():
    """The bench's single-kernel launches are recorded from the library's own launchers, so they
    track any change there; checked here through the interpreter on a tiny problem."""
    shape = Shape("float32", 3, 4, 2, 2, 2, 1, 1, 0, 0, 1, 4, 5)
    ses = Session(shape, device="cpu")
    other = KernelConfig(8, 2, 2, 1)
    assert other != heuristic_config("bwd", 3, 4) and other != heuristic_config("bwd_delta", 3, 4)
    assert ses.check("bwd", other) is None
    ses.launch("bwd", other)  # the recorded launch repeats
    ses.launch("bwd_delta", other)  # recorded on first use
    assert ses._last[0] == ("bwd_delta", other)
    ses.close()


@pytest.mark.gpu
def test_bench_checks_and_times_on_the_gpu():
    from qna_triton.autotune.bench import Bench

    shape = plan_mod.representative_shape(4**6, "bfloat16", 16, 8, 2, 3, 2)
    bench = Bench()
    session = bench.open(shape)
    try:
        for kernel in tuning.KERNELS:
            for cfg in plan_mod.candidate_configs(kernel, 16, 8, 2, 3):
                assert session.check(kernel, cfg) is None, (kernel, cfg)
                med, p20, p80 = session.time(kernel, cfg)
                assert 0 < p20 <= med <= p80
    finally:
        bench.release(session)


def test_candidates_include_the_banded_algorithm():
    """The tuner chooses the algorithm of each kernel per window: from 3 x 3 up their candidates hold
    banded tiles (the main backward kernel's at stride 1 only), and from 7 x 7 (bfloat16) the forward's
    default, the reference of the speed-up, is banded (the delta's from 11 x 11, the main kernel's from
    13 columns)."""
    plan = plan_mod.quick_plan()
    by_window = {s.kh: s for s, k in plan.entries() if k == "fwd" and s.sh == 1}
    c3, c7 = plan.candidates(by_window[3], "fwd"), plan.candidates(by_window[7], "fwd")
    assert c3[0].algo == "direct" and any(c.algo == "banded" for c in c3)
    assert c7[0] == tuning.banded_config((7, 7)) and any(c.algo == "direct" for c in c7)
    for c in c3 + c7:
        tuning.validate_config(c.as_dict())
    d3, d7 = plan.candidates(by_window[3], "bwd_delta"), plan.candidates(by_window[7], "bwd_delta")
    assert d3[0].algo == d7[0].algo == "direct" and any(c.algo == "banded" for c in d3 + d7)
    d11 = plan.candidates(replace(by_window[7], kh=11, kw=11, ph=5, pw=5), "bwd_delta")
    assert d11[0] == tuning.banded_config((11, 11), kernel="bwd_delta")
    bwd = [(s, plan.candidates(s, k)) for s, k in plan.entries() if k == "bwd" and s.kh * s.kw >= 9]
    assert all(any(c.algo == "banded" for c in cs) == (s.sh == s.sw == 1) for s, cs in bwd)
    assert {s.sh for s, _ in bwd} == {1, 2}
    b11 = plan.candidates(replace(by_window[7], kh=11, kw=11, ph=5, pw=5), "bwd")
    assert b11[0].algo == "direct" and any(c.algo == "banded" for c in b11)
    b13 = plan.candidates(replace(by_window[7], kh=13, kw=13, ph=6, pw=6), "bwd")
    assert b13[0] == tuning.banded_config((13, 13), kernel="bwd")
