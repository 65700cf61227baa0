"""Runs the sweep a config file declares with `get_sweep()`, one trainer run per point.

    python -m experiments.sweep --config=configs/RECIPE.py[:ARG] --workdir=runs/sweep \
        --parallel=2
    python -m experiments.sweep --config=configs/RECIPE.py[:ARG] --workdir=runs/sweep \
        --launcher=slurm --slurm_partition=gpu --slurm_time=2:00:00 \
        --slurm_gpus_per_task=1 --slurm_ntasks_per_point=2 --slurm=mem=32G
    python -m experiments.report --workdir=runs/sweep

--launcher=local (default) runs the points here as subprocesses, --parallel at a time,
each slot on its own share of the GPUs (see sweeps/local.py); two sweeps started on one
workdir share the points without running any twice. --launcher=slurm submits the points
as one SLURM job array through submitit, then (unless --nowait) follows the jobs,
printing a line as each point finishes (see sweeps/slurm.py). --launcher=print prints the
commands and writes nothing.

With either launcher, rerunning the same command resumes: points with a summary.json are
skipped, failed points are retried (each failure is recorded in the point's failed.json
with its log tail, and the sweep goes on), and with slurm, points whose job is still
queued are followed rather than submitted again. Points that start from another point's
run (`sweeps.ref`, staged training such as 8 -> 4 -> 2 bits) run only with the local
launcher.

Exit status: 0 when every point ran or was done before (or, with --nowait, was
submitted), 1 when a point failed, 2 when the config file, its sweep or a launcher flag
is unusable (nothing is submitted and the workdir is not touched).
"""
from __future__ import annotations

import os
import signal
import sys
import time

from absl import app, flags

from experiments.sweeps import SweepError, build_points, load_sweep
from experiments.sweeps.local import run_local
from experiments.sweeps.plan import DEFAULT_TRAINER, split_config_arg, write_sweep_json

_CONFIG = flags.DEFINE_string("config", None, "Config file defining get_sweep(), FILE[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; one subdir per point "
                               "(required, except with --launcher=print).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "print", "slurm"],
                              "Run here, print the commands, or submit to SLURM.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local launcher: points run at once.",
                                 lower_bound=1)
_TRAINER = flags.DEFINE_string("trainer", DEFAULT_TRAINER,
                               "Module run with `python -m` for each point.")
_NOWAIT = flags.DEFINE_bool("nowait", False, "Slurm launcher: print the job ids and return "
                            "at once instead of following the jobs.")
_PARTITION = flags.DEFINE_string("slurm_partition", "", "Slurm: partition (default: the "
                                 "cluster's default partition).")
_TIME = flags.DEFINE_string("slurm_time", "60", "Slurm: time limit of each point, in "
                            "minutes or [D-]HH:MM[:SS].")
_GPUS = flags.DEFINE_integer("slurm_gpus_per_task", 0, "Slurm: GPUs per task.")
_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", 1, "Slurm: CPUs per task.")
_NTASKS = flags.DEFINE_integer("slurm_ntasks_per_point", 1, "Slurm: tasks (processes) per "
                               "point; > 1 makes each point one multi-process jax run.")
_SLURM = flags.DEFINE_multi_string("slurm", [], "Slurm: any other sbatch option as "
                                   "KEY=VALUE (or KEY for a bare flag), repeatable, e.g. "
                                   "--slurm=mem=16G --slurm=nodes=2 --slurm=qos=high.")
flags.mark_flags_as_required(["config"])


def _err(message: str) -> int:
  print(f"sweep: error: {message}", file=sys.stderr)
  return 2


def _default_print_workdir(config_arg: str) -> str:
  path, arg = split_config_arg(config_arg)
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", stem + (f"_{arg[0]}" if arg else ""))


def main(argv: list[str]) -> int:
  """Plans the sweep and hands it to the chosen launcher; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launcher = _LAUNCHER.value
  workdir = _WORKDIR.value
  if not workdir:
    if launcher != "print":
      return _err(f"--workdir is required with --launcher={launcher}")
    workdir = _default_print_workdir(_CONFIG.value)
  try:
    overrides = load_sweep(_CONFIG.value)
  except SweepError as e:
    return _err(str(e))
  points = build_points(overrides, config_arg=_CONFIG.value, workdir=workdir,
                        trainer=_TRAINER.value)

  if launcher == "print":
    for point in points:
      print(point.command)
    return 0
  if launcher == "slurm":
    return _slurm(points, workdir)

  os.makedirs(workdir, exist_ok=True)
  write_sweep_json(workdir, points, config_arg=_CONFIG.value, trainer=_TRAINER.value)
  # SIGTERM (kill, slurm preemption) unwinds like Ctrl-C: runs are stopped, claims freed.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  print(f"sweep: {len(points)} points in {workdir}, {_PARALLEL.value} at a time", flush=True)
  started = time.time()
  tally = run_local(points, parallel=_PARALLEL.value,
                    echo=lambda line: print(line, flush=True))
  print(f"sweep: {tally.summary_line(time.time() - started)}", flush=True)
  print(f"report: python -m experiments.report --workdir={workdir}")
  return 1 if tally.failed else 0


def _slurm(points, workdir: str) -> int:
  """Checks the request against the cluster, submits, and follows (or not) the jobs."""
  from experiments.sweeps import slurm  # needs submitit: imported only when used

  staged = [p.name for p in points if p.requires]
  if staged:
    return _err(f"{len(staged)} point(s) start from another point's run (e.g. "
                f"{staged[0]}); an array job runs its tasks in any order, so run this "
                "sweep with --launcher=local")
  try:
    request = slurm.SlurmRequest(
        partition=_PARTITION.value, time=_TIME.value, cpus_per_task=_CPUS.value,
        gpus_per_task=_GPUS.value, ntasks_per_point=_NTASKS.value,
        extra=slurm.parse_options(_SLURM.value))
    partition = slurm.check_request(request)
  except slurm.LauncherError as e:
    return _err(str(e))

  note = slurm.quiet_sacct_warnings()
  os.makedirs(workdir, exist_ok=True)
  write_sweep_json(workdir, points, config_arg=_CONFIG.value, trainer=_TRAINER.value)
  echo = lambda line: print(line, flush=True)
  print(f"sweep: {len(points)} points in {workdir} on partition {partition.name!r}, "
        f"{request.ntasks_per_point} task(s) x {request.cpus_per_task} CPU(s)"
        + (f" x {request.gpus_per_task} GPU(s)" if request.gpus_per_task else "")
        + f" each, {request.minutes} min", flush=True)
  started = time.time()
  follow, tally = slurm.submit(points, workdir=workdir, request=request, cwd=os.getcwd(),
                               echo=echo)
  if _NOWAIT.value:
    ids = " ".join(str(job.job_id) for _, job in follow) or "none"
    print(f"sweep: {len(follow)} point(s) queued, job ids: {ids}\n"
          f"follow them with `squeue -u $USER`, or rerun this command without --nowait "
          "to wait for them; then:\n"
          f"report: python -m experiments.report --workdir={workdir}", flush=True)
    return 0
  tally = slurm.wait(follow, len(points), tally, echo=echo)
  if note.seen:
    print("sweep: note: this cluster has no accounting storage (sacct); job states came "
          "from squeue", flush=True)
  print(f"sweep: {tally.summary_line(time.time() - started)}", flush=True)
  print(f"report: python -m experiments.report --workdir={workdir}")
  return 1 if tally.failed else 0


if __name__ == "__main__":
  app.run(main)
