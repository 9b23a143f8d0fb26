"""Stop signals: what SLURM (SIGUSR1 with `--signal`, SIGTERM) and submitit (SIGUSR2) send before a
time limit or a preemption. Handlers only set a flag; the trainer acts on it at a step boundary
(saving inside a handler can deadlock with the collectives and the DataLoader)."""

from __future__ import annotations

import signal

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class StopFlag:
    """Set by any stop signal; `arm()` (re)installs the handlers, e.g. after a trainer put its own."""

    def __init__(self):
        self.signal_name: str | None = None
        self.arm()

    def arm(self) -> None:
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For DataLoader workers: SLURM signals every process of a step, and the main process decides."""
    for name in STOP_SIGNALS + ("SIGINT",):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
