r"""Train and evaluate one config: a thin absl launcher around `train_and_evaluate`.

  python -m experiments.train --config=configs/mnist1d_cnn.py[:w4a4] --workdir=DIR \
      [--config.key=value ...]

Rerunning the same command resumes from the newest readable checkpoint in DIR.

Multi-process runs: under SLURM (`srun`, or `python -m experiments.sweep
--launcher=slurm --slurm_ntasks_per_point=N`) every task runs this same command and
`jax.distributed.initialize()` finds the coordinator from SLURM's environment; elsewhere
pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to each process.
The mesh spans every process's devices; process 0 writes the summary, metrics and
TensorBoard files, and every process takes part in the checkpoints.

jax's own flags work here too (--jax_platforms=cpu, --jax_enable_x64, ...).

Exit status: 0 done; 2 invalid config or flags (DIR untouched); 1 training failed
(e.g. a non-finite loss; the message names the step and the first bad layer); 75
stopped by SIGTERM or SIGUSR1 after saving a checkpoint at the next step boundary
(rerun the same command to resume; see experiments/training/preemption.py).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from experiments.config_file import load_config_module
from experiments.training import config_build, loop, preemption, sharding
from experiments.training.config_build import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run without SLURM: HOST:PORT of process "
    "0's coordinator (jax.distributed); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process run: how many processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process run: this process's index.", lower_bound=0)
jax.config.config_with_absl()  # --jax_platforms, --jax_enable_x64, ... as absl flags

USAGE_ERROR = 2


def _fail(message: str, status: int) -> None:
  print(f"experiments.train: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _config_file_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _diagnose(argv: list[str], error: Exception) -> str:
  """A one-line reason for a flag-parsing failure, naming the config key if it can."""
  overrides = [m.group(1) for a in argv
               if (m := re.match(r"--config\.([\w.]+)(=|$)", a))]
  config_arg = _config_file_arg(argv)
  if config_arg and overrides:
    try:
      path, _, arg = config_arg.partition(":")
      config = load_config_module(path).get_config(*([arg] if arg else []))
      for key in overrides:
        message = config_build.diagnose_override(config, key)
        if message:
          return message
    except Exception:  # pylint: disable=broad-except
      pass  # fall through to the original error
  text = str(error).strip()
  if "Traceback" in text:  # config_flags embeds the config file's traceback
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{lines[0]} {lines[-1]}"
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but any config/flag problem exits with status 2 and one message."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(_diagnose(argv, e), USAGE_ERROR)
  raise AssertionError("unreachable")


def initialize_distributed() -> None:
  """Joins the processes of a multi-process run (`jax.distributed.initialize`): from the
  explicit flags, or under SLURM from its environment; a single process does nothing."""
  explicit = {"--coordinator_address": _COORDINATOR.value,
              "--num_processes": _NUM_PROCESSES.value, "--process_id": _PROCESS_ID.value}
  given = [name for name, value in explicit.items() if value is not None]
  if given:
    missing = [name for name in explicit if name not in given]
    if missing:
      _fail(f"{', '.join(given)} also need(s) {', '.join(missing)}", USAGE_ERROR)
    if _PROCESS_ID.value >= _NUM_PROCESSES.value:
      _fail(f"--process_id={_PROCESS_ID.value} must be < --num_processes="
            f"{_NUM_PROCESSES.value}", USAGE_ERROR)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif sharding.under_multiprocess_slurm():
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    _fail(f"unexpected positional arguments {argv[1:]}", USAGE_ERROR)
  if not _WORKDIR.value:
    _fail("--workdir is required", USAGE_ERROR)
  try:
    config = _CONFIG.value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      config.to_dict()  # config_flags defers file-loading errors to the first access
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"could not load --config: {' '.join(str(e).split())}", USAGE_ERROR)
  if config is None:
    _fail("--config is required (e.g. --config=configs/mnist1d_cnn.py)", USAGE_ERROR)

  initialize_distributed()
  try:
    summary = loop.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    _fail(f"invalid config: {e}", USAGE_ERROR)
  except (loop.NonFiniteError, loop.NoReadableCheckpointError) as e:
    _fail(str(e), 1)
  except preemption.Preempted as e:
    print(f"experiments.train: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.PREEMPTED_EXIT)
  metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary["metrics"].items())
                      if isinstance(v, float))
  print(f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s; {metrics}",
        flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
