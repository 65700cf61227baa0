"""Runs the sweep a config file declares with `get_sweep()`, one trainer run per point.

    python -m experiments.sweep --config=configs/RECIPE.py[:ARG] --workdir=runs/sweep \
        --parallel=2
    python -m experiments.report --workdir=runs/sweep

--launcher=local (default) runs the points here as subprocesses; rerunning skips the
points that have a summary.json and retries the failed ones, and two sweeps started on
one workdir share the points without running any twice. --launcher=print prints the
commands and writes nothing; --launcher=slurm writes DIR/sweep.sbatch (an array job).
Points that start from another point's run (`sweeps.ref`, staged training such as
8 -> 4 -> 2 bits) run after it, and only with the local launcher.

Exit status: 0 when every point ran or was done before, 1 when a point failed, 2 when
the config file or its sweep is unusable.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from absl import app, flags

from experiments.sweeps import SweepError, build_points, load_sweep
from experiments.sweeps.local import run_local
from experiments.sweeps.plan import DEFAULT_TRAINER, write_sweep_json
from experiments.sweeps.slurm import sbatch_script, write_sbatch

_CONFIG = flags.DEFINE_string("config", None, "Config file defining get_sweep(), FILE[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; one subdir per point.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local launcher: points run at once.",
                                 lower_bound=1)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "print", "slurm"],
                              "Run here, print the commands, or write an sbatch script.")
_TRAINER = flags.DEFINE_string("trainer", DEFAULT_TRAINER,
                               "Module run with `python -m` for each point.")
_SBATCH = flags.DEFINE_multi_string("sbatch", [],
                                    "Slurm launcher: extra #SBATCH option, e.g. "
                                    "--sbatch=--gres=gpu:1 (repeatable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
  """Plans the sweep and hands it to the chosen launcher; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    overrides = load_sweep(_CONFIG.value)
  except SweepError as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  workdir = _WORKDIR.value
  points = build_points(overrides, config_arg=_CONFIG.value, workdir=workdir,
                        trainer=_TRAINER.value)

  if _LAUNCHER.value == "print":
    for point in points:
      print(point.command)
    return 0

  os.makedirs(workdir, exist_ok=True)
  write_sweep_json(workdir, points, config_arg=_CONFIG.value, trainer=_TRAINER.value)
  if _LAUNCHER.value == "slurm":
    staged = [p.name for p in points if p.requires]
    if staged:
      print(f"sweep: error: {len(staged)} point(s) start from another point's run "
            f"(e.g. {staged[0]}); an array job runs its tasks in any order, so run this "
            "sweep with --launcher=local", file=sys.stderr)
      return 2
    path = write_sbatch(workdir, sbatch_script(
        points, workdir=workdir, cwd=os.getcwd(), config_arg=_CONFIG.value,
        sbatch_options=_SBATCH.value))
    print(f"wrote {path} ({len(points)} array task(s)); submit it with:\n  sbatch {path}\n"
          f"then: python -m experiments.report --workdir={workdir}")
    return 0

  # SIGTERM (kill, slurm preemption) unwinds like Ctrl-C: runs are stopped, claims freed.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  print(f"sweep: {len(points)} points in {workdir}, {_PARALLEL.value} at a time", flush=True)
  started = time.time()
  tally = run_local(points, parallel=_PARALLEL.value,
                    echo=lambda line: print(line, flush=True))
  print(f"sweep: {tally.summary_line(time.time() - started)}", flush=True)
  print(f"report: python -m experiments.report --workdir={workdir}")
  return 1 if tally.failed else 0


if __name__ == "__main__":
  app.run(main)
