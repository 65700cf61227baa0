"""The stop-signal bookkeeping of experiments/training/preemption.py, in this process.

The end-to-end paths (a trainer process that saves, exits 75 and resumes bit-identical;
a SLURM job requeued by `scancel --signal=USR1`) are in test_faults.py and test_slurm.py.
"""
import os
import signal
import time

import pytest

from experiments.training import preemption


@pytest.mark.parametrize("signum", preemption.STOP_SIGNALS)
def test_stop_signals_record_the_first_signal_and_restore_handlers(signum):
  before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
  with preemption.StopSignals() as stop:
    boundary = preemption.StepBoundary(stop, every_minutes=0)
    assert boundary.poll() == (False, False)
    os.kill(os.getpid(), signum)
    other = [s for s in preemption.STOP_SIGNALS if s != signum][0]
    os.kill(os.getpid(), other)  # a second, different signal does not replace the first
    for _ in range(100):  # Python runs the handler at the next bytecode boundary
      if stop.received:
        break
      time.sleep(0.001)
    assert stop.received == signum and stop.name == signal.Signals(signum).name
    assert boundary.poll() == (False, True)
    assert boundary.signame == signal.Signals(signum).name
  assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before


def test_wall_clock_checkpoints_are_due_after_the_period(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
  boundary = preemption.StepBoundary(preemption.StopSignals(), every_minutes=10)
  now[0] += 599.0
  assert boundary.poll() == (False, False)
  now[0] += 1.0
  assert boundary.poll() == (True, False)
  boundary.saved()
  assert boundary.poll() == (False, False)
  off = preemption.StepBoundary(preemption.StopSignals(), every_minutes=0)
  now[0] += 1e6
  assert off.poll() == (False, False)


def test_preempted_message_says_how_to_resume():
  e = preemption.Preempted(7, "SIGTERM", "/w/checkpoints")
  assert str(e) == ("stopped by SIGTERM at step 7; checkpoint saved in /w/checkpoints; "
                    "rerun the same command to resume from it")
  assert preemption.PREEMPTED_EXIT == 75
