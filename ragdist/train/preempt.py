"""Preemption: a signal asks for a checkpoint at the next step boundary, then an exit a batch system requeues.

SLURM sends SIGTERM (or, with `#SBATCH --signal=B:USR1@120`, SIGUSR1 ahead of time) to the job's
processes; each rank records it here and the training loop — after all ranks agree at a step
boundary — writes a checkpoint and raises `Preempted`. Entry points turn that into
`REQUEUE_EXIT_CODE`, on which a batch script can run `scontrol requeue $SLURM_JOB_ID`; the requeued
run resumes with `trainer.resume=auto`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: EX_TEMPFAIL from sysexits.h: "try again later" — the run checkpointed and wants to be requeued.
REQUEUE_EXIT_CODE = 75

#: The signals that mean "checkpoint and leave".
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption signal; `checkpoint` holds its state."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"preempted at step {step}; checkpoint: {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class PreemptionHandler:
    """Records preemption signals while installed; the previous handlers come back on exit.

    Handlers only set a flag: checkpointing from inside a signal handler would interrupt a
    collective halfway on one rank and deadlock the others.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: checkpointing at the next step boundary", self.received.name)

    def __enter__(self) -> PreemptionHandler:
        # Python only lets the main thread install handlers; elsewhere (e.g. a notebook thread)
        # preemption is simply not handled.
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
