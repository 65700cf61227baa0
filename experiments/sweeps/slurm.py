"""The slurm launcher: a sweep as one SLURM job array, submitted and followed by submitit.

Each point is one array task running `task.PointTask` (its trainer command, its log and
failure record). A point of several tasks (`ntasks_per_point`) is one multi-process jax
run: every task runs the trainer, and jax finds the coordinator from SLURM's
environment. Jobs are submitted requeueable with `--signal=USR1@90`, so a run about to
hit its time limit, or signalled with `scancel --signal=USR1`, saves a checkpoint and is
requeued to resume from it (see task.py).

Before anything is submitted, `check_request` compares the request with what `sinfo`
reports (the partition exists; the tasks, CPUs and GPUs of a point fit its nodes; the
time fits its limit) and raises LauncherError with the reason. Nothing in the workdir
is written before that check.

Following the jobs: submitit reads a job's result from its folder (`DIR/slurm/<job>`)
and asks `sacct` for job states. On a cluster without accounting storage (no sacct)
a job that left `squeue` without a result is taken as failed (killed, node lost); the
point's `failed.json` then says so, with the tail of submitit's log.

Rerunning the same command resumes: points with `summary.json` are skipped, points whose
job (recorded in `point/slurm_job.json`) is still queued or running are followed rather
than submitted again, and the rest are submitted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import submitit

from experiments.sweeps.local import Tally
from experiments.sweeps.plan import LOG_FILE, SUMMARY_FILE, SweepPoint, record_failure
from experiments.sweeps.task import PREEMPT_SIGNAL, PointTask
from experiments.training.results import write_json_atomic

JOB_FILE = "slurm_job.json"
SUBMITIT_DIR = "slurm"
SIGNAL_BEFORE_LIMIT_S = 90
# Options with a flag of their own, or that the launcher sets itself.
_RESERVED = {"partition", "time", "cpus_per_task", "gpus_per_task", "ntasks",
             "ntasks_per_node", "array", "signal", "output", "error", "job_name", "requeue",
             "wrap"}
_FLAG_NAMES = {"slurm_partition", "slurm_time", "slurm_cpus_per_task", "slurm_gpus_per_task"}
_LEFT_QUEUE_GRACE_S = 10.0  # a job just finished may leave squeue before its result shows


class LauncherError(Exception):
  """A request the cluster cannot run, or a missing SLURM installation."""


@dataclasses.dataclass(frozen=True)
class SlurmRequest:
  """What each point's job asks for. `extra` holds any other sbatch option (key with
  underscores, value a string, or True for a bare flag such as `exclusive`)."""
  partition: str = ""  # '' : the cluster's default partition
  time: str = "60"  # minutes, or [D-]HH:MM[:SS]
  cpus_per_task: int = 1
  gpus_per_task: int = 0
  ntasks_per_point: int = 1
  extra: tuple[tuple[str, Any], ...] = ()

  @property
  def nodes(self) -> int:
    return int(dict(self.extra).get("nodes", 1))

  @property
  def minutes(self) -> int:
    return time_minutes(self.time)


def parse_options(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  """`--slurm` values (`KEY=VALUE`, or `KEY` for a bare flag) as (key, value) pairs."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
      raise LauncherError(f"--slurm={item!r}: expected KEY=VALUE with an sbatch option "
                          "name as KEY, e.g. --slurm=mem=16G or --slurm=exclusive")
    if key in _RESERVED:
      raise LauncherError(f"--slurm={item!r}: {key} is set by the launcher"
                          + (f"; use --slurm_{key}" if f"slurm_{key}" in _FLAG_NAMES else ""))
    if key == "nodes" and not (sep and value.isdigit() and int(value) >= 1):
      raise LauncherError(f"--slurm={item!r}: nodes must be a positive integer")
    out[key] = value if sep else True
  return tuple(out.items())


