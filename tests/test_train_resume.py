"""Preemption, checkpoint history and many nodes, with real processes and real signals (CPU, gloo).

A run is stopped by SIGTERM, SIGUSR1 or SIGINT mid-epoch (and at an epoch's end); it finishes the step,
saves, exits by the signal, and ``--resume`` then repeats the uninterrupted run's losses exactly. Under
torchrun one rank alone gets the signal and both stop after the same step. A damaged ``last.pth``
makes ``--resume`` fall back to the checkpoint before it; an unreadable file named explicitly is a
one-line error. Two torchrun "nodes" (c10d rendezvous on localhost) train as one process does.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_train import (
    EXAMPLES,
    ROOT,
    STEP_COLUMNS,
    SUMMARY_COLUMNS,
    read_csv,
    run_train,
    subprocess_env,
    tiny_args,
)

from qna_vit.training import train_cli
from qna_vit.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_newest,
    save_rotating,
)
from qna_vit.training.distributed import DistInfo
from qna_vit.training.preemption import STOP_SIGNALS, StopAgreement, StopRequest

# 6 steps per epoch, 2 epochs; checkpoints every 4 steps and at each epoch's end; every step logged.
COMMON = ["--log-interval", "1", "--ckpt-interval", "4", "--model-ema", "--model-ema-decay", "0.9"]
# torchrun runs: the same images and augmentations as one process with the same global batch.
DIST = ["--log-interval", "1", "--mixup", "0", "--cutmix", "0", "--drop-path", "0"]
SLOW = ["--debug-step-delay", "0.4"]  # slow enough to be signalled mid-run

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert run_train(tiny_args(out, *COMMON))["steps"] == 12
    return out


def assert_same_run(a, b, tensors=("model", "ema")):
    assert read_csv(a / "steps.csv", STEP_COLUMNS) == read_csv(b / "steps.csv", STEP_COLUMNS)
    assert read_csv(a / "summary.csv", SUMMARY_COLUMNS) == read_csv(b / "summary.csv", SUMMARY_COLUMNS)
    ca, cb = load_checkpoint(str(a)), load_checkpoint(str(b))
    assert ca["step"] == cb["step"]
    for key in tensors:
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), (key, name)


def logged_steps(out):
    path = out / "steps.csv"
    return len(read_csv(path, ("step",))) if path.is_file() else 0


def wait_for_steps(proc, out, n, timeout=180):
    deadline = time.monotonic() + timeout
    while logged_steps(out) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no progress"
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(*launcher_args):
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(EXAMPLES / "train.py")]


def child_pids(pid):
    """(pid, RANK) of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(entry), int(env.get(b"RANK", b"-1"))))
    return found


def kill_tree(proc):
    """SIGKILLs a launcher and the processes it started (torchrun starts its workers in new sessions)."""
    if proc.poll() is not None:
        return
    for pid, _ in child_pids(proc.pid) if os.path.isdir("/proc") else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.communicate()


