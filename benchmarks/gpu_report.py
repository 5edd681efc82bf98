"""The GPU report: validate, measure and tune the library on a GPU in one command that ends by itself.

``scripts/gpu_report.sh`` runs ``python -m benchmarks.gpu_report``. Stages, in order, each in child
processes with its own time budget (seconds; the whole run has ``GPU_REPORT_BUDGET``, default 480):

==============  ======  ==============================================================================
stage           budget  what
==============  ======  ==============================================================================
environment         30  GPU, capability, driver, versions, ``nvidia-smi`` clocks; copy bandwidth and
                        bf16 matrix-product rate measured in place
tests              150  ``tests/test_gpu.py`` (the compiled kernels against the float64 oracle), in
                        parallel processes
benchmarks         180  the headline rows of ``python -m benchmarks`` (bf16, batch 32, 64x64, C=128,
                        d=8, N=2): our op at k = 3, 7, 15, 31 against the paper's form (eager at every
                        k, compiled at 7 and 15), FlexAttention at 7 and 15, the window-materialising
                        form; and the time per call of a tiny problem (launch overhead)
autotune            90  ``python -m qna_triton.autotune --quick`` (the headline head layout, k = 3, 7)
suite             rest  every other test file, one process per file, in parallel
==============  ======  ==============================================================================

Everything lands in ``OUT`` as at most eight files (what a GPU session can bring back), written as
each stage goes, so a stage that fails or runs out of time keeps what earlier stages wrote and the
later stages still run: ``summary.md`` (the stage table, key ratios, what did not run, what to rerun),
``report.json`` (the same as data, read by ``python -m benchmarks.ingest``), ``report.log``,
``tests.log``, ``suite.log``, ``bench_rows.jsonl`` (the harness's rows) and ``autotune/<gpu>.json``
and ``.md``. ``--stage NAME`` reruns one stage into the same folder (repeatable); a lone stage may use
the whole budget. ``--rehearse`` runs every stage on a CPU (Triton interpreter, tiny shapes, small
budgets) so the command is known to work before a GPU sees it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import SMOKE_LABEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ("environment", "tests", "benchmarks", "autotune", "suite")
# seconds per stage (None: what is left of the whole budget)
BUDGETS: Dict[str, Optional[float]] = {"environment": 30, "tests": 150, "benchmarks": 180, "autotune": 90,
                                       "suite": None}
TOTAL_BUDGET = 480.0
# A CPU rehearsal: the same stages on tiny shapes, sized for a 2-core CI machine.
REHEARSAL_BUDGETS: Dict[str, Optional[float]] = {"environment": 30, "tests": 45, "benchmarks": 90,
                                                 "autotune": 30, "suite": None}
REHEARSAL_TOTAL_BUDGET = 240.0
# A quick test file for the rehearsal's suite stage (the full suite takes about 12 minutes on 2 cores).
REHEARSAL_SUITE = ("tests/test_tuning.py",)
BUDGET_ENV = "GPU_REPORT_BUDGET"
RESERVE_S = 10.0  # kept back at the end: a child stopped at the deadline gets GRACE_S more, then the summary
GRACE_S = 5.0  # between SIGINT (pytest and the harness print what they have) and SIGKILL
MIN_SUITE_S = 15.0

# The files the report writes (never more than MAX_FILES, no deeper than OUT/a/b)
SUMMARY, STATE, LOG = "summary.md", "report.json", "report.log"
TESTS_LOG, SUITE_LOG, ROWS, AUTOTUNE_DIR = "tests.log", "suite.log", "bench_rows.jsonl", "autotune"
MAX_FILES, MAX_DEPTH = 8, 3

GPU_TEST_FILE = "tests/test_gpu.py"
# test files never run by the suite stage: the GPU test file has its own stage, and the report's own
# test runs this report (it would recurse)
NOT_IN_SUITE = ("tests/test_gpu.py", "tests/test_gpu_report.py")

# the headline benchmark shape is the harness's window_bf16_d8 suite
HEADLINE_SUITE = "window_bf16_d8"
HEADLINE = "bf16, batch 32, 64x64, C = 128, d = 8 (16 heads), N = 2"
WINDOWS = (3, 7, 15, 31)
COMPILED_WINDOWS = (7, 15)
# (providers, windows) per harness run, in order of priority
# (the compiled peers last: they compile for tens of seconds per shape)
BENCH_RUNS = (
    (("copy", "qna_triton", "paper_eager", "naive_window"), WINDOWS),
    (("paper_compiled", "flex_nat"), COMPILED_WINDOWS),
)
PEERS = ("paper_eager", "paper_compiled", "flex_nat", "naive_window")
LAUNCH_SHAPE = dict(B=1, H=8, W=8, N=2, h=4, d=8, k=3)


def now() -> str:
    """``qna_triton.env.utc_now``'s format, without importing it: this process runs the stages and never
    imports torch (a broken torch install fails a stage, not the report)."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------- processes
RUNNING: List[Proc] = []  # children to stop should the report itself be terminated