def time_minutes(text: str) -> int:
  """SLURM's time formats (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in whole
  minutes, rounded up. Raises LauncherError on anything else."""
  m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
  if not m:
    raise LauncherError(f"--slurm_time={text!r}: use minutes or [D-]HH:MM[:SS]")
  days, a, b, c = (int(g) if g else None for g in m.groups())
  if days is not None:  # D-H, D-H:M, D-H:M:S
    seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
  elif c is not None:  # H:M:S
    seconds = a * 3600 + b * 60 + c
  elif b is not None:  # M:S
    seconds = a * 60 + b
  else:  # M
    seconds = a * 60
  if seconds <= 0:
    raise LauncherError(f"--slurm_time={text!r} must be positive")
  return -(-seconds // 60)


@dataclasses.dataclass(frozen=True)
class _PartitionInfo:
  name: str
  default: bool
  cpus: int  # the most CPUs of one node
  nodes: int
  gpus: int  # the most GPUs of one node (from its gres)
  limit_min: int | None  # None: infinite


def _run(argv: list[str]) -> str:
  try:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=60).stdout
  except FileNotFoundError:
    raise LauncherError(f"{argv[0]} not found: --launcher=slurm needs SLURM's client "
                        "commands (sbatch, squeue, sinfo) on PATH") from None
  except subprocess.CalledProcessError as e:
    raise LauncherError(f"`{' '.join(argv)}` failed: {e.stderr.strip() or e}") from None


def _gres_gpus(gres: str) -> int:
  total = 0
  for entry in gres.split(","):
    m = re.match(r"gpu(?::[^:(]+)?:(\d+)", entry)
    if m:
      total += int(m.group(1))
  return total


def partitions() -> dict[str, _PartitionInfo]:
  """The cluster's partitions as `sinfo` reports them."""
  info: dict[str, _PartitionInfo] = {}
  for line in _run(["sinfo", "-h", "-o", "%P|%c|%D|%G|%l"]).splitlines():
    parts = line.strip().split("|")
    if len(parts) != 5:
      continue
    name, cpus, nodes, gres, limit = parts
    default = name.endswith("*")
    name = name.rstrip("*")
    limit_min = None if limit in ("infinite", "UNLIMITED") else time_minutes(limit)
    cpus_n = int(re.sub(r"\D.*", "", cpus) or 0)
    old = info.get(name)
    info[name] = _PartitionInfo(
        name, default or (old.default if old else False), max(cpus_n, old.cpus if old else 0),
        int(nodes) + (old.nodes if old else 0), max(_gres_gpus(gres), old.gpus if old else 0),
        limit_min)
  return info


def check_request(request: SlurmRequest) -> _PartitionInfo:
  """Raises LauncherError unless every point's job can run on the cluster."""
  for tool in ("sbatch", "squeue", "sinfo", "scontrol"):
    if shutil.which(tool) is None:
      raise LauncherError(f"{tool} not found: --launcher=slurm needs SLURM's client "
                          "commands on PATH (see the README to start a one-node cluster)")
  for name, value, low in [("--slurm_cpus_per_task", request.cpus_per_task, 1),
                           ("--slurm_gpus_per_task", request.gpus_per_task, 0),
                           ("--slurm_ntasks_per_point", request.ntasks_per_point, 1)]:
    if value < low:
      raise LauncherError(f"{name}={value} must be >= {low}")
  minutes = request.minutes
  parts = partitions()
  if request.partition:
    if request.partition not in parts:
      raise LauncherError(f"--slurm_partition={request.partition!r} is not a partition of "
                          f"this cluster; sinfo lists {sorted(parts)}")
    part = parts[request.partition]
  else:
    defaults = [p for p in parts.values() if p.default]
    if not defaults:
      raise LauncherError(f"this cluster has no default partition; choose one of "
                          f"{sorted(parts)} with --slurm_partition")
    part = defaults[0]
  nodes = request.nodes
  if nodes > part.nodes:
    raise LauncherError(f"--slurm=nodes={nodes}: partition {part.name!r} has {part.nodes} "
                        "node(s)")
  if request.ntasks_per_point % nodes:
    raise LauncherError(f"--slurm_ntasks_per_point={request.ntasks_per_point} must be a "
                        f"multiple of nodes={nodes} (tasks are spread evenly)")
  per_node = request.ntasks_per_point // nodes
  if per_node * request.cpus_per_task > part.cpus:
    raise LauncherError(
        f"a point needs {per_node} task(s) x {request.cpus_per_task} CPU(s) on one node, "
        f"but the nodes of partition {part.name!r} have at most {part.cpus} CPUs "
        f"(lower --slurm_ntasks_per_point or --slurm_cpus_per_task, or add --slurm=nodes=N)")
  if per_node * request.gpus_per_task > part.gpus:
    raise LauncherError(
        f"a point needs {per_node * request.gpus_per_task} GPU(s) on one node, but the "
        f"nodes of partition {part.name!r} have {part.gpus} (their gres)")
  if part.limit_min is not None and minutes > part.limit_min:
    raise LauncherError(f"--slurm_time={request.time} ({minutes} min) exceeds partition "
                        f"{part.name!r}'s limit of {part.limit_min} min")
  return part


