"""``scripts/gpu_report.sh --rehearse``: every stage end to end on the CPU, the file limits of what a GPU
session brings back, a stage made to fail and one made to run out of time while the later stages still
run, ``--stage`` reruns merging into the same report (brought along with ``--previous``), and the ingest into
a scratch repository.

One rehearsal (about a minute on 2 cores) serves every test: the tests stage is pointed at a missing
file (it fails), the benchmarks stage gets 6 seconds (it runs out of time); both are then rerun with
``--stage``, so each stage also runs as it does on a GPU.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_report.sh"
STAGES = ("environment", "tests", "benchmarks", "autotune", "suite")


def _run(out: Path, *args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_REPORT_BUDGET", "PYTEST_ADDOPTS")}
    env.update(PYTHON=sys.executable, OUT=str(out))
    return subprocess.run(
        ["bash", str(SCRIPT), "--rehearse", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _stage_rows(summary: str) -> dict:
    """``{stage: (status, first error)}`` from summary.md's stage table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in STAGES:
            rows[cells[0]] = (cells[1], cells[5])
    return rows


def _files(out: Path) -> list:
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    first = _run(out, "--test-file", "tests/no_such_test_file.py", "--stage-budget", "benchmarks=6")
    broken = {
        "rc": first.returncode,
        "summary": (out / "summary.md").read_text(),
        "state": json.loads((out / "report.json").read_text()),
        "stdout": first.stdout + first.stderr,
    }
    # the rerun on "another machine": a fresh OUT, the earlier report brought along with --previous
    rerun = tmp_path_factory.mktemp("gpu_report_rerun")
    again = _run(rerun, "--stage", "tests", "--stage", "benchmarks", "--previous", str(out))
    return rerun, broken, again


def test_a_failed_and_a_timed_out_stage_do_not_stop_the_later_ones(rehearsal):
    out, broken, _ = rehearsal
    rows = _stage_rows(broken["summary"])
    assert set(rows) == set(STAGES), broken["stdout"][-3000:]
    assert rows["environment"][0] == "ok"
    assert rows["tests"][0] == "failed" and "no_such_test_file" in rows["tests"][1]
    assert rows["benchmarks"][0] == "out of time"
    assert rows["autotune"][0] == "ok", broken["summary"]
    assert broken["rc"] == 1  # not every stage ok
    assert "--stage tests" in broken["summary"] and "--stage benchmarks" in broken["summary"]
    assert "--stage autotune" not in broken["summary"]
    # the suite ran its file to the end after both; its status is that of the file's tests
    suite = broken["state"]["suite"]
    assert suite and all(r["status"] in ("ok", "failed") and r.get("passed", 0) > 0 for r in suite.values()), suite
    expected = "ok" if all(r["status"] == "ok" for r in suite.values()) else "failed"
    assert rows["suite"][0] == expected and ("--stage suite" in broken["summary"]) == (expected != "ok")


def test_rerun_stages_merge_into_the_same_report(rehearsal):
    out, broken, again = rehearsal
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]  # the stages it ran are ok
    summary = (out / "summary.md").read_text()
    rows = _stage_rows(summary)
    assert all(rows[s][0] == "ok" for s in STAGES if s != "suite"), summary
    state = json.loads((out / "report.json").read_text())
    # the stages not rerun kept their results
    assert state["stages"]["suite"] == broken["state"]["stages"]["suite"]
    assert state["environment"] == broken["state"]["environment"]
    assert state["stages"]["tests"]["counts"].get("skipped", 0) >= 30  # marked gpu: skipped on a CPU
    table = {e["window"]: e for e in state["bench"]["table"]}
    assert set(table) == {3, 7, 15, 31}
    assert all(e["fwd_bwd_ms"] > 0 and e["x_paper_eager"] > 0 for e in table.values())
    assert state["launch_overhead"]["fwd_us"] > 0
    assert "CPU rehearsal" in summary and "--stage tests" not in summary and "--stage benchmarks" not in summary
    rows_file = (out / "bench_rows.jsonl").read_text().splitlines()
    assert rows_file and all(json.loads(r)["mode"] == "smoke: not a measurement" for r in rows_file)


def test_output_stays_within_the_devices_limits(rehearsal):
    out, _, _ = rehearsal
    files = _files(out)
    assert 0 < len(files) <= 8, files
    assert all(len(f.parts) <= 3 for f in files), files  # OUT/a/b/file at the deepest
    assert {"summary.md", "report.json", "report.log", "tests.log", "suite.log", "bench_rows.jsonl"} <= {
        str(f) for f in files
    }


