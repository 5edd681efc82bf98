"""The stages and the report's state (``report.json``): each stage runs its children and records what they wrote."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .procs import Mirror, Proc, run_one, run_parallel
from .pytest_log import _append, _read, first_error, pytest_counts
from .settings import (
    AUTOTUNE_DIR,
    BENCH_RUNS,
    GPU_TEST_FILE,
    HEADLINE_SUITE,
    LOG,
    MAX_FILES,
    MIN_SUITE_S,
    NOT_IN_SUITE,
    PEERS,
    REHEARSAL_SUITE,
    REPO,
    RESERVE_S,
    ROWS,
    STAGES,
    STATE,
    SUITE_LOG,
    SUMMARY,
    TESTS_LOG,
    now,
)
from .summary import (
    _within_limits,
    autotune_line,
    bench_line,
    counts_line,
    environment_line,
    files_under,
    summary_markdown,
)


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
                raise SystemExit(
                    f"{self.out} holds a {old.get('mode')} report; this run is a {mode} one "
                    f"({'drop' if self.rehearse else 'add'} --rehearse, or use another OUT)"
                )
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
            self.log(
                f"stage {name}: {info['status']} in {info['seconds']:.0f} s"
                + (f": {info['error']}" if info.get("error") else "")
            )
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
            p = run_one(
                pytest + ["--collect-only", "-q", self.test_file],
                coll,
                self.env(),
                min(deadline, time.monotonic() + 60),
            )
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
            procs = [
                Proc(pytest + ["-v", "-rA", *s], os.path.join(tmp, f"shard{j}.log"), self.env(OMP_NUM_THREADS="2"))
                for j, s in enumerate(shards)
            ]
            results = []

            def done(pr: Proc) -> None:
                t = _read(pr.log)
                results.append((pr, t))
                _append(
                    log,
                    f"{self.test_file} shard {procs.index(pr)}: exit {pr.rc}"
                    + (" (stopped: out of time)" if pr.timed_out else ""),
                    t,
                )

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
            info.update(
                status="out of time",
                error=(
                    f"shard {', '.join(map(str, late))} stopped at the budget"
                    if late
                    else f"{unstarted} shards not started"
                )
                + (f"; first failure: {first_error(failed[0][1])}" if failed and not failed[0][0].timed_out else ""),
            )
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
                cmd = [
                    self.python,
                    "-m",
                    "benchmarks",
                    "--suite",
                    HEADLINE_SUITE,
                    "--windows",
                    *map(str, windows),
                    "--providers",
                    *providers,
                    "--out",
                    work,
                    "--compile-mode",
                    "default",
                    # the harness stops starting measurements there; the hard stop comes later
                    "--time-budget",
                    f"{max(1.0, left - self.margin):.0f}",
                ]
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
            info.update(
                status="failed",
                error=f"qna_triton {ours_bad[0]['pass']} k={ours_bad[0]['window']}: {ours_bad[0]['status']}",
            )
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
            files = (
                list(REHEARSAL_SUITE)
                if self.rehearse
                else sorted(
                    os.path.join("tests", f)
                    for f in os.listdir(os.path.join(REPO, "tests"))
                    if f.startswith("test_") and f.endswith(".py")
                )
            )
        files = [f for f in files if f not in NOT_IN_SUITE and f != self.test_file]
        log = self.path(SUITE_LOG)
        per_file: Dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            procs = [
                Proc(
                    [self.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f],
                    os.path.join(tmp, os.path.basename(f) + ".log"),
                    self.env(OMP_NUM_THREADS="2"),
                )
                for f in files
            ]

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


def bench_data(rows_path: str) -> dict:
    """Key numbers of the headline rows: per window our times and the peers' ratios (peer / ours)."""
    from ..report import derive, read_rows

    if not os.path.isfile(rows_path) or not os.path.getsize(rows_path):
        return {}
    rows, meta = derive(read_rows([rows_path]))
    ok = {
        (r["provider"], r["pass"], r.get("window")): r
        for r in rows
        if r.get("suite") == HEADLINE_SUITE and r.get("status") == "ok" and r.get("p50_ms")
    }
    table = []
    for k in sorted({r.get("window") for r in rows if r.get("suite") == HEADLINE_SUITE and r.get("window")}):
        ours_fb, ours_f = ok.get(("qna_triton", "fwd+bwd", k)), ok.get(("qna_triton", "fwd", k))
        entry = {"window": k}
        if ours_f:
            entry.update(
                fwd_ms=ours_f["p50_ms"],
                fwd_gb_s=ours_f.get("gb_s"),
                fwd_pct_copy=ours_f.get("pct_copy"),
                fwd_extra_mb=ours_f.get("extra_mb"),
            )
        if ours_fb:
            entry.update(fwd_bwd_ms=ours_fb["p50_ms"], fwd_bwd_extra_mb=ours_fb.get("extra_mb"))
            for peer in PEERS:
                r = ok.get((peer, "fwd+bwd", k))
                if r:
                    entry[f"x_{peer}"] = r["p50_ms"] / ours_fb["p50_ms"]
                    if r.get("extra_mb") and ours_fb.get("extra_mb"):
                        entry[f"mem_x_{peer}"] = r["extra_mb"] / ours_fb["extra_mb"]
        table.append(entry)
    not_ok = [
        {k: r.get(k) for k in ("provider", "pass", "window", "status")}
        for r in rows
        if r.get("suite") == HEADLINE_SUITE and r.get("status") != "ok"
    ]
    return {
        "rows": len(rows),
        "smoke": meta["smoke"],
        "copy_gb_s": meta.get("copy_large_gb_s"),
        "table": table,
        "rows_not_ok": not_ok,
    }


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
            entries.append(
                {
                    "key": key,
                    "heuristic_ms": v["heuristic_time_ms"],
                    "tuned_ms": v["time_ms"],
                    "speedup": v["heuristic_time_ms"] / v["time_ms"],
                }
            )
    meta = data.get("metadata", {})
    out = {
        "file": f"{AUTOTUNE_DIR}/{files[0]}",
        "entries": entries,
        "skipped": len(data.get("skipped", {})),
        "complete": meta.get("complete"),
        "gpu_name": meta.get("gpu_name"),
    }
    if entries:
        out["geomean"] = statistics.geometric_mean([e["speedup"] for e in entries])
        for kernel in ("fwd", "bwd_delta", "bwd"):
            s = [e["speedup"] for e in entries if e["key"].startswith(f"kernel={kernel};")]
            if s:
                out[f"geomean_{kernel}"] = statistics.geometric_mean(s)
    return out
