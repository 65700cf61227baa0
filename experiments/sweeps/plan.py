"""Planning a sweep: load `get_sweep` from a config file, build one command per point, and
keep the per-point files (`sweep.json`, `summary.json`, `failed.json`, `log.txt`).

Layout of a sweep directory:

    DIR/sweep.json             {"config", "trainer", "swept_keys", "points": [{name, overrides,
                                command}]}
    DIR/<point name>/          the trainer's --workdir
        summary.json           written by the trainer when the run succeeded
        failed.json            {"returncode", "reason", "log_tail", "command", ...} on failure
        log.txt                the trainer's stdout and stderr (appended per attempt)
        claim                  which process is running the point (see locks.py)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import sys
import time
from typing import Any, Sequence

from experiments.sweeps import grid
from experiments.config_file import load_config_module
from experiments.training.results import SUMMARY_FILE, write_json_atomic

SWEEP_FILE = "sweep.json"
FAILED_FILE = "failed.json"
LOG_FILE = "log.txt"
DEFAULT_TRAINER = "experiments.train"
_LOG_TAIL_LINES = 40
_LOG_TAIL_CHARS = 4000


class SweepError(Exception):
  """A sweep that cannot be planned or read: bad config path, no get_sweep, bad points."""


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One run of a sweep: its overrides, its directory and the command that runs it."""
  index: int
  name: str
  overrides: dict[str, Any]
  directory: str
  argv: tuple[str, ...]
  requires: tuple[str, ...] = ()  # names of the points it refers to (grid.ref)

  @property
  def command(self) -> str:
    """The command as one shell-quoted line."""
    return shlex.join(self.argv)


def split_config_arg(config_arg: str) -> tuple[str, tuple[str, ...]]:
  """`FILE[:ARG]` -> (FILE, (ARG,) or ()), splitting at the first colon like ml_collections."""
  path, *arg = config_arg.split(":", 1)
  return path, tuple(arg)


def load_sweep(config_arg: str) -> list[grid.Point]:
  """Calls `get_sweep(ARG)` of the config file and validates the points.

  When the file also defines `get_config`, every swept key must exist in its config, so
  a typo fails here rather than in the N-th launched run. Raises SweepError.
  """
  path, args = split_config_arg(config_arg)
  if not os.path.isfile(path):
    raise SweepError(f"config file {path!r} not found (from --config={config_arg})")
  try:
    module = load_config_module(path)
  except ValueError as e:
    raise SweepError(str(e)) from None
  get_sweep = getattr(module, "get_sweep", None)
  if not callable(get_sweep):
    raise SweepError(f"{path} defines no get_sweep(arg=None); add one returning a list of "
                     "override dicts (see experiments.sweeps)")
  try:
    points = grid.normalize(get_sweep(*args))
  except ValueError as e:
    raise SweepError(f"{path}: get_sweep({', '.join(map(repr, args))}): {e}") from None
  get_config = getattr(module, "get_config", None)
  if callable(get_config):
    by_arg: dict[tuple[str, ...], list[grid.Point]] = {}
    for p in points:  # a point's config_arg replaces the sweep's ARG
      arg = (p[grid.ARG_KEY],) if grid.ARG_KEY in p else args
      by_arg.setdefault(arg, []).append(p)
    for arg, group in by_arg.items():
      try:
        config = get_config(*arg)
      except ValueError as e:
        raise SweepError(f"{path}: get_config({', '.join(map(repr, arg))}): {e}") from None
      unknown = [k for k in grid.swept_keys(group)
                 if k != grid.ARG_KEY and not _has_key(config, k)]
      if unknown:
        raise SweepError(f"{path}: swept key(s) {unknown} are not in get_config("
                         f"{', '.join(map(repr, arg))})'s config")
  return points