def test_ingest_into_a_scratch_repository(rehearsal, tmp_path):
    from benchmarks import ingest
    from qna_triton import tuning

    out, _, _ = rehearsal
    returned = tmp_path / "returned"
    shutil.copytree(out, returned)
    # a config file as the autotuner writes it (the rehearsal only prints the plan): its merge is checked
    key = "kernel=fwd;dtype=bfloat16;window=3x3;stride=1x1;heads=16;head_dim=8;queries=2;bucket=65536"
    entry = {
        "config": {"block_p": 16, "block_h": 16, "num_warps": 4, "num_stages": 1},
        "heuristic": {"block_p": 8, "block_h": 16, "num_warps": 4, "num_stages": 1},
        "time_ms": 1.0,
        "heuristic_time_ms": 1.5,
    }
    device_key = json.loads((out / "report.json").read_text())["device_key"]
    tuning.write_config_file(returned / "autotune" / f"{device_key}.json", {"gpu_name": "cpu"}, {key: entry})
    repo = tmp_path / "repo"
    (repo / "qna_triton" / "configs").mkdir(parents=True)
    readme = (REPO / "README.md").read_text()
    assert ingest.START in readme and ingest.END in readme
    (repo / "README.md").write_text(readme)

    with pytest.raises(SystemExit, match="rehearsal"):  # never into this checkout
        ingest.ingest(str(returned))
    ingest.ingest(str(returned), str(repo))
    results = repo / "benchmarks" / "results" / device_key
    for name in ("rows.jsonl", "results.csv", "results.md", "summary.md", "gpu_report.md", "gpu_report.json"):
        assert (results / name).is_file(), name
    table = tuning.read_config_file(repo / "qna_triton" / "configs" / f"{device_key}.json")
    assert list(table.raw_entries) == [key]
    text = (repo / "README.md").read_text()
    block = text.split(ingest.START)[1].split(ingest.END)[0]
    assert "CPU rehearsal: not a measurement" in block and ingest.NO_RESULTS not in block
    state = json.loads((out / "report.json").read_text())
    assert state["gpu"] in block and state["environment"]["date"][:10] in block
    assert "| 31 |" in block
    assert text.split(ingest.START)[0] == readme.split(ingest.START)[0]  # the rest of the README untouched
    assert text.split(ingest.END)[1] == readme.split(ingest.END)[1]
    # a second ingest merges the rows instead of duplicating them
    n_rows = len((results / "rows.jsonl").read_text().splitlines())
    ingest.ingest(str(returned), str(repo))
    assert len((results / "rows.jsonl").read_text().splitlines()) == n_rows


def test_pytest_output_parsing():
    """Counts from pytest's summary line, or from its verbose lines when it was stopped before it; the
    first line naming a failure."""
    from benchmarks.gpu_report import first_error, pytest_counts

    done = "x\n==== 1 failed, 13 passed, 28 deselected, 5 warnings in 9.10s (0:00:09) ====\n"
    assert pytest_counts(done) == {"failed": 1, "passed": 13, "deselected": 28}
    assert pytest_counts("==== 2 errors in 0.1s ====") == {"errors": 2}
    stopped = (
        "tests/test_gpu.py::test_a[x-1] PASSED [ 10%]\ntests/test_gpu.py::test_b FAILED [ 20%]\n"
        "tests/test_gpu.py::test_c "
    )
    assert pytest_counts(stopped) == {"passed": 1, "failed": 1}
    text = "$ python -m pytest\nE   AssertionError: boom\nFAILED tests/x.py::t - AssertionError: boom\n"
    assert first_error(text) == "FAILED tests/x.py::t - AssertionError: boom"
    assert first_error("ERROR: file or directory not found: tests/nope.py\n").startswith("ERROR: file")


def test_rocm_smi_is_recorded_or_said_absent(tmp_path, monkeypatch):
    """Where nvidia-smi is missing (an AMD machine), the environment stage records rocm-smi's product,
    driver and clocks, or that rocm-smi is absent; nothing is changed on the device."""
    from benchmarks.gpu_report import children, summary

    monkeypatch.setenv("PATH", str(tmp_path))
    assert children._rocm_smi() == {"error": "rocm-smi is absent"}
    fake = tmp_path / "rocm-smi"
    fake.write_text(
        '#!/bin/sh\necho \'{"card0": {"Card Series": "AMD Instinct MI300X", "sclk clock speed:": '
        '"(2100Mhz)"}, "system": {"Driver version": "6.10.5"}}\'\n'
    )
    fake.chmod(0o755)
    smi = children._rocm_smi()
    assert smi == {"driver_version": "6.10.5", "Card Series": "AMD Instinct MI300X", "sclk clock speed:": "(2100Mhz)"}
    line = summary.environment_line({"gpu": "AMD Instinct MI300X", "nvidia_smi": {"error": "absent"}, "rocm_smi": smi})
    assert "rocm-smi: sclk clock speed: (2100Mhz)" in line
