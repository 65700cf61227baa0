r"""Train and evaluate one config: a thin absl launcher around `train_and_evaluate`.

  python -m experiments.train --config=configs/mnist1d_cnn.py[:w4a4] --workdir=DIR \
      [--config.key=value ...]

Rerunning the same command resumes from the newest readable checkpoint in DIR.
Exit status: 0 done; 2 invalid config or flags (DIR untouched); 1 training failed
(e.g. a non-finite loss; the message names the step and the first bad layer).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from experiments.training import config_build, loop
from experiments.training.config_build import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py[:arg].",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")

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
      config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
          "config_for_diagnosis", path).get_config(*([arg] if arg else []))
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

  try:
    summary = loop.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    _fail(f"invalid config: {e}", USAGE_ERROR)
  except (loop.NonFiniteError, loop.NoReadableCheckpointError) as e:
    _fail(str(e), 1)
  metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary["metrics"].items())
                      if isinstance(v, float))
  print(f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s; {metrics}",
        flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
