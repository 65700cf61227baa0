"""The local launcher: runs a sweep's points as subprocesses, at most N at a time.

A point is skipped when its `summary.json` exists (so a rerun only runs what is left),
when another sweep holds its claim, or when it failed in another sweep since this one
started (that failure is this sweep's answer too; rerun later to retry it). A failed
point gets `failed.json` and the sweep carries on.

A point that refers to other points (`grid.ref`, staged runs) starts once they have a
`summary.json`; while they are pending or running (here or in another sweep) the next
ready point runs instead, and when one of them failed the point fails without running.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from typing import IO, Callable, Sequence

from experiments.sweeps import claims
from experiments.sweeps.plan import (FAILED_FILE, LOG_FILE, SUMMARY_FILE, SweepPoint,
                                  record_failure)


@dataclasses.dataclass
class Tally:
  """Point names by outcome of one `run_local` call.

  `elsewhere`: claimed by another sweep, or failed in one while this sweep ran.
  """
  ok: list[str] = dataclasses.field(default_factory=list)
  done_before: list[str] = dataclasses.field(default_factory=list)
  elsewhere: list[str] = dataclasses.field(default_factory=list)
  failed: list[str] = dataclasses.field(default_factory=list)

  def summary_line(self, elapsed_s: float) -> str:
    """`4 ok, 3 skipped (2 done before, 1 left to another sweep), 1 failed in 9.1s`."""
    skipped = len(self.done_before) + len(self.elsewhere)
    return (f"{len(self.ok)} ok, {skipped} skipped ({len(self.done_before)} done before, "
            f"{len(self.elsewhere)} left to another sweep), {len(self.failed)} failed "
            f"in {elapsed_s:.1f}s")


@dataclasses.dataclass
class _Running:
  point: SweepPoint
  proc: subprocess.Popen
  log: IO[bytes]
  started: float


def run_local(points: Sequence[SweepPoint], *, parallel: int = 1,
              echo: Callable[[str], None] = print, poll_s: float = 0.05) -> Tally:
  """Runs every point not already done; returns the tally. Interrupts kill the runs."""
  if parallel < 1:
    raise ValueError(f"parallel={parallel} must be >= 1")
  sweep_started = time.time()
  tally = Tally()
  pending = list(points)
  running: list[_Running] = []

  def say(point: SweepPoint, text: str) -> None:
    clock = time.time() - sweep_started
    echo(f"[{point.index + 1}/{len(points)}] {text}  (sweep {clock:.1f}s)")

  try:
    while pending or running:
      while pending and len(running) < parallel:
        point, missing = _next_ready(pending, running, points)
        if point is None:
          break  # every pending point waits for a stage still running
        pending.remove(point)
        if missing:
          tally.failed.append(point.name)
          say(point, f"FAILED {point.name}: needs {missing}, which did not finish "
                     "(rerun the sweep to retry)")
          continue
        skip = _skip(point, sweep_started)
        if skip is None:
          running.append(_start(point))
          say(point, f"start {point.name}")
          continue
        outcome, reason = skip
        getattr(tally, outcome).append(point.name)
        say(point, f"skip  {point.name}: {reason}")
      for run in [r for r in running if r.proc.poll() is not None]:
        running.remove(run)
        elapsed = time.time() - run.started
        ok = _finish(run, elapsed)
        (tally.ok if ok else tally.failed).append(run.point.name)
        outcome = "done " if ok else "FAILED"
        detail = "" if ok else f", see {os.path.join(run.point.directory, LOG_FILE)}"
        say(run.point, f"{outcome} {run.point.name} in {elapsed:.1f}s "
                       f"(rc={run.proc.returncode}{detail})")
      if running:
        time.sleep(poll_s)
  finally:
    for run in running:  # only non-empty when interrupted
      _stop(run)
  return tally


def _next_ready(pending: list[SweepPoint], running: list[_Running],
                points: Sequence[SweepPoint]) -> tuple[SweepPoint | None, str]:
  """The first pending point whose referenced points are done, with '' — or one of
  them that cannot finish, with its name; (None, '') when all wait."""
  directory = {p.name: p.directory for p in points}
  waiting = {p.name for p in pending} | {r.point.name for r in running}
  for point in pending:
    if os.path.exists(os.path.join(point.directory, SUMMARY_FILE)):
      return point, ""  # done before: _skip says so, whatever its stages' state
    missing = ""
    ready = True
    for name in point.requires:
      if os.path.exists(os.path.join(directory[name], SUMMARY_FILE)):
        continue
      owner = claims.read(directory[name])
      if name in waiting or (owner is not None and not owner.is_stale()):
        ready = False  # still to run, here or in another sweep
      else:
        missing = name
    if missing:
      return point, missing
    if ready:
      return point, ""
  return None, ""


def _skip(point: SweepPoint, sweep_started: float) -> tuple[str, str] | None:
  """Claims the point and returns None, or (Tally field, why this sweep leaves it)."""
  summary = os.path.join(point.directory, SUMMARY_FILE)
  done = ("done_before", f"done before ({SUMMARY_FILE} exists)")
  if os.path.exists(summary):
    return done
  acquired, owner = claims.acquire(point.directory)
  if not acquired:
    who = owner.describe() if owner else "an unreadable claim file"
    return "elsewhere", f"claimed by {who}"
  # Re-check under the claim: another sweep may have finished it just before.
  failed = os.path.join(point.directory, FAILED_FILE)
  skip = None
  if os.path.exists(summary):
    skip = done
  elif os.path.exists(failed) and os.path.getmtime(failed) >= sweep_started:
    skip = ("elsewhere", "failed in another sweep while this one ran (rerun to retry)")
  if skip:
    claims.release(point.directory)
  return skip


def _start(point: SweepPoint) -> _Running:
  try:
    failed = os.path.join(point.directory, FAILED_FILE)
    if os.path.exists(failed):
      os.unlink(failed)  # from an earlier attempt; this one gets a fresh verdict
    log = open(os.path.join(point.directory, LOG_FILE), "ab")
    header = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
              f"{point.command}\n")
    log.write(header.encode())
    log.flush()
    proc = subprocess.Popen(point.argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
  except BaseException:
    claims.release(point.directory)
    raise
  run = _Running(point, proc, log, time.time())
  try:
    claims.set_child(point.directory, proc.pid)
  except BaseException:  # e.g. SIGTERM right here: the caller never sees this run
    _stop(run)
    raise
  return run


def _finish(run: _Running, elapsed_s: float) -> bool:
  """Closes the run's books; True when it succeeded."""
  run.log.close()
  directory = run.point.directory
  ok = run.proc.returncode == 0 and os.path.exists(os.path.join(directory, SUMMARY_FILE))
  if not ok:
    record_failure(directory, run.proc.returncode, command=run.point.command,
                   elapsed_s=round(elapsed_s, 3))
  claims.release(directory)
  return ok


def _stop(run: _Running) -> None:
  run.proc.terminate()
  try:
    run.proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    run.proc.kill()
    run.proc.wait()
  run.log.close()
  claims.release(run.point.directory)
