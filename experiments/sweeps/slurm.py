"""The slurm launcher: one sbatch array script, one array task per sweep point.

Each task does what the local launcher does for one point: skip it when `summary.json`
exists, append the trainer's output to `point/log.txt`, and write `point/failed.json`
(via `experiments.sweeps.plan.record_failure`) when the run fails. Slurm's array
guarantees one task per index, so no claims are taken.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from experiments.sweeps.plan import FAILED_FILE, LOG_FILE, SUMMARY_FILE, SweepPoint

SBATCH_FILE = "sweep.sbatch"

_RECORD_FAILURE = ("import sys; from experiments.sweeps.plan import record_failure; "
                   "record_failure(sys.argv[1], int(sys.argv[2]), command=sys.argv[3], "
                   "elapsed_s=float(sys.argv[4]))")


def sbatch_script(points: Sequence[SweepPoint], *, workdir: str, cwd: str,
                  config_arg: str, sbatch_options: Sequence[str] = (),
                  python: str = sys.executable) -> str:
  """The text of an sbatch array script running `points` (paths made absolute)."""
  workdir = os.path.abspath(workdir)
  job_name = "sweep-" + (os.path.basename(workdir.rstrip("/")) or "jaxquant")
  q = shlex.quote
  lines = [
      "#!/bin/bash",
      f"# Sweep of {len(points)} point(s) from --config={config_arg}; see {SUMMARY_FILE} "
      f"and {LOG_FILE} in each point directory.",
      "# Written by `python -m experiments.sweep --launcher=slurm`. Submit with:",
      f"#   sbatch {q(os.path.join(workdir, SBATCH_FILE))}",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --array=0-{len(points) - 1}",
      f"#SBATCH --output={os.path.join(workdir, 'slurm-%A_%a.out')}",
      f"#SBATCH --chdir={cwd}",
      *(f"#SBATCH {opt}" for opt in sbatch_options),
      "set -u",
      "",
      'case "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}" in',
  ]
  for p in points:
    lines += [f"  {p.index}) POINT={q(p.name)}",
              f"     CMD=({p.command}) ;;"]
  lines += [
      '  *) echo "no sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
      "esac",
      "",
      f'POINT_DIR={q(workdir)}/"$POINT"',
      f'if [ -f "$POINT_DIR/{SUMMARY_FILE}" ]; then',
      f'  echo "skip $POINT: {SUMMARY_FILE} exists"; exit 0',
      "fi",
      f'mkdir -p "$POINT_DIR" && rm -f "$POINT_DIR/{FAILED_FILE}"',
      'echo "=== $(date "+%F %T") on $(hostname): ${CMD[*]}" >> "$POINT_DIR/' + LOG_FILE + '"',
      'echo "start $POINT on $(hostname)"',
      "SECONDS=0",
      f'"${{CMD[@]}}" >> "$POINT_DIR/{LOG_FILE}" 2>&1',
      "rc=$?",
      f'if [ "$rc" -ne 0 ] || [ ! -f "$POINT_DIR/{SUMMARY_FILE}" ]; then',
      f'  {q(python)} -c {q(_RECORD_FAILURE)} "$POINT_DIR" "$rc" "${{CMD[*]}}" "$SECONDS"',
      f'  echo "FAILED $POINT (rc=$rc) after ${{SECONDS}}s; see $POINT_DIR/{LOG_FILE}" >&2',
      "  exit 1",
      "fi",
      'echo "done $POINT in ${SECONDS}s"',
  ]
  return "\n".join(lines) + "\n"


def write_sbatch(workdir: str, script: str) -> str:
  """Writes `workdir/sweep.sbatch` (executable) and returns its path."""
  path = os.path.join(workdir, SBATCH_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(script)
  os.chmod(tmp, 0o755)
  os.replace(tmp, path)
  return path