@dataclass
class Proc:
    """A child process whose output goes to ``log``; ``rc`` None while running."""

    cmd: List[str]
    log: str
    env: Dict[str, str]
    popen: Optional[subprocess.Popen] = None
    rc: Optional[int] = None
    timed_out: bool = False
    started: float = 0.0
    seconds: float = 0.0
    killed_at: Optional[float] = None

    def start(self) -> None:
        RUNNING.append(self)
        self.started = time.monotonic()
        with open(self.log, "a") as f:
            f.write(f"$ {shlex.join(self.cmd)}\n")
            f.flush()
            # a session of its own: a time-out stops the child and everything it started
            self.popen = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                          start_new_session=True)

    def poll(self, deadline: float) -> bool:
        """True once finished; past ``deadline`` it is interrupted, then killed."""
        assert self.popen is not None
        rc = self.popen.poll()
        if rc is None:
            t = time.monotonic()
            if t > deadline and self.killed_at is None:
                self.timed_out, self.killed_at = True, t
                self._signal(signal.SIGINT)
            elif self.killed_at is not None and t > self.killed_at + GRACE_S:
                self._signal(signal.SIGKILL)
            return False
        self.rc, self.seconds = rc, time.monotonic() - self.started
        if self in RUNNING:
            RUNNING.remove(self)
        return True

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_parallel(procs: Sequence[Proc], deadline: float, jobs: int,
                 on_tick: Optional[Callable[[], None]] = None,
                 on_done: Optional[Callable[[Proc], None]] = None) -> None:
    """Runs ``procs``, at most ``jobs`` at a time, in order; none is started after ``deadline``
    (those keep ``rc`` None) and running ones are stopped there (``timed_out``)."""
    pending, running = list(procs), []
    while pending or running:
        while pending and len(running) < max(1, jobs) and time.monotonic() < deadline - 1:
            p = pending.pop(0)
            p.start()
            running.append(p)
        if not running:
            break
        time.sleep(0.25)
        for p in list(running):
            if p.poll(deadline):
                running.remove(p)
                if on_done:
                    on_done(p)
        if on_tick:
            on_tick()


def run_one(cmd: List[str], log: str, env: Dict[str, str], deadline: float,
            on_tick: Optional[Callable[[], None]] = None) -> Proc:
    p = Proc(cmd, log, env)
    run_parallel([p], deadline, 1, on_tick)
    return p


