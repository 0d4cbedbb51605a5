"""Graceful preemption: SIGTERM / SIGINT stop training at a step boundary with a checkpoint.

Schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job;
a person presses Ctrl-C (SIGINT).  While ``Trainer.fit`` runs, the first such
signal only raises a flag: every rank finishes the step it is in, the ranks
agree on the stop through one small all-reduce per step (a rank that got no
signal learns of it there, so all of them stop after the *same* step), the
checkpoint is written collectively, the step to resume from is printed, and
the process exits with ``EXIT_PREEMPTED`` (75, sysexits' EX_TEMPFAIL: "try
again").  A second signal aborts at once (exit 128 + signal number) without a
new checkpoint; the previous one stays intact because saves are atomic.

Launchers deliver one request more than once: torchrun forwards the signal it
gets to workers that the terminal or SLURM already signalled.  Signals within
``DUPLICATE_WINDOW_S`` of the first therefore count as the same request.

The same per-step all-reduce carries rank 0's "time to save" decision for
``train.save_interval_minutes`` (clocks differ between hosts: rank 0 decides).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
DUPLICATE_WINDOW_S = 1.0
HANDLED = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Decision:
    stop: bool = False  # some rank got SIGTERM/SIGINT: save and stop after this step
    save: bool = False  # rank 0's clock says a time-based checkpoint is due
    signal_name: str = ""


class StopRequest:
    """Installs the handlers (main thread only) for the duration of a ``with`` block."""

    def __init__(self, rank: int = 0, verbose: bool = True):
        self.rank, self.verbose = rank, verbose
        self.signum: int | None = None
        self.first_at = 0.0
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------ handlers
    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.first_at = signum, now
            if self.verbose and self.rank == 0:
                _say(f"mtnlg train: {name} received: finishing the current step, then saving a checkpoint "
                     f"(send it again to abort at once without saving)")
        elif now - self.first_at >= DUPLICATE_WINDOW_S:
            _say(f"mtnlg train: second {name}: aborting now without a checkpoint "
                 f"(the last completed checkpoint is intact)")
            os._exit(128 + signum)

    def abort_on_next_signal(self) -> None:
        """From now on a further signal kills the process at once, even inside a
        blocking collective or file write (Python handlers would wait for it):
        called right before the final save, after the duplicate window."""
        if not self._previous:
            return
        wait = self.first_at + DUPLICATE_WINDOW_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)

    # ------------------------------------------------------------ agreement
    def poll(self, device: torch.device, save_due: bool = False) -> Decision:
        """Every rank calls this after each step (collective when distributed)."""
        local = self.signum or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
            flags = torch.tensor([local, int(save_due)], dtype=torch.int64, device=dev)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, save = (int(x) for x in flags.tolist())
        else:
            signum, save = local, save_due
        name = signal.Signals(signum).name if signum else ""
        return Decision(stop=bool(signum), save=bool(save), signal_name=name)


def _say(text: str) -> None:
    """Write from a signal handler: os.write cannot re-enter a buffered stream."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
