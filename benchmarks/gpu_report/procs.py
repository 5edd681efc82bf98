"""Child processes under a deadline: start, stop (SIGINT, then SIGKILL after a grace period), run in parallel."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .settings import GRACE_S, REPO

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
            self.popen = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True
            )

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


def run_parallel(
    procs: Sequence[Proc],
    deadline: float,
    jobs: int,
    on_tick: Optional[Callable[[], None]] = None,
    on_done: Optional[Callable[[Proc], None]] = None,
) -> None:
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


def run_one(
    cmd: List[str], log: str, env: Dict[str, str], deadline: float, on_tick: Optional[Callable[[], None]] = None
) -> Proc:
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