class Mirror:
    """Appends what a child adds to ``src`` to ``dst`` while it runs (rows survive a kill)."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst, self.offset = src, dst, 0

    def __call__(self) -> None:
        try:
            size = os.path.getsize(self.src)
        except OSError:
            return
        if size <= self.offset:
            return
        with open(self.src, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        cut = data.rfind(b"\n") + 1  # whole lines only
        if cut:
            with open(self.dst, "ab") as f:
                f.write(data[:cut])
            self.offset += cut


# --------------------------------------------------------------------------------- pytest output
_COUNT_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_VERBOSE_RE = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def pytest_counts(text: str) -> Dict[str, int]:
    """Counts from pytest's last summary line; from its verbose lines when it was killed before that."""
    counts: Dict[str, int] = {}
    for line in reversed(text.splitlines()):
        if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", line) and \
                re.search(r" in [0-9.]+s", line):
            for n, what in _COUNT_RE.findall(line):
                counts["errors" if what.startswith("error") else what] = int(n)
            return counts
    for what in _VERBOSE_RE.findall(text):
        key = {"ERROR": "errors", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(what, what.lower())
        counts[key] = counts.get(key, 0) + 1
    return counts


def first_error(text: str) -> str:
    """The first line that says what went wrong."""
    lines = text.splitlines()
    for pattern in (r"^(FAILED|ERROR)[ :]", r"^E\s+\S", r"Error\b|error:|Traceback"):
        for line in lines:
            if re.search(pattern, line) and not line.startswith("$ "):
                return " ".join(line.split())[:300]
    tail = [l for l in lines if l.strip() and not l.startswith("$ ")]
    return " ".join(tail[-1].split())[:300] if tail else ""


def _read(path: str, offset: int = 0) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


def _append(dst: str, header: str, text: str, limit: int = 400_000) -> None:
    if len(text) > limit:  # keep the end, where pytest's summary is
        text = f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
    with open(dst, "a") as f:
        f.write(f"\n===== {header}\n{text}")


# --------------------------------------------------------------------------------- the report
@dataclass
class Report:
    out: str
    rehearse: bool
    python: str
    budget: float
    stage_budgets: Dict[str, Optional[float]]
    test_file: str = GPU_TEST_FILE
    suite_files: Optional[List[str]] = None
    jobs: int = 0
    state: dict = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)

    # ---- state and files
    @property
    def deadline(self) -> float:
        return self.start + self.budget - RESERVE_S

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def load(self, fresh: bool) -> None:
        mode = "rehearsal" if self.rehearse else "gpu"
        old = None
        if not fresh and os.path.isfile(self.path(STATE)):
            with open(self.path(STATE)) as f:
                old = json.load(f)
            if old.get("mode") != mode:
                raise SystemExit(f"{self.out} holds a {old.get('mode')} report; this run is a {mode} one "
                                 f"({'drop' if self.rehearse else 'add'} --rehearse, or use another OUT)")
        if old is None:
            os.makedirs(self.out, exist_ok=True)
            for name in (SUMMARY, STATE, LOG, TESTS_LOG, SUITE_LOG, ROWS):
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
            if os.path.isdir(self.path(AUTOTUNE_DIR)):
                for name in os.listdir(self.path(AUTOTUNE_DIR)):
                    os.remove(os.path.join(self.path(AUTOTUNE_DIR), name))
            old = {"mode": mode, "created": now(), "stages": {}}
        self.state = old
        self.state.update(updated=now(), budget_s=self.budget, python=self.python)
        for s in STAGES:
            self.state["stages"].setdefault(s, {"status": "not run", "note": "not started"})

    def save(self) -> None:
        self.state["updated"] = now()
        self.state["files"] = files_under(self.out)
        tmp = self.path(STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path(STATE))
        summary = summary_markdown(self.state, self.out)
        with open(self.path(SUMMARY + ".tmp"), "w") as f:
            f.write(summary)
        os.replace(self.path(SUMMARY + ".tmp"), self.path(SUMMARY))

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.path(LOG), "a") as f:
            f.write(line + "\n")

    def env(self, **extra: str) -> Dict[str, str]:
        env = dict(os.environ)
        paths = [REPO, os.path.join(REPO, "examples")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        # the library's defaults: compiled kernels on CUDA tensors (the interpreter only in a rehearsal)
        for name in ("QNA_TRITON_BACKEND", "QNA_TRITON_ALGO", "QNA_TRITON_DISABLE_TUNED"):
            env.pop(name, None)
        if self.rehearse:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        env.update(extra)
        return env

    @property
    def margin(self) -> float:
        """Seconds between a child's own time limit and its hard stop: a compilation in flight (a GPU),
        the reports a child writes at its end (matplotlib's import, on a CPU)."""
        return 8.0 if self.rehearse else 25.0

    def cores(self) -> int:
        return os.cpu_count() or 1

    # ---- stages
    def run(self, stages: Sequence[str]) -> int:
        lone = len(stages) == 1
        self.save()
        for _i, name in enumerate(stages):
            remaining = self.deadline - time.monotonic()
            budget = self.stage_budgets.get(name)
            if budget is None or lone:
                budget = remaining
            budget = min(budget, remaining)
            info = {"status": "running", "started": now(), "budget_s": round(budget, 1)}
            self.state["stages"][name] = info
            if name != "environment" and self.state.get("abort"):
                info.update(status="not run", note=self.state["abort"])
                self.save()
                continue
            if budget < (MIN_SUITE_S if name == "suite" else 5):
                info.update(status="not run", note=f"no time left ({max(0, remaining):.0f} s of the budget)")
                self.save()
                continue
            self.save()
            self.log(f"stage {name}: budget {budget:.0f} s")
            t0 = time.monotonic()
            try:
                getattr(self, "stage_" + name)(info, time.monotonic() + budget)
            except Exception as e:  # the report's own failure: recorded, and the next stage runs
                info.update(status="failed", error=f"report driver: {type(e).__name__}: {e}")
            info["seconds"] = round(time.monotonic() - t0, 1)
            if info["status"] == "running":
                info["status"] = "ok"
            self.log(f"stage {name}: {info['status']} in {info['seconds']:.0f} s"
                     + (f": {info['error']}" if info.get("error") else ""))
            self.save()
        self.state["seconds"] = round(time.monotonic() - self.start, 1)
        self.save()
        extra = [f for f in self.state["files"] if not _within_limits([f])]
        if len(self.state["files"]) > MAX_FILES or extra:
            print(f"WARNING: {len(self.state['files'])} files under {self.out}", file=sys.stderr)
            return 2
        return 0 if all(self.state["stages"][s]["status"] == "ok" for s in stages) else 1

    def _child(self, what: str, out_json: str, deadline: float, on_tick=None) -> Tuple[Proc, dict]:
        cmd = [self.python, "-m", "benchmarks.gpu_report", "--child", what, out_json]
        if self.rehearse:
            cmd.append("--rehearse")
        p = run_one(cmd, self.path(LOG), self.env(), deadline, on_tick)
        data = {}
        if os.path.isfile(out_json):
            with open(out_json) as f:
                data = json.load(f)
        return p, data

    def _fail(self, info: dict, p: Proc, text: str) -> None:
        if p.timed_out:
            info.update(status="out of time", error=first_error(text) or f"stopped after {p.seconds:.0f} s")
        elif p.rc is None:
            info.update(status="not run", note="no time left to start it")
        elif p.rc != 0:
            info.update(status="failed", error=first_error(text) or f"exit code {p.rc}")

    def stage_environment(self, info: dict, deadline: float) -> None:
        self.state.pop("abort", None)
        with tempfile.TemporaryDirectory() as tmp:
            offset = os.path.getsize(self.path(LOG))
            p, data = self._child("environment", os.path.join(tmp, "env.json"), deadline)
        self.state["environment"] = data
        if data.get("gpu"):
            self.state["gpu"] = data["gpu"]
            self.state["device_key"] = data.get("device_key")
        self._fail(info, p, _read(self.path(LOG), offset))
        if data and not self.rehearse and not data.get("cuda_available"):
            info.update(status="failed", error="no CUDA GPU visible to torch (on a CPU, run with --rehearse)")
            self.state["abort"] = "no CUDA GPU (see environment)"
        info["result"] = environment_line(data)

    def stage_tests(self, info: dict, deadline: float) -> None:
        log = self.path(TESTS_LOG)
        pytest = [self.python, "-m", "pytest", "-p", "no:cacheprovider"]
        with tempfile.TemporaryDirectory() as tmp:
            coll = os.path.join(tmp, "collect.log")
            p = run_one(pytest + ["--collect-only", "-q", self.test_file], coll, self.env(),
                        min(deadline, time.monotonic() + 60))
            text = _read(coll)
            # node ids, once each (a warnings summary may list some again)
            ids = list(dict.fromkeys(l.strip() for l in text.splitlines() if re.fullmatch(r"\S+::\S+", l.strip())))
            if p.rc != 0 or not ids:
                _append(log, f"{self.test_file}: collection", text)
                self._fail(info, p, text)
                if info["status"] == "running":
                    info.update(status="failed", error=first_error(text) or "no tests collected")
                return
            # the compiled model step compiles for most of a minute: a process of its own, started first
            jobs = self.jobs or max(1, min(8, self.cores() // 2))
            slow = [i for i in ids if "compile" in i]
            rest = [i for i in ids if i not in slow]
            shards = [slow] if slow and jobs > 1 else []
            n = max(1, jobs - len(shards))
            shards += [s for s in (rest[j::n] for j in range(n)) if s] if shards else [ids[j::n] for j in range(n)]
            shards = [s for s in shards if s]
            procs = [Proc(pytest + ["-v", "-rA", *s], os.path.join(tmp, f"shard{j}.log"),
                          self.env(OMP_NUM_THREADS="2")) for j, s in enumerate(shards)]
            results = []

            def done(pr: Proc) -> None:
                t = _read(pr.log)
                results.append((pr, t))
                _append(log, f"{self.test_file} shard {procs.index(pr)}: exit {pr.rc}"
                        + (" (stopped: out of time)" if pr.timed_out else ""), t)

            run_parallel(procs, deadline, len(procs), on_done=done)
            for pr in procs:
                if pr.rc is None:
                    _append(log, f"{self.test_file} shard {procs.index(pr)}: not started (no time left)", "")
        counts: Dict[str, int] = {}
        for _, t in results:
            for k, v in pytest_counts(t).items():
                counts[k] = counts.get(k, 0) + v
        info["counts"] = counts
        info["result"] = counts_line(counts)
        failed = [(pr, t) for pr, t in results if pr.rc not in (0, 5) or pr.timed_out]
        if any(pr.timed_out for pr, _ in results) or any(pr.rc is None for pr in procs):
            late = [procs.index(pr) for pr, _ in results if pr.timed_out]
            unstarted = sum(pr.rc is None for pr in procs)
            info.update(status="out of time", error=(f"shard {', '.join(map(str, late))} stopped at the budget"
                                                     if late else f"{unstarted} shards not started")
                        + (f"; first failure: {first_error(failed[0][1])}" if failed and not failed[0][0].timed_out
                           else ""))
        elif failed:
            info.update(status="failed", error=first_error(failed[0][1]) or f"exit code {failed[0][0].rc}")
        if counts and counts.get("skipped", 0) == sum(counts.values()):
            info["note"] = "every test skipped (no CUDA GPU)"

    def stage_benchmarks(self, info: dict, deadline: float) -> None:
        rows = self.path(ROWS)
        with tempfile.TemporaryDirectory() as tmp:
            offset = os.path.getsize(self.path(LOG))
            p, launch = self._child("launch", os.path.join(tmp, "launch.json"), min(deadline, time.monotonic() + 30))
            if launch:
                self.state["launch_overhead"] = launch
            errors = [] if p.rc == 0 else [first_error(_read(self.path(LOG), offset)) or f"launch: exit {p.rc}"]
            if p.timed_out:
                info["status"] = "out of time"
            runs = []
            for j, (providers, windows) in enumerate(BENCH_RUNS):
                left = deadline - time.monotonic()
                if left < 10:
                    runs.append((providers, windows, "not run: no time left"))
                    continue
                work = os.path.join(tmp, f"run{j}")
                cmd = [self.python, "-m", "benchmarks", "--suite", HEADLINE_SUITE, "--windows", *map(str, windows),
                       "--providers", *providers, "--out", work, "--compile-mode", "default",
                       # the harness stops starting measurements there; the hard stop comes later
                       "--time-budget", f"{max(1.0, left - self.margin):.0f}"]
                if self.rehearse:
                    cmd += ["--smoke", "--no-compile"]
                os.makedirs(work)
                offset = os.path.getsize(self.path(LOG))
                pr = run_one(cmd, self.path(LOG), self.env(), deadline, Mirror(os.path.join(work, "rows.jsonl"), rows))
                state = "ok" if pr.rc == 0 else ("out of time" if pr.timed_out else f"exit code {pr.rc}")
                runs.append((providers, windows, state))
                if pr.rc != 0:
                    errors.append(first_error(_read(self.path(LOG), offset)) or state)
                    if pr.timed_out:
                        info["status"] = "out of time"
        info["runs"] = [{"providers": list(a), "windows": list(b), "state": c} for a, b, c in runs]
        data = bench_data(rows)
        self.state["bench"] = data
        info["result"] = bench_line(data, self.state.get("launch_overhead"))
        ours_bad = [r for r in data.get("rows_not_ok", []) if r["provider"] == "qna_triton"]
        if any(r["status"].startswith("skipped") for r in ours_bad):
            info["status"] = "out of time"
            errors.append(f"qna_triton rows skipped: {ours_bad[0]['status']}")
        if info["status"] == "out of time":
            info["error"] = errors[-1] if errors else "stopped by the stage budget"
        elif errors:
            info.update(status="failed", error=errors[0])
        elif ours_bad:
            info.update(status="failed", error=f"qna_triton {ours_bad[0]['pass']} k={ours_bad[0]['window']}: "
                                               f"{ours_bad[0]['status']}")
        elif any(state.startswith("not run") for _, _, state in runs):
            info.update(status="out of time", error="no time left for every harness run")

    def stage_autotune(self, info: dict, deadline: float) -> None:
        folder = self.path(AUTOTUNE_DIR)
        os.makedirs(folder, exist_ok=True)
        cmd = [self.python, "-m", "qna_triton.autotune", "--quick", "--no-tqdm", "--out-dir", folder]
        if self.rehearse:  # timings in the interpreter mean nothing: the plan only
            cmd += ["--dry-run", "--gpu-name", "CPU rehearsal"]
        else:
            cmd += ["--time-limit", f"{max(5.0, deadline - time.monotonic() - self.margin):.0f}"]
        offset = os.path.getsize(self.path(LOG))
        p = run_one(cmd, self.path(LOG), self.env(), deadline)
        text = _read(self.path(LOG), offset)
        for name in os.listdir(folder):  # a write cut short by the time-out
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
        data = autotune_data(folder)
        data["dry_run"] = self.rehearse
        m = re.search(r"^estimate: (.*)$", text, re.M)
        if m:
            data["estimate"] = m.group(1).strip()
        self.state["autotune"] = data
        self._fail(info, p, text)
        info["result"] = autotune_line(data)

    def stage_suite(self, info: dict, deadline: float) -> None:
        files = self.suite_files
        if files is None:
            files = list(REHEARSAL_SUITE) if self.rehearse else sorted(
                os.path.join("tests", f) for f in os.listdir(os.path.join(REPO, "tests"))
                if f.startswith("test_") and f.endswith(".py"))
        files = [f for f in files if f not in NOT_IN_SUITE and f != self.test_file]
        log = self.path(SUITE_LOG)
        per_file: Dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            procs = [Proc([self.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f],
                          os.path.join(tmp, os.path.basename(f) + ".log"), self.env(OMP_NUM_THREADS="2"))
                     for f in files]

            def done(pr: Proc) -> None:
                f = pr.cmd[-1]
                t = _read(pr.log)
                status = "out of time" if pr.timed_out else "ok" if pr.rc in (0, 5) else "failed"
                per_file[f] = {"status": status, "rc": pr.rc, "seconds": round(pr.seconds, 1), **pytest_counts(t)}
                if status != "ok":
                    per_file[f]["error"] = first_error(t)
                _append(log, f"{f}: {status} (exit {pr.rc}, {pr.seconds:.0f} s)", t)
                self.state["suite"] = per_file
                self.save()

            run_parallel(procs, deadline, self.jobs or self.cores(), on_done=done)
            for pr in procs:
                if pr.rc is None:
                    per_file[pr.cmd[-1]] = {"status": "not run", "note": "no time left to start it"}
        self.state["suite"] = {f: per_file[f] for f in files if f in per_file}
        bad = [(f, r) for f, r in self.state["suite"].items() if r["status"] != "ok"]
        totals: Dict[str, int] = {}
        for r in self.state["suite"].values():
            for k in ("passed", "failed", "skipped", "errors"):
                totals[k] = totals.get(k, 0) + r.get(k, 0)
        info["counts"] = totals
        info["result"] = f"{len(files)} files: " + counts_line(totals)
        if any(r["status"] in ("out of time", "not run") for _, r in bad):
            f, r = next((f, r) for f, r in bad if r["status"] in ("out of time", "not run"))
            info.update(status="out of time", error=f"{f}: {r['status']}")
        elif bad:
            f, r = bad[0]
            info.update(status="failed", error=f"{f}: {r.get('error', '')}")


# --------------------------------------------------------------------------------- stage data
def bench_data(rows_path: str) -> dict:
    """Key numbers of the headline rows: per window our times and the peers' ratios (peer / ours)."""
    from .report import derive, read_rows

    if not os.path.isfile(rows_path) or not os.path.getsize(rows_path):
        return {}
    rows, meta = derive(read_rows([rows_path]))
    ok = {(r["provider"], r["pass"], r.get("window")): r for r in rows
          if r.get("suite") == HEADLINE_SUITE and r.get("status") == "ok" and r.get("p50_ms")}
    table = []
    for k in sorted({r.get("window") for r in rows if r.get("suite") == HEADLINE_SUITE and r.get("window")}):
        ours_fb, ours_f = ok.get(("qna_triton", "fwd+bwd", k)), ok.get(("qna_triton", "fwd", k))
        entry = {"window": k}
        if ours_f:
            entry.update(fwd_ms=ours_f["p50_ms"], fwd_gb_s=ours_f.get("gb_s"), fwd_pct_copy=ours_f.get("pct_copy"),
                         fwd_extra_mb=ours_f.get("extra_mb"))
        if ours_fb:
            entry.update(fwd_bwd_ms=ours_fb["p50_ms"], fwd_bwd_extra_mb=ours_fb.get("extra_mb"))
            for peer in PEERS:
                r = ok.get((peer, "fwd+bwd", k))
                if r:
                    entry[f"x_{peer}"] = r["p50_ms"] / ours_fb["p50_ms"]
                    if r.get("extra_mb") and ours_fb.get("extra_mb"):
                        entry[f"mem_x_{peer}"] = r["extra_mb"] / ours_fb["extra_mb"]
        table.append(entry)
    not_ok = [{k: r.get(k) for k in ("provider", "pass", "window", "status")} for r in rows
              if r.get("suite") == HEADLINE_SUITE and r.get("status") != "ok"]
    return {"rows": len(rows), "smoke": meta["smoke"], "copy_gb_s": meta.get("copy_large_gb_s"),
            "table": table, "rows_not_ok": not_ok}


def autotune_data(folder: str) -> dict:
    """Tuned against heuristic per entry and the geometric mean, from the autotuner's file."""
    files = [f for f in sorted(os.listdir(folder)) if f.endswith(".json")] if os.path.isdir(folder) else []
    if not files:
        return {"file": None}
    with open(os.path.join(folder, files[0])) as f:
        data = json.load(f)
    entries = []
    for key, v in data.get("entries", {}).items():
        if v.get("time_ms") and v.get("heuristic_time_ms"):
            entries.append({"key": key, "heuristic_ms": v["heuristic_time_ms"], "tuned_ms": v["time_ms"],
                            "speedup": v["heuristic_time_ms"] / v["time_ms"]})
    meta = data.get("metadata", {})
    out = {"file": f"{AUTOTUNE_DIR}/{files[0]}", "entries": entries, "skipped": len(data.get("skipped", {})),
           "complete": meta.get("complete"), "gpu_name": meta.get("gpu_name")}
    if entries:
        out["geomean"] = statistics.geometric_mean([e["speedup"] for e in entries])
        for kernel in ("fwd", "bwd_delta", "bwd"):
            s = [e["speedup"] for e in entries if e["key"].startswith(f"kernel={kernel};")]
            if s:
                out[f"geomean_{kernel}"] = statistics.geometric_mean(s)
    return out


# --------------------------------------------------------------------------------- summary
def _n(v, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def counts_line(counts: Dict[str, int]) -> str:
    order = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) or "no tests ran"


def environment_line(d: dict) -> str:
    if not d:
        return ""
    parts = [d.get("gpu", "?")]
    if d.get("capability"):
        parts.append(f"sm_{d['capability'].replace('.', '')}")
    if d.get("copy_gb_s"):
        parts.append(f"copy {d['copy_gb_s']:.4g} GB/s")
    if d.get("matmul_tflop_s"):
        parts.append(f"bf16 matmul {d['matmul_tflop_s']:.3g} TFLOP/s")
    smi = d.get("nvidia_smi") or {}
    if smi.get("clocks.sm"):
        parts.append(f"SM clock {smi['clocks.sm']} (max {smi.get('clocks.max.sm', '?')})")
    return ", ".join(parts)


def bench_line(d: dict, launch: Optional[dict]) -> str:
    parts = []
    for e in d.get("table", []):
        if "x_paper_eager" in e:
            parts.append(f"k={e['window']}: {e['x_paper_eager']:.2f}x paper eager")
    if launch and launch.get("fwd_us"):
        parts.append(f"launch {launch['fwd_us']:.0f} us/call fwd")
    return "; ".join(parts) + (f" ({d.get('rows', 0)} rows)" if d else "no rows")


def autotune_line(d: dict) -> str:
    if d.get("dry_run"):
        return f"dry run (no GPU): plan only; {d.get('estimate', '')}"
    if not d.get("file"):
        return "no config file written"
    g = d.get("geomean")
    return (f"{len(d.get('entries', []))} entries, tuned/heuristic geomean {g:.3f}x" if g else "no timed entries") \
        + ("" if d.get("complete") else " (incomplete: rerun continues)")


def _cell(text) -> str:
    return " ".join(str(text).replace("|", "/").split())


def summary_markdown(state: dict, out: str) -> str:
    """The report's ``summary.md``: the stage table first, then key ratios, tuning, the suite, what did
    not run, and the command to rerun a stage."""
    rehearsal = state.get("mode") == "rehearsal"
    env = state.get("environment", {})
    lines = [f"# GPU report: {state.get('gpu', 'unknown device')}", ""]
    if rehearsal:
        lines += [f"**CPU rehearsal ({SMOKE_LABEL})**: the stages run on a CPU (Triton interpreter, tiny "
                  "shapes, small budgets) to check the command itself.", ""]
    lines.append(f"Started {state.get('created')}, updated {state.get('updated')}; budget {state.get('budget_s'):.0f} s"
                 + (f", took {state['seconds']:.0f} s" if state.get("seconds") is not None else "") + ".")
    if env:
        lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
                     f"{env.get('driver') or 'n/a'}, python {env.get('python')}.")
    rerun = "bash scripts/gpu_report.sh" + (" --rehearse" if rehearsal else "")
    previous = "runs/gpu_report"
    lines += ["", "| stage | status | seconds | budget | result | first error |", "|---|---|---|---|---|---|"]
    todo = []
    for s in STAGES:
        info = state["stages"].get(s, {})
        status = info.get("status", "not run")
        if status not in ("ok", "running"):
            todo.append(s)
        err = info.get("error") or info.get("note") or ""
        lines.append(f"| {s} | {status} | {_n(info.get('seconds'), '.0f')} | {_n(info.get('budget_s'), '.0f')} | "
                     f"{_cell(info.get('result', ''))} | {_cell(err)} |")
    lines.append("")
    if todo:
        lines.append("Rerun what did not finish, merging into this report (a stage rerun alone may use the "
                     f"whole budget): `OUT={out} {rerun} {' '.join(f'--stage {s}' for s in todo)}`. On a machine "
                     f"whose OUT starts empty, bring these files along (e.g. in {previous}/) and add "
                     f"`--previous {previous}`.")
    else:
        lines.append("Every stage ran to the end.")

    bench = state.get("bench") or {}
    lines += ["", f"## Key ratios ({HEADLINE})", ""]
    if bench.get("table"):
        lines += ["Peer time / our time for forward+backward (>1: ours is faster), memory = peer extra / ours; "
                  "fwd GB/s over the forward's bytes floor, % of a copy of those bytes.", "",
                  "| k | ours fwd ms | ours fwd+bwd ms | ours fwd+bwd extra MB | fwd GB/s | fwd % of copy | "
                  "x paper eager | x paper compiled | x FlexAttention | x window-materialising | "
                  "memory x window-materialising |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in bench["table"]:
            lines.append(f"| {e['window']} | {_n(e.get('fwd_ms'))} | {_n(e.get('fwd_bwd_ms'))} | "
                         f"{_n(e.get('fwd_bwd_extra_mb'), '.0f')} | "
                         f"{_n(e.get('fwd_gb_s'), '.0f')} | {_n(e.get('fwd_pct_copy'), '.0f')} | "
                         f"{_n(e.get('x_paper_eager'))} | {_n(e.get('x_paper_compiled'))} | {_n(e.get('x_flex_nat'))} | "
                         f"{_n(e.get('x_naive_window'))} | {_n(e.get('mem_x_naive_window'))} |")
    else:
        lines.append("No benchmark rows.")
    launch = state.get("launch_overhead")
    if launch:
        lines += ["", f"Launch overhead (eager, {launch.get('shape')}, {launch.get('backend')}): "
                      f"{_n(launch.get('fwd_us'), '.1f')} us per forward call, "
                      f"{_n(launch.get('fwd_bwd_us'), '.1f')} us per forward+backward."]

    tune = state.get("autotune")
    if tune:
        lines += ["", "## Autotune (--quick)", "", autotune_line(tune) + "."]
        if tune.get("entries"):
            lines += ["", "| entry | heuristic ms | tuned ms | speedup |", "|---|---|---|---|"]
            lines += [f"| {e['key']} | {e['heuristic_ms']:.4g} | {e['tuned_ms']:.4g} | {e['speedup']:.3f}x |"
                      for e in tune["entries"]]

    suite = state.get("suite")
    if suite:
        lines += ["", "## Suite", "", "| file | status | passed | failed | skipped | errors | seconds | first error |",
                  "|---|---|---|---|---|---|---|---|"]
        for f, r in suite.items():
            lines.append(f"| {f} | {r['status']} | {r.get('passed', 0)} | {r.get('failed', 0)} | "
                         f"{r.get('skipped', 0)} | {r.get('errors', 0)} | {_n(r.get('seconds'), '.0f')} | "
                         f"{_cell(r.get('error', r.get('note', '')))} |")

    missing = [f"stage {s}: {state['stages'][s].get('status')}" for s in todo]
    missing += [f"benchmark {r['provider']} {r['pass']} k={r['window']}: {r['status']}"
                for r in bench.get("rows_not_ok", [])]
    lines += ["", "## Did not run or did not succeed", ""]
    lines += [f"- {_cell(m)}" for m in missing] or ["Nothing."]
    lines += ["", f"Files: {', '.join(state.get('files', []))}.", ""]
    return "\n".join(lines)


def files_under(out: str) -> List[str]:
    found = []
    for root, _, names in os.walk(out):
        for n in names:
            if not n.endswith(".tmp"):
                found.append(os.path.relpath(os.path.join(root, n), out))
    return sorted(found)


def _within_limits(rel_paths: Sequence[str]) -> bool:
    return all(len(p.split(os.sep)) <= MAX_DEPTH for p in rel_paths)


# --------------------------------------------------------------------------------- children
def child_environment(out_json: str, rehearse: bool) -> int:
    """Versions, device properties, ``nvidia-smi`` and the two ceilings, into ``out_json``."""
    import torch

    from qna_triton.env import capture_environment

    from .env import sanitise
    from .timing import TimingConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = capture_environment(device)
    data = {"gpu": env.device_name, "device_key": sanitise(env.device_name), "torch": env.torch,
            "triton": env.triton, "cuda": env.cuda, "python": env.python, "cuda_available": cuda,
            "date": env.date, "l2_bytes": env.l2_bytes, "memory_bytes": env.memory_bytes}
    if cuda:
        data.update(capability=env.capability, multiprocessors=env.multiprocessors)
    _save(out_json, data)
    fields = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "memory.total")
    smi = _nvidia_smi(fields)
    if "error" in smi:  # an older driver may lack a field: name and driver at least
        fallback = _nvidia_smi(fields[:2])
        smi = smi if "error" in fallback else {**fallback, "error": smi["error"]}
    data["nvidia_smi"] = smi
    data["driver"] = data["nvidia_smi"].get("driver_version")
    _save(out_json, data)
    print(json.dumps(data, indent=1), flush=True)
    from .hw import measure_copy_bandwidth, measure_matmul_rate

    cfg = TimingConfig()
    bw, ms = measure_copy_bandwidth(device, cfg, nbytes=(1 << 30) if cuda else (32 << 20))
    data.update(copy_gb_s=bw / 1e9, copy_bytes=(1 << 30) if cuda else (32 << 20), copy_ms=ms)
    _save(out_json, data)
    n = 8192 if cuda else 256
    rate, ms = measure_matmul_rate(device, cfg, n=n)
    data.update(matmul_tflop_s=rate / 1e12, matmul_n=n, matmul_ms=ms)
    _save(out_json, data)
    print(f"copy {data['copy_gb_s']:.1f} GB/s, bf16 matmul {data['matmul_tflop_s']:.2f} TFLOP/s", flush=True)
    return 0


def _nvidia_smi(fields: Sequence[str]) -> dict:
    """``nvidia-smi``'s values of ``fields`` for the first GPU (read only: nothing is changed), or
    ``{"error": ...}``."""
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if smi.returncode != 0 or not smi.stdout.strip():
        return {"error": (smi.stderr or smi.stdout).strip()[:200] or f"exit {smi.returncode}"}
    return dict(zip(fields, (v.strip() for v in smi.stdout.strip().splitlines()[0].split(","))))


def child_launch(out_json: str, rehearse: bool) -> int:
    """Host-side cost: time per call of a tiny problem in eager mode, calls back to back."""
    import torch

    from qna_triton import qna_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = LAUNCH_SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(s["B"], s["H"], s["W"], s["N"], s["h"], device=device, generator=g).to(dtype)
    values = torch.randn(s["B"], s["H"], s["W"], s["h"], s["d"], device=device, generator=g).to(dtype)
    rpb = torch.randn(s["k"] ** 2, s["N"], s["h"], device=device, generator=g)
    leaves = [t.requires_grad_() for t in (logits, values, rpb)]
    calls = 200 if device.type == "cuda" else 5

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_call_us(fn) -> float:
        for _ in range(5):
            fn()
        sync()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(times)

    def fwd():
        with torch.no_grad():
            qna_attention(logits, values, rpb, None, s["k"])

    def fwd_bwd():
        qna_attention(*leaves, None, s["k"]).sum().backward()

    data = {"shape": f"B{s['B']} {s['H']}x{s['W']} N{s['N']} h{s['h']} d{s['d']} k{s['k']} "
                     f"{str(dtype).replace('torch.', '')}",
            # the library's default backend: the kernels on CUDA tensors, the PyTorch path on CPU ones
            "backend": "triton" if device.type == "cuda" else "reference", "device": device.type, "calls": calls}
    data["fwd_us"] = per_call_us(fwd)
    data["fwd_bwd_us"] = per_call_us(fwd_bwd)
    _save(out_json, data)
    print(json.dumps(data), flush=True)
    return 0


def _save(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


CHILDREN = {"environment": child_environment, "launch": child_launch}


# --------------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash scripts/gpu_report.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rehearse", action="store_true", help="run every stage on a CPU (interpreter, tiny shapes)")
    p.add_argument("--stage", action="append", choices=STAGES, default=[],
                   help="run only this stage (repeatable), merging into the report already in OUT")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/gpu_report)")
    p.add_argument("--previous", default=None, metavar="DIR",
                   help="with --stage: first copy an earlier report's files from DIR into OUT (a machine whose "
                        "OUT starts empty: bring DIR along in the working tree)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default ${BUDGET_ENV}, else {TOTAL_BUDGET:.0f}; "
                        f"rehearsal {REHEARSAL_TOTAL_BUDGET:.0f})")
    p.add_argument("--stage-budget", action="append", default=[], metavar="NAME=SECONDS",
                   help="another budget for one stage (repeatable)")
    p.add_argument("--test-file", default=GPU_TEST_FILE, help="the tests stage's file (default %(default)s)")
    p.add_argument("--suite-files", nargs="+", default=None,
                   help="the suite stage's test files (default: every tests/test_*.py but the GPU ones; "
                        f"rehearsal: {' '.join(REHEARSAL_SUITE)})")
    p.add_argument("--jobs", type=int, default=0, help="parallel test processes (default from the CPU count)")
    p.add_argument("--child", nargs=2, metavar=("WHAT", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _stage_budgets(args: argparse.Namespace) -> Dict[str, Optional[float]]:
    budgets = dict(REHEARSAL_BUDGETS if args.rehearse else BUDGETS)
    for item in args.stage_budget:
        name, _, value = item.partition("=")
        if name not in STAGES:
            raise SystemExit(f"--stage-budget: unknown stage {name!r}; stages: {', '.join(STAGES)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"--stage-budget {item!r}: SECONDS must be a number") from None
    return budgets


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        what, out_json = args.child
        return CHILDREN[what](out_json, args.rehearse)
    budget = args.budget
    if budget is None:
        text = os.environ.get(BUDGET_ENV, "").strip()
        try:
            budget = float(text) if text else (REHEARSAL_TOTAL_BUDGET if args.rehearse else TOTAL_BUDGET)
        except ValueError:
            raise SystemExit(f"{BUDGET_ENV} must be a number of seconds, got {text!r}") from None
    if budget <= RESERVE_S:
        raise SystemExit(f"the budget must exceed {RESERVE_S:.0f} s, got {budget:g}")
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_report"))
    report = Report(out, args.rehearse, sys.executable, budget, _stage_budgets(args),
                    test_file=args.test_file, suite_files=args.suite_files, jobs=args.jobs)
    if args.previous:
        if not args.stage:
            raise SystemExit("--previous goes with --stage (a whole run starts a new report)")
        if not os.path.isfile(os.path.join(args.previous, STATE)):
            raise SystemExit(f"--previous {args.previous}: no {STATE} there")
        if os.path.realpath(args.previous) != os.path.realpath(out):
            shutil.copytree(args.previous, out, dirs_exist_ok=True)
    report.load(fresh=not args.stage)
    stages = [s for s in STAGES if s in args.stage] if args.stage else list(STAGES)
    report.log(f"GPU report ({'CPU rehearsal' if args.rehearse else 'GPU'}) into {out}: stages "
               f"{', '.join(stages)}, budget {budget:.0f} s")

    def terminated(signum, frame):  # e.g. an outer `timeout`: stop the children, keep what was written
        for p in list(RUNNING):
            p._signal(signal.SIGKILL)
        for info in report.state.get("stages", {}).values():
            if info.get("status") == "running":
                info.update(status="out of time", error=f"the report was stopped (signal {signum})")
        report.save()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    rc = report.run(stages)
    print(f"\n{_read(report.path(SUMMARY))}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
