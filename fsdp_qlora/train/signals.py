"""Preemption: SIGTERM / SIGUSR1 ask the job to finish its step, checkpoint and exit.

SLURM sends SIGTERM before a preemption or at the time limit (and SIGUSR1 where a job asks
for it with --signal); torchrun forwards SIGTERM to its workers. The handler only sets a flag:
the loop sums it over the ranks with the step's loss (train/loop.py `_StepSums`: one all-reduce,
started as backward ends) and checks the sum after the optimizer step, so every rank saves the
same step together.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "try again later". The run saved a checkpoint; rerunning the
# same command (or a requeued job) resumes from it.
EXIT_PREEMPTED = 75
# The run aborted after too many consecutive non-finite losses (last good state saved).
EXIT_DIVERGED = 3

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is written; carries the process exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
