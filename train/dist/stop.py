"""A stop request: SIGUSR1 or SIGTERM (SLURM's warning before the time limit, a preemption, the
local launcher passing on Ctrl-C) asks every rank to stop where it can resume from.

The signal only sets a flag on the rank that got it; ranks agree on it in a collective
(`StopRequest.check`), called by every rank at the same points: after an optimizer step, between
validation batches, before an export, between evaluation batches. So the period stops wherever
it is, not only between optimizer steps: at 8B a validation pass, an export or the evaluation of
windows 0..t can outlast the warning, and the job would be killed with nothing saved. Where it
stops decides what is saved first (train/loop/trainer.py, train/evaluation/evaluator.py); the process then exits
with EXIT_REQUEUE (train/common/exit_codes.py).
"""

from __future__ import annotations

import os
import signal
import time

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Tests: points where rank 0 sends itself SIGUSR1, e.g. "train:5" (before micro-batch 5 of the
# period) or "eval:1:0" (before batch 0 of window 1's evaluation), comma-separated.
FAULT_POINTS = "PESO_FAULT_SIGNAL_AT"


class StopRequested(Exception):
    """Every rank agreed to stop; raised once what must be saved at that point is saved."""


class StopRequest:
    def __init__(self, strategy):
        self.strategy = strategy
        self.signalled = False  # this rank got a signal
        self._faults = {p for p in os.environ.get(FAULT_POINTS, "").split(",") if p}

    def fault_point(self, where: str) -> None:
        """Rank 0 signals itself here if the tests asked for it (FAULT_POINTS): a real signal
        through the real handler, at a point a test can name."""
        if where in self._faults and self.strategy.is_rank0:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not self.signalled and time.monotonic() < deadline:  # Python runs the handler between bytecodes
                time.sleep(0.01)

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        """Whether any rank got a signal (collective: every rank calls it at the same point)."""
        return self.strategy.any(self.signalled)

    def check(self) -> None:
        """Raise StopRequested where nothing needs saving first (collective, like `agreed`)."""
        if self.agreed():
            raise StopRequested()