# ----------------------------------------------------------------------------------- checkpoint files
def test_history_keeps_the_newest_and_load_newest_skips_what_does_not_load(tmp_path):
    def state(step):
        return {"model": {"w": torch.full((2,), float(step))}, "step": step}

    previous = None
    for step in (2, 4, 6, 8):
        save_rotating(state(step), str(tmp_path), step, keep=3, previous_step=previous)
        previous = step
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000004.pth", "checkpoint-00000006.pth", "last.pth"]
    assert [load_checkpoint(str(tmp_path / f))["step"] for f in sorted(os.listdir(tmp_path))] == [4, 6, 8]

    # Continuing from step 4 abandons 6 and 8: the next save at 6 drops the old checkpoint-6.
    save_rotating(state(6), str(tmp_path), 6, keep=3, previous_step=None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000004.pth", "last.pth"]
    save_rotating(state(8), str(tmp_path), 8, keep=1, previous_step=6)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]

    for step in (10, 12):
        save_rotating(state(step), str(tmp_path), step, keep=3, previous_step=step - 2)
    (tmp_path / "last.pth").write_bytes((tmp_path / "last.pth").read_bytes()[:100])  # truncated
    ckpt, path, skipped = load_newest(str(tmp_path), required=("model", "step"))
    assert ckpt["step"] == 10 and path == str(tmp_path / "checkpoint-00000010.pth")
    assert [os.path.basename(p) for p, _ in skipped] == ["last.pth"]
    assert skipped[0][1].startswith("RuntimeError: PytorchStreamReader failed"), skipped
    with pytest.raises(CheckpointError, match=r"^cannot use checkpoint .*last\.pth: RuntimeError: \S.*$"):
        load_newest(str(tmp_path / "last.pth"))
    with pytest.raises(CheckpointError, match="not a training checkpoint .no optimizer"):
        load_newest(str(tmp_path / "checkpoint-00000010.pth"), required=("model", "optimizer"))
    (tmp_path / "checkpoint-00000010.pth").write_bytes(b"")
    (tmp_path / "checkpoint-00000008.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*: last\.pth \(.*checkpoint-00000008"):
        load_newest(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_newest(str(tmp_path / "empty"))
    with pytest.raises(SystemExit):  # a path that does not exist is a usage error, before anything runs
        train_cli.parse_args(tiny_args(tmp_path / "out", "--resume", str(tmp_path / "missing")))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- signals
def test_stop_request_records_signals_and_a_second_ctrl_c_interrupts():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with StopRequest() as request:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second, different signal changes nothing
        assert request.signum == signal.SIGUSR1
        agreement = StopAgreement(request, DistInfo(1, 0, 0, torch.device("cpu"), None))
        assert agreement.poll() and agreement.signum == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    with StopRequest() as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; this gives it one
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


@pytest.mark.parametrize(
    "sig, whole_group",
    [(signal.SIGTERM, True), (signal.SIGUSR1, False), (signal.SIGINT, True)],
    ids=["SIGTERM-group", "SIGUSR1", "SIGINT-group"],
)
def test_a_signal_mid_epoch_saves_exits_by_it_and_resume_repeats_the_run(reference, tmp_path, sig, whole_group):
    # whole_group: the signal goes to the process group, loader processes included, as Ctrl-C and
    # SLURM send it; the loaders must survive it for the step in flight to finish (torch's own
    # SIGTERM handler in a loader process ends it).
    out = tmp_path / "run"
    argv = tiny_args(out, *COMMON, *SLOW, "--workers", "2" if whole_group else "0")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "train.py"), *argv],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_steps(proc, out, 2)
        sent = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == -sig, stderr[-3000:]  # died of the signal, as without a handler
    assert took < 20, took  # one step (0.4 s of it asleep) and a checkpoint
    name = signal.Signals(sig).name
    m = re.search(rf"^{name} received: stopping after step (\d+) \(epoch 1, batch \d of 6\)", stdout, re.M)
    assert m, stdout[-3000:]
    step = int(m.group(1))
    assert 2 <= step < 6
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (
        f"stopped by {name} after step {step}: checkpoint {out / 'last.pth'}; continue with the same "
        f"command and --resume {out}"
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == step and not ckpt["epoch_end_pending"]
    assert logged_steps(out) == step
    assert not (out / "summary.json").exists()  # marks a finished run only

    assert run_train(tiny_args(out, *COMMON, "--resume", str(out)))["steps"] == 12
    assert_same_run(out, reference)


def test_a_signal_during_an_evaluation_stops_the_run_after_it(reference, tmp_path, monkeypatch, capsys):

    evaluate = train_cli.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_cli, "evaluate", signalled)
    out = tmp_path / "run"
    summary = run_train(tiny_args(out, *COMMON))
    monkeypatch.undo()
    assert summary["stopped_by"] == "SIGUSR1" and summary["steps"] == 6  # no step after the evaluation
    text = capsys.readouterr().out
    assert "SIGUSR1 received: stopping after step 6 (epoch 1, batch 6 of 6), its checkpoint written already" in text
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 6 and not ckpt["epoch_end_pending"]
    assert len(read_csv(out / "summary.csv", SUMMARY_COLUMNS)) == 1
    assert run_train(tiny_args(out, *COMMON, "--resume", str(out)))["steps"] == 12
    assert_same_run(out, reference)


def test_a_signal_after_an_epochs_last_step_evaluates_that_epoch_on_resume(reference, tmp_path):
    # The signal (this process's own SIGTERM, through the handler) arrives after step 6, the first
    # epoch's last: the run saves without evaluating, and the resumed run evaluates epoch 1 first.
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    summary = run_train(tiny_args(out, *COMMON, "--debug-signal-after-step", "6"))
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 6
    assert load_checkpoint(str(out))["epoch_end_pending"] is True
    assert not (out / "summary.csv").exists() or not read_csv(out / "summary.csv", SUMMARY_COLUMNS)
    assert run_train(tiny_args(out, *COMMON, "--resume", str(out)))["steps"] == 12
    assert_same_run(out, reference)