def build_points(points: Sequence[grid.Point], *, config_arg: str, workdir: str,
                 trainer: str = DEFAULT_TRAINER,
                 python: str = sys.executable) -> list[SweepPoint]:
  """One SweepPoint per override dict, each with its own directory under `workdir`.

  The command is `python -m TRAINER --config=FILE[:ARG] --workdir=DIR --config.KEY=VALUE..`,
  run from the sweep's working directory (so `configs/` and `experiments/` import); a
  point's `config_arg` becomes its ARG, and a `grid.ref` value becomes the referenced
  point's directory.
  """
  result = []
  for i, overrides in enumerate(points):
    name = grid.point_name(overrides)
    directory = os.path.join(workdir, name)
    config = config_arg
    if grid.ARG_KEY in overrides:
      config = f"{split_config_arg(config_arg)[0]}:{overrides[grid.ARG_KEY]}"
    argv = [python, "-m", trainer, f"--config={config}", f"--workdir={directory}"]
    argv += [f"--config.{k}={_resolve(v, workdir)}" for k, v in overrides.items()
             if k != grid.ARG_KEY]
    result.append(SweepPoint(i, name, dict(overrides), directory, tuple(argv),
                             tuple(grid.references(overrides))))
  return result


def _resolve(value: Any, workdir: str) -> str:
  if grid.is_ref(value):
    return os.path.join(workdir, value[len(grid.REF_PREFIX):])
  return grid.format_value(value)


def write_sweep_json(workdir: str, points: Sequence[SweepPoint], *, config_arg: str,
                     trainer: str) -> str:
  """Writes `workdir/sweep.json` atomically and returns its path."""
  path = os.path.join(workdir, SWEEP_FILE)
  write_json_atomic(path, {
      "config": config_arg,
      "trainer": trainer,
      "swept_keys": grid.swept_keys([p.overrides for p in points]),
      "points": [{"name": p.name, "overrides": p.overrides, "command": p.command}
                 for p in points],
  })
  return path


def read_sweep_json(workdir: str) -> dict[str, Any]:
  """Reads `workdir/sweep.json`; raises SweepError when it is missing or malformed."""
  path = os.path.join(workdir, SWEEP_FILE)
  try:
    with open(path) as f:
      sweep = json.load(f)
  except FileNotFoundError:
    raise SweepError(f"{path} not found: run `python -m experiments.sweep` on this "
                     "workdir first") from None
  except (OSError, ValueError) as e:
    raise SweepError(f"{path} is not readable JSON: {e}") from None
  points = sweep.get("points") if isinstance(sweep, dict) else None
  if not isinstance(points, list) or not all(
      isinstance(p, dict) and isinstance(p.get("name"), str)
      and isinstance(p.get("overrides"), dict) for p in points):
    raise SweepError(f"{path} has no valid 'points' list of {{name, overrides, command}}")
  return sweep


def log_tail(point_dir: str) -> str:
  """The last lines of a point's log.txt (where the error is), or '' without a log."""
  try:
    with open(os.path.join(point_dir, LOG_FILE), "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4 * _LOG_TAIL_CHARS))
      text = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  tail = "\n".join(text.rstrip("\n").split("\n")[-_LOG_TAIL_LINES:])
  return tail[-_LOG_TAIL_CHARS:]


def record_failure(point_dir: str, returncode: int, *, command: str = "",
                   elapsed_s: float | None = None, reason: str = "",
                   **extra: Any) -> dict[str, Any]:
  """Writes `point_dir/failed.json` with the exit status and the log tail; returns it.

  `reason` replaces the one derived from `returncode`; `extra` adds fields (the slurm
  launcher records the job id and the tail of submitit's log there)."""
  if reason:
    pass
  elif returncode == 0:
    reason = f"exited 0 without writing {SUMMARY_FILE}"
  elif returncode < 0:
    reason = f"killed by signal {-returncode}"
  else:
    reason = f"exit status {returncode}"
  record = {
      "returncode": returncode,
      "reason": reason,
      "log_tail": log_tail(point_dir),
      "command": command,
      "elapsed_s": elapsed_s,
      "host": socket.gethostname(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      **extra,
  }
  write_json_atomic(os.path.join(point_dir, FAILED_FILE), record)
  return record


def _has_key(config: Any, dotted_key: str) -> bool:
  node = config
  for part in dotted_key.split("."):
    try:
      node = node[part]  # ConfigDict and dict both index by name
    except (KeyError, TypeError, AttributeError, IndexError):
      return False
  return True
