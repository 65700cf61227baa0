"""One sweep point as a SLURM job (submitit): run its trainer command, keep its books.

`PointTask(point)` is what the slurm launcher submits; submitit pickles it and calls it
on the node. It does for one point what the local launcher does: skip it when
`summary.json` exists, append the trainer's output to `point/log.txt` (task `r` > 0 of a
multi-task point: `point/log.task<r>.txt`), and write `point/failed.json` when the run
fails. The trainer is a child process that inherits SLURM's environment, so a point of
several tasks (`--slurm_ntasks_per_point`) is one multi-process jax run.

Preemption. The job is submitted with `--signal=USR1@90` and submitit listens for
SIGUSR1 (SUBMITIT_PREEMPT_SIGNAL). On that signal submitit calls `checkpoint()`, which
hands the signal to the trainer, waits while it saves a checkpoint and exits, and
returns this same task for submitit to requeue; the requeued job reruns the trainer,
which resumes from that checkpoint. SIGTERM (`scancel`, or a scheduler preempting with
PreemptMode=CANCEL or REQUEUE) also makes the trainer save and exit 75, but the task
does not requeue the job itself: SLURM decides (REQUEUE restarts it, and it resumes);
otherwise the point's failed.json says to rerun the sweep, which resumes it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any

import submitit

from experiments.sweeps.plan import (FAILED_FILE, LOG_FILE, SUMMARY_FILE, SweepPoint,
                                     record_failure)

# The trainer's exit status after a stop signal (experiments/training/preemption.py);
# repeated here so that this module does not import jax.
PREEMPTED_EXIT = 75
PREEMPT_SIGNAL = "USR1"


def log_path(point_dir: str, rank: int) -> str:
  """The log file of task `rank` of a point (rank 0: `log.txt`)."""
  return os.path.join(point_dir, LOG_FILE if rank == 0 else f"log.task{rank}.txt")


class PointTask(submitit.helpers.Checkpointable):
  """Runs one sweep point's trainer command; returns {name, status, returncode, ...}.

  status is 'ok', 'failed' (failed.json written) or 'done_before'.
  """

  def __init__(self, point: SweepPoint, cwd: str):
    self.point = point
    self.cwd = cwd
    self._child: subprocess.Popen | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {"point": self.point, "cwd": self.cwd}  # never the running child

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.point, self.cwd, self._child = state["point"], state["cwd"], None

  def __call__(self) -> dict[str, Any]:
    rank = submitit.JobEnvironment().global_rank
    directory = self.point.directory
    result = {"name": self.point.name, "rank": rank, "host": socket.gethostname()}
    if os.path.exists(os.path.join(directory, SUMMARY_FILE)):
      return {**result, "status": "done_before", "returncode": 0, "elapsed_s": 0.0}
    os.makedirs(directory, exist_ok=True)
    if rank == 0 and os.path.exists(os.path.join(directory, FAILED_FILE)):
      os.unlink(os.path.join(directory, FAILED_FILE))  # this attempt gets a fresh verdict
    started = time.time()
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
           if "SLURM_ARRAY_TASK_ID" in env else env.get("SLURM_JOB_ID", "?"))
    with open(log_path(directory, rank), "ab") as log:
      log.write((f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} "
                 f"(job {job}, task {rank}): "
                 f"{self.point.command}\n").encode())
      log.flush()
      self._child = subprocess.Popen(self.point.argv, cwd=self.cwd, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
      returncode = self._child.wait()
    elapsed = round(time.time() - started, 3)
    ok = returncode == 0 and os.path.exists(os.path.join(directory, SUMMARY_FILE))
    if not ok and rank == 0:
      reason = ("stopped by a signal after saving a checkpoint (exit status 75); rerun the "
                "sweep to resume" if returncode == PREEMPTED_EXIT else "")
      record_failure(directory, returncode, command=self.point.command, elapsed_s=elapsed,
                     reason=reason)
    return {**result, "status": "ok" if ok else "failed", "returncode": returncode,
            "elapsed_s": elapsed}

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Called by submitit on the preemption signal (task 0 only): lets the trainer save
    and exit, then returns this task to be requeued."""
    del args, kwargs
    child = self._child
    if child is not None and child.returncode is None:
      try:
        os.kill(child.pid, getattr(signal, "SIG" + PREEMPT_SIGNAL))
        # Reaped here, not with child.wait(): the interrupted wait() in __call__ holds
        # the Popen's lock. The save ends the trainer within seconds.
        os.waitpid(child.pid, 0)
      except (ProcessLookupError, ChildProcessError):
        pass  # it had exited already
    return submitit.helpers.DelayedSubmission(PointTask(self.point, self.cwd))
