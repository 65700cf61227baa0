"""The local launcher: runs a sweep's points as subprocesses, at most N at a time.

A point is skipped when its `summary.json` exists (so a rerun only runs what is left),
when another sweep holds its claim, or when it failed in another sweep since this one
started (that failure is this sweep's answer too; rerun later to retry it). A failed
point gets `failed.json` and the sweep carries on.

A point that refers to other points (`grid.ref`, staged runs) starts once they have a
`summary.json`; while they are pending or running (here or in another sweep) the next
ready point runs instead, and when one of them failed the point fails without running.

Accelerators: each of the `parallel` run slots gets its own share of this machine's GPUs
(`CUDA_VISIBLE_DEVICES`; `--parallel=N` with N GPUs pins one point per GPU), and when
more slots than GPUs share one, `XLA_PYTHON_CLIENT_PREALLOCATE=false`, so that the runs
on one GPU do not each try to reserve 75% of its memory (jax's default).

Why a pool of our own rather than submitit's LocalExecutor: the local launcher has to
cap the number of concurrent runs, start a staged point only once the points it
refers to are done, share a workdir with a second sweep through claims, and pin GPUs
per slot; LocalExecutor starts every submitted job at once and does none of these.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from typing import IO, Callable, Mapping, Sequence

from experiments.sweeps import locks
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
  slot: int = 0


def local_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
  """This machine's GPUs as `CUDA_VISIBLE_DEVICES` entries: the ones that variable
  already lists, else one per `nvidia-smi -L` line, else none. Never imports jax (which
  would take GPU memory in the launcher itself)."""
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU"))]


def slot_environments(parallel: int, gpus: Sequence[str]) -> list[dict[str, str]]:
  """The environment variables each of `parallel` run slots sets for its runs.

  One slot (or no GPU): nothing. Up to one slot per GPU: the GPUs are dealt out, slot i
  gets every GPU j with j % parallel == i. More slots than GPUs: slot i gets GPU
  i % len(gpus) and, since it shares it, XLA_PYTHON_CLIENT_PREALLOCATE=false.
  """
  if parallel == 1 or not gpus:
    return [{} for _ in range(parallel)]
  if parallel <= len(gpus):
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i::parallel])} for i in range(parallel)]
  return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)],
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"} for i in range(parallel)]


def run_local(points: Sequence[SweepPoint], *, parallel: int = 1,
              echo: Callable[[str], None] = print, poll_s: float = 0.05,
              gpus: Sequence[str] | None = None) -> Tally:
  """Runs every point not already done; returns the tally. Interrupts kill the runs.

  `gpus` (default: `local_gpus()`) are dealt out to the run slots, see
  `slot_environments`."""
  if parallel < 1:
    raise ValueError(f"parallel={parallel} must be >= 1")
  slot_env = slot_environments(parallel, local_gpus() if gpus is None else gpus)
  free_slots = list(range(parallel))
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
          slot = free_slots.pop(0)
          try:
            running.append(_start(point, slot, slot_env[slot]))
          except BaseException:
            free_slots.append(slot)
            raise
          pinned = slot_env[slot].get("CUDA_VISIBLE_DEVICES")
          say(point, f"start {point.name}" + (f" on GPU {pinned}" if pinned else ""))
          continue
        outcome, reason = skip
        getattr(tally, outcome).append(point.name)
        say(point, f"skip  {point.name}: {reason}")
      for run in [r for r in running if r.proc.poll() is not None]:
        running.remove(run)
        free_slots.append(run.slot)
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
      owner = locks.read(directory[name])
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
  acquired, owner = locks.acquire(point.directory)
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
    locks.release(point.directory)
  return skip


def _start(point: SweepPoint, slot: int, env: Mapping[str, str]) -> _Running:
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
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})
  except BaseException:
    locks.release(point.directory)
    raise
  run = _Running(point, proc, log, time.time(), slot)
  try:
    locks.set_child(point.directory, proc.pid)
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
  locks.release(directory)
  return ok


def _stop(run: _Running) -> None:
  run.proc.terminate()
  try:
    run.proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    run.proc.kill()
    run.proc.wait()
  run.log.close()
  locks.release(run.point.directory)
