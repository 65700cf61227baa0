"""Stopping a run cleanly when the scheduler asks, and wall-clock checkpoints.

A cluster scheduler announces the end of a job with a signal: SLURM sends SIGTERM when
it preempts or cancels a job, and the signal named by `sbatch --signal=SIG@SECONDS`
(here SIGUSR1) that long before the time limit; `scancel --signal=USR1 JOB` sends it
by hand. `StopSignals` records such a signal in its handler and does nothing else
there; the training loop asks `StepBoundary.poll` after every step whether to save a
checkpoint and whether to stop. A run that stops this way saves at that step boundary
and exits with `PREEMPTED_EXIT`, so rerunning the same command resumes from it and
ends bit-identical to a run that was never stopped.

Multi-process runs must take the same decision at the same step on every process (an
orbax save is collective), so the flags of all processes are combined by an all-gather
at each boundary: one process that got the signal stops them all.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
  """Raised by the training loop after it saved a checkpoint because of a stop signal."""

  def __init__(self, step: int, signame: str, checkpoint_dir: str):
    super().__init__(f"stopped by {signame} at step {step}; checkpoint saved in "
                     f"{checkpoint_dir}; rerun the same command to resume from it")
    self.step = step
    self.signame = signame


class StopSignals:
  """Records SIGTERM / SIGUSR1 while active (a context manager); restores the previous
  handlers on exit. Outside the main thread, where Python cannot install handlers, it
  records nothing."""

  def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
    self._signals = tuple(signals)
    self._previous: dict[int, object] = {}
    self.received: int | None = None

  def _handler(self, signum, frame) -> None:
    del frame
    if self.received is None:
      self.received = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  @property
  def name(self) -> str:
    """The received signal's name, e.g. 'SIGUSR1' ('' when none)."""
    return signal.Signals(self.received).name if self.received else ""


class StepBoundary:
  """Decides, at each step boundary, whether to save on the clock and whether to stop.

  `every_minutes` > 0 asks for a checkpoint when that much wall time has passed since
  the last save (or the start). Both decisions are combined over processes.
  """

  def __init__(self, stop: StopSignals, *, every_minutes: float):
    self._stop = stop
    self._period_s = 60.0 * every_minutes
    self._last_save = time.monotonic()

  def saved(self) -> None:
    """Restarts the wall-clock period (call after every checkpoint)."""
    self._last_save = time.monotonic()

  def poll(self) -> tuple[bool, bool]:
    """(save now for the clock, stop now), the same on every process."""
    due = bool(self._period_s) and time.monotonic() - self._last_save >= self._period_s
    stop = self._stop.received is not None
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.array([due, stop], np.int32))
      due, stop = (bool(v) for v in np.asarray(flags).reshape(-1, 2).max(axis=0))
    return due, stop

  @property
  def signame(self) -> str:
    """The stop signal's name on this process ('a stop signal on another process' when
    only another process received one)."""
    return self._stop.name or "a stop signal on another process"
