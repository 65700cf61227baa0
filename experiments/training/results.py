"""Crash-safe result files: atomic JSON documents and append-only JSON lines.

A reader never sees a half-written `summary.json` (write to a temp file in the
same directory, fsync, `os.replace`), and a crash can lose at most the line being
appended to a `.jsonl` file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _fsync_dir(directory: str) -> None:
  # Makes the rename itself durable; not every platform allows opening a dir.
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
  """Writes `obj` as JSON to `path` so readers see either the old or the new file."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be shared
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=indent, sort_keys=True, allow_nan=True)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    try:
      os.unlink(tmp_path)
    except OSError:
      pass
    raise
  _fsync_dir(directory)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
  """Appends `obj` as one JSON line to `path` and fsyncs it."""
  path = os.fspath(path)
  line = json.dumps(obj, sort_keys=True, allow_nan=True)
  if '\n' in line:  # json.dumps never emits raw newlines without indent; be sure.
    raise ValueError('append_jsonl: object serialised to more than one line')
  with open(path, 'a') as f:
    f.write(line + '\n')
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[Any]:
  """Reads every complete line of a `.jsonl` file (a torn last line is skipped)."""
  records = []
  with open(os.fspath(path)) as f:
    for line in f:
      if not line.endswith('\n'):
        break  # torn write from a crash
      line = line.strip()
      if line:
        records.append(json.loads(line))
  return records


SUMMARY_FILE = "summary.json"


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> str:
  """Writes `workdir/summary.json`, a run's last act, and returns its path.

  Every runner (experiments.train, experiments.minilm_ptq) writes its summary here, and
  the sweep launchers and reports read it: the keys `config`, `metrics` (floats),
  `param_bytes` ({float, quantized}) and `wall_time_s` are required; others are kept.
  Raises ValueError when a required key is missing.
  """
  missing = [k for k in ("config", "metrics", "param_bytes", "wall_time_s") if k not in summary]
  if missing:
    raise ValueError(f"summary.json needs the key(s) {missing}")
  path = os.path.join(os.fspath(workdir), SUMMARY_FILE)
  write_json_atomic(path, summary)
  return path