def make_executor(workdir: str, request: SlurmRequest, job_name: str) -> submitit.SlurmExecutor:
  """A submitit executor for the request; its files go to `workdir/slurm/<job id>/`."""
  executor = submitit.SlurmExecutor(folder=os.path.join(os.path.abspath(workdir),
                                                        SUBMITIT_DIR, "%j"))
  extra = dict(request.extra)
  nodes = int(extra.pop("nodes", 1))
  params: dict[str, Any] = {
      "job_name": job_name,
      "time": request.minutes,
      "nodes": nodes,
      "ntasks_per_node": request.ntasks_per_point // nodes,
      "cpus_per_task": request.cpus_per_task,
      # submitit's handler listens for the same signal SLURM sends before the limit.
      "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
      "additional_parameters": {"signal": f"{PREEMPT_SIGNAL}@{SIGNAL_BEFORE_LIMIT_S}",
                                "requeue": True, **extra},
  }
  if request.partition:
    params["partition"] = request.partition
  if request.gpus_per_task:
    params["gpus_per_task"] = request.gpus_per_task
  executor.update_parameters(**params)
  return executor


# ------------------------------------------------------------------ submitting, following


def _job_record(point: SweepPoint) -> dict[str, Any] | None:
  try:
    with open(os.path.join(point.directory, JOB_FILE)) as f:
      record = json.load(f)
    return record if isinstance(record, dict) and "job_id" in record else None
  except (OSError, ValueError):
    return None


def queued_job_ids() -> set[str]:
  """Ids (`123`, `123_4` for array tasks) of this user's jobs that squeue lists."""
  out = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"])
  return {line.strip() for line in out.splitlines() if line.strip()}


def attach(point: SweepPoint, record: dict[str, Any]) -> submitit.SlurmJob:
  """The submitit job of an earlier submission of `point`."""
  return submitit.SlurmJob(folder=record["folder"], job_id=str(record["job_id"]),
                           tasks=tuple(range(int(record.get("ntasks", 1)))))


