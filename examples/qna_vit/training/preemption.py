"""Stopping a training run cleanly when the scheduler asks.

Clusters announce a kill with a signal and a grace period: SIGTERM (Kubernetes, ``scancel``, torchrun
forwarding its own), SIGUSR1 (SLURM's ``--signal=USR1@120``) or SIGINT (Ctrl-C). :class:`StopRequest`
turns those into a flag; the training loop polls it after every optimizer step through
:class:`StopAgreement`, which makes every process of a ``torchrun`` group stop after the same step (a
process that stopped alone would leave the others blocked in their next gradient all-reduce).

After the checkpoint is written, :func:`exit_by_signal` ends the process by the same signal with the
default action, so the exit status is the one the scheduler or shell would have seen without the
handler (128 + the signal number: 143 SIGTERM, 130 SIGINT, 138 SIGUSR1).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from qna_vit.training.distributed import DistInfo

STOP_SIGNALS: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: loader processes ignore the stop signals.

    A scheduler signals every process of a job (SLURM) and Ctrl-C the whole foreground process group;
    a loader process that died of it would make the main process fail with "DataLoader worker exited
    unexpectedly" in the very step it is trying to finish. The main process ends its workers itself.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """A context manager that, while active, records SIGTERM/SIGINT/SIGUSR1 instead of dying of them.

    A second SIGINT raises :class:`KeyboardInterrupt` at once (a user who presses Ctrl-C twice does not
    want to wait for the step); repeated SIGTERMs or SIGUSR1s (torchrun forwarding what SLURM also sent
    directly) change nothing. Outside the main thread, where Python cannot install handlers, it does
    nothing.
    """

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class StopAgreement:
    """Whether to stop after this step, the same answer on every process of the group.

    One process polls :class:`StopRequest` directly. In a group, each call all-reduces (max) this
    process's signal number and rank with one step of lag: the reduction launched after step k is read
    after step k + 1, so every rank reads the same value after the same step, and waiting for it never
    waits for the step just queued. On a GPU the flag is filled in on the device and the result copied
    into pinned memory right behind the reduction, in stream order: reading it synchronises with step k
    and the reduction only, while step k + 1 runs. :meth:`close` completes the reduction still in
    flight, which every rank launched, so none is left waiting in it.
    """

    def __init__(self, request: StopRequest, info: DistInfo) -> None:
        self.request = request
        self.info = info
        self.signum: Optional[int] = None  # the agreed signal, once agreed
        self.source_rank: Optional[int] = None  # the highest rank that received it
        self._work: Any = None
        self._cuda = info.enabled and info.device.type == "cuda"
        self._buf = torch.zeros(2, dtype=torch.int64, device=info.device) if info.enabled else None
        # A blocking host-to-device copy would wait for the queued steps: the device buffer is filled
        # by kernels, and read back through pinned memory and an event.
        self._host = torch.zeros(2, dtype=torch.int64).pin_memory() if self._cuda else None
        self._event = torch.cuda.Event() if self._cuda else None

    def poll(self) -> bool:
        """Called by every rank after every step; True when all ranks are to stop now."""
        if self.signum is not None:
            return True
        if not self.info.enabled:
            if self.request.signum is not None:
                self.signum, self.source_rank = self.request.signum, 0
            return self.signum is not None
        agreed = None
        if self._work is not None:
            if self._cuda:
                self._event.synchronize()
                agreed = self._host.tolist()
            else:
                self._work.wait()
                agreed = self._buf.tolist()
        signalled = self.request.signum is not None
        self._buf[0].fill_(self.request.signum or 0)
        self._buf[1].fill_(self.info.rank + 1 if signalled else 0)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, async_op=True)
        if self._cuda:
            self._work.wait()  # on a GPU: the current stream waits for the reduction, the host does not
            self._host.copy_(self._buf, non_blocking=True)
            self._event.record()
        if agreed is not None and agreed[0] > 0:
            self.signum, self.source_rank = int(agreed[0]), int(agreed[1]) - 1
            return True
        return False

    def close(self) -> None:
        """Completes the reduction in flight (every rank must call it, at the same point)."""
        if self._work is not None:
            self._work.wait()
            if self._cuda:
                self._event.synchronize()
            self._work = None


def exit_by_signal(signum: int) -> None:
    """Ends this process by ``signum`` with its default action (after flushing output)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # Only reached where the signal is blocked: the shell's convention for death by a signal.
    raise SystemExit(128 + signum)