# ----------------------------------------------------------------------------------- checkpoint history
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(reference, tmp_path, capsys):
    out = tmp_path / "run"
    # Saves at steps 4, 6 (epoch end), 8 and 10 (the --max-steps end); three are kept.
    assert run_train(tiny_args(out, *COMMON, "--max-steps", "10"))["steps"] == 10
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".pth")
    assert names == ["best.pth", "checkpoint-00000006.pth", "checkpoint-00000008.pth", "last.pth"]
    last = out / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a full disk, a killed copy
    capsys.readouterr()

    # Named explicitly, an unreadable file is a one-line error, for train.py and eval.py alike.
    eval_argv = ["--synthetic", "--workers", "0", "--device", "cpu", "--bench-steps", "0"]
    for cmd in (
        [str(EXAMPLES / "train.py"), *tiny_args(out, *COMMON, "--resume", str(last))],
        [str(EXAMPLES / "eval.py"), "--checkpoint", str(last), *eval_argv],
    ):
        proc = subprocess.run(
            [sys.executable, *cmd], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.fullmatch(
            rf"error: cannot use checkpoint {re.escape(str(last))}: RuntimeError: PytorchStreamReader failed[^\n]*",
            proc.stderr.strip(),
        ), proc.stderr[-3000:]

    # A run folder: eval.py and --resume take the newest readable checkpoint, naming the one skipped.
    from qna_vit.training import eval_cli

    result = eval_cli.run(["--checkpoint", str(out), *eval_argv, "--threads", "1"])
    err = capsys.readouterr().err
    assert re.search(rf"^warning: skipped checkpoint {re.escape(str(last))}: RuntimeError: ", err, re.M), err
    assert result["checkpoint"] == str(out / "checkpoint-00000008.pth")

    assert run_train(tiny_args(out, *COMMON, "--resume", str(out)))["steps"] == 12
    text = capsys.readouterr().out
    assert re.search(rf"^warning: skipped checkpoint {re.escape(str(last))}: RuntimeError: ", text, re.M), text
    assert f"resuming from {out / 'checkpoint-00000008.pth'} (step 8), the newest readable checkpoint" in text
    assert_same_run(out, reference)
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".pth")
    assert names == ["best.pth", "checkpoint-00000006.pth", "checkpoint-00000008.pth", "last.pth"]


# ----------------------------------------------------------------------------------- many processes
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two torchrun launchers, one process each, meeting through a c10d rendezvous on localhost."""
    out = tmp_path_factory.mktemp("two_nodes")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *torchrun(
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--node_rank",
                    str(node),
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"localhost:{port}",
                    "--rdzv-id",
                    "qna-test",
                ),
                *tiny_args(out, *DIST, batch=8),
            ],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            kill_tree(p)
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    return out, "".join(stdout for stdout, _ in results)


def test_two_nodes_train_as_one_process_with_the_same_global_batch(two_nodes, tmp_path):
    out, stdout = two_nodes
    assert stdout.count("processes: 2 (gloo)") == 1 and "global batch 16 = 8 x 2 process(es)" in stdout
    assert run_train(tiny_args(tmp_path / "one", *DIST, batch=16))["steps"] == 12
    one = read_csv(tmp_path / "one" / "steps.csv", ("step", "loss", "lr"))
    two = read_csv(out / "steps.csv", ("step", "loss", "lr"))
    assert len(one) == len(two) == 12
    for (s1, l1, lr1), (s2, l2, lr2) in zip(one, two):
        assert s1 == s2 and lr1 == lr2
        # Only the summation order differs (the gradient all-reduce).
        assert float(l1) == pytest.approx(float(l2), rel=1e-4, abs=1e-5)
    v1 = read_csv(tmp_path / "one" / "summary.csv", ("top1", "val_loss"))
    v2 = read_csv(out / "summary.csv", ("top1", "val_loss"))
    assert len(v1) == len(v2) == 2
    for (t1, vl1), (t2, vl2) in zip(v1, v2):
        assert float(t1) == pytest.approx(float(t2), abs=1e-6) and float(vl1) == pytest.approx(float(vl2), rel=1e-4)


@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_torchrun_a_signal_stops_every_rank_after_the_same_step_and_resume_is_exact(two_nodes, tmp_path, target):
    # rank 1: SIGUSR1 to it alone (rank 0 learns of it through the all-reduce). launcher: SIGTERM to
    # torchrun, which forwards it to both ranks, each at its own moment.
    if not os.path.isdir("/proc/self"):
        pytest.skip("finds the ranks' processes through /proc")
    reference, _ = two_nodes  # an uninterrupted two-process run of the same configuration
    sig = signal.SIGUSR1 if target == "rank 1" else signal.SIGTERM
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*torchrun("--standalone", "--nproc_per_node=2"), *tiny_args(out, *DIST, *SLOW, batch=8)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_steps(proc, out, 2)
        ranks = dict((rank, pid) for pid, rank in child_pids(proc.pid))
        assert sorted(ranks) == [0, 1], ranks
        sent = time.monotonic()
        os.kill(ranks[1] if target == "rank 1" else proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=90)
        took = time.monotonic() - sent
    finally:
        kill_tree(proc)  # only where it is still running (ranks blocked in a collective)
    assert proc.returncode != 0  # torchrun reports its workers' deaths by the signal as a failure
    assert took < 30, took
    m = re.search(
        rf"^{sig.name} received \(on rank {'1' if target == 'rank 1' else '[01]'}\): stopping after step (\d+)",
        stdout,
        re.M,
    )
    assert m, stdout[-3000:] + stderr[-3000:]
    step = int(m.group(1))
    assert 2 <= step < 6
    for rank in (0, 1):
        assert f"[rank {rank}] stopping after step {step} ({sig.name})" in stderr, stderr[-3000:]
    assert load_checkpoint(str(out))["step"] == step == logged_steps(out)

    proc = subprocess.run(
        [*torchrun("--standalone", "--nproc_per_node=2"), *tiny_args(out, *DIST, "--resume", str(out), batch=8)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, reference, tensors=("model",))