def submit(points: Sequence[SweepPoint], *, workdir: str, request: SlurmRequest,
           cwd: str, echo: Callable[[str], None] = print
           ) -> tuple[list[tuple[SweepPoint, Any]], Tally]:
  """Submits the points not done and not already queued; returns every point to follow
  (new jobs and still-queued earlier ones) and the tally of those skipped."""
  tally = Tally()
  queued = queued_job_ids()
  follow: list[tuple[SweepPoint, Any]] = []
  to_submit: list[SweepPoint] = []
  for point in points:
    if os.path.exists(os.path.join(point.directory, SUMMARY_FILE)):
      tally.done_before.append(point.name)
      echo(f"[{point.index + 1}/{len(points)}] skip  {point.name}: done before "
           f"({SUMMARY_FILE} exists)")
      continue
    record = _job_record(point)
    if record is not None and str(record["job_id"]) in queued:
      echo(f"[{point.index + 1}/{len(points)}] queued {point.name}: job "
           f"{record['job_id']} from an earlier submission")
      follow.append((point, attach(point, record)))
      continue
    to_submit.append(point)
  if to_submit:
    name = "sweep-" + (os.path.basename(os.path.abspath(workdir).rstrip("/")) or "jaxquant")
    executor = make_executor(workdir, request, name)
    with executor.batch():
      jobs = [executor.submit(PointTask(p, cwd)) for p in to_submit]
    folder = os.path.join(os.path.abspath(workdir), SUBMITIT_DIR, "%j")
    for point, job in zip(to_submit, jobs):
      os.makedirs(point.directory, exist_ok=True)
      write_json_atomic(os.path.join(point.directory, JOB_FILE), {
          "job_id": job.job_id, "folder": folder, "ntasks": request.ntasks_per_point,
          "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
      echo(f"[{point.index + 1}/{len(points)}] submit {point.name}: job {job.job_id}")
      follow.append((point, job))
  return follow, tally


def wait(follow: Sequence[tuple[SweepPoint, Any]], total: int, tally: Tally, *,
         echo: Callable[[str], None] = print, poll_s: float = 1.0) -> Tally:
  """Waits for every followed job, printing a line as each point finishes."""
  started = time.time()
  pending = list(follow)
  left_queue: dict[str, float] = {}
  while pending:
    queued = queued_job_ids()
    for point, job in list(pending):
      with _stderr_to_devnull():  # sacct's own 'accounting storage is disabled' line
        finished = job.done()
      if not finished and str(job.job_id) not in queued:
        first = left_queue.setdefault(str(job.job_id), time.time())
        if time.time() - first < _LEFT_QUEUE_GRACE_S:
          continue
      elif not finished:
        continue
      pending.remove((point, job))
      ok, text = _outcome(point, job, finished)
      (tally.ok if ok else tally.failed).append(point.name)
      echo(f"[{point.index + 1}/{total}] {text}  (sweep {time.time() - started:.1f}s)")
    if pending:
      time.sleep(poll_s)
  return tally


def _outcome(point: SweepPoint, job: Any, finished: bool) -> tuple[bool, str]:
  """(ok, progress text) of a finished job; records the failure when the task could
  not (the job raised, or left the queue without a result)."""
  log = os.path.join(point.directory, LOG_FILE)
  if finished:
    try:
      results = job.results()
    except Exception as e:  # pylint: disable=broad-except
      record_failure(point.directory, 1, command=point.command, job_id=job.job_id,
                     reason=f"the job raised: {_last_line(str(e))}",
                     submitit_log=_tail(job.stderr()))
      return False, f"FAILED {point.name}: job {job.job_id} raised; see {log}"
    result = results[0]
    if result["status"] in ("ok", "done_before"):
      return True, f"done  {point.name} in {result['elapsed_s']:.1f}s (job {job.job_id})"
    return False, (f"FAILED {point.name} (exit status {result['returncode']}, job "
                   f"{job.job_id}); see {log}")
  if os.path.exists(os.path.join(point.directory, SUMMARY_FILE)):
    return True, f"done  {point.name} (job {job.job_id}, no submitit result)"
  record_failure(point.directory, -1, command=point.command, job_id=job.job_id,
                 reason="the job left the queue without a result (cancelled, killed at "
                        "its time limit, or its node failed)",
                 submitit_log=_tail(job.stderr()))
  return False, (f"FAILED {point.name}: job {job.job_id} ended without a result; see "
                 f"{os.path.join(point.directory, 'failed.json')}")


def _tail(text: str | None, lines: int = 30) -> str:
  return "\n".join((text or "").rstrip().splitlines()[-lines:])


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


@contextlib.contextmanager
def _stderr_to_devnull():
  """Silences file descriptor 2 (what subprocesses inherit) for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class _SacctNote(logging.Filter):
  """Drops submitit's repeated 'Bypassing sacct error' warnings on clusters without
  accounting storage (squeue stands in for sacct here); remembers that it saw one."""

  def __init__(self):
    super().__init__()
    self.seen = False

  def filter(self, record: logging.LogRecord) -> bool:
    if "sacct" in record.getMessage():
      self.seen = True
      return False
    return True


def quiet_sacct_warnings() -> _SacctNote:
  """Installs the filter on submitit's logger and returns it."""
  note = _SacctNote()
  logging.getLogger("submitit").addFilter(note)
  return note
