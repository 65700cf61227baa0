"""A sweep's results as found on disk, grouped into the report's rows.

Reads `DIR/sweep.json` and each point's `summary.json` (or `failed.json`), never
crashing on a point that has neither ("not run") or whose summary is malformed (a
warning). From each summary it reads `metrics[<metric>]`, `param_bytes["float"]`,
`param_bytes["quantized"]`, its resolved `config` and, when present,
`compute_per_example` (MACs and bit operations).

Rows group the points by every swept key except `seed`; a row's statistic is the mean
and the sample standard deviation (ddof=1) over its finished seeds.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from experiments.sweeps import axes, grid, locks
from experiments.sweeps.plan import FAILED_FILE, SUMMARY_FILE, read_sweep_json

SEED_KEY = "seed"
DEFAULT_METRICS = ("test_accuracy", "test_bits_per_byte")  # first one present wins
_LOWER_IS_BETTER = ("loss", "bits_per_byte", "bpb", "perplexity", "error")


@dataclasses.dataclass
class PointResult:
  """One sweep point as found on disk. status: ok, failed, malformed, running, not run."""
  name: str
  overrides: dict[str, Any]
  status: str
  summary: Optional[dict[str, Any]] = None
  failure: Optional[dict[str, Any]] = None

  def metric(self, name: str) -> Optional[float]:
    """`metrics[name]` of a finished run, or None."""
    value = (self.summary or {}).get("metrics", {}).get(name)
    return float(value) if is_number(value) else None

  def param_bytes(self, kind: str) -> Optional[float]:
    """`param_bytes[kind]` ('float' or 'quantized') of a finished run, or None."""
    param_bytes = (self.summary or {}).get("param_bytes")
    value = param_bytes.get(kind) if isinstance(param_bytes, dict) else None
    return float(value) if is_number(value) else None

  def compute(self, kind: str) -> Optional[float]:
    """`compute_per_example[kind]` ('macs', 'bops', 'float_bops') of a finished run."""
    compute = (self.summary or {}).get("compute_per_example")
    value = compute.get(kind) if isinstance(compute, dict) else None
    return float(value) if is_number(value) else None


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and sample std (ddof=1; 0 for a single value) over n values."""
  mean: float
  std: float
  n: int

  def __str__(self) -> str:
    return f"{self.mean:.4f}" if self.n == 1 else f"{self.mean:.4f} ± {self.std:.4f}"


@dataclasses.dataclass
class Row:
  """The points sharing every swept value except the seed."""
  values: dict[str, Any]
  points: list[PointResult]

  @property
  def ok(self) -> list[PointResult]:
    """The finished points."""
    return [p for p in self.points if p.status == "ok"]

  def stat(self, metric: str) -> Optional[Stat]:
    """The metric over the finished points, or None when none reported it."""
    return summarize([v for p in self.ok if (v := p.metric(metric)) is not None])

  def mean_bytes(self, kind: str) -> Optional[float]:
    """Mean of `param_bytes[kind]` over the finished points (they normally agree)."""
    stat = summarize([v for p in self.ok if (v := p.param_bytes(kind)) is not None])
    return stat.mean if stat else None

  def mean_compute(self, kind: str) -> Optional[float]:
    """Mean of `compute_per_example[kind]` over the finished points."""
    stat = summarize([v for p in self.ok if (v := p.compute(kind)) is not None])
    return stat.mean if stat else None


def summarize(values: Sequence[float]) -> Optional[Stat]:
  """Stat of `values`, None when empty."""
  if not values:
    return None
  array = np.asarray(values, dtype=np.float64)
  std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
  return Stat(float(np.mean(array)), std, len(array))


def load_results(workdir: str) -> tuple[dict[str, Any], list[PointResult], list[str]]:
  """(sweep.json, one PointResult per listed point, warnings). Raises SweepError."""
  sweep = read_sweep_json(workdir)
  results, warnings = [], []
  for entry in sweep["points"]:
    directory = os.path.join(workdir, entry["name"])
    result = PointResult(entry["name"], dict(entry["overrides"]), "not run")
    summary, problem = _read_json(os.path.join(directory, SUMMARY_FILE))
    if summary is not None and not (isinstance(summary, dict)
                                    and isinstance(summary.get("metrics"), dict)):
      summary, problem = None, "has no 'metrics' object"
    if summary is not None:
      result.status, result.summary = "ok", summary
    elif problem:
      result.status = "malformed"
      warnings.append(f"{entry['name']}/{SUMMARY_FILE} is malformed ({problem}); skipped")
    elif os.path.exists(os.path.join(directory, FAILED_FILE)):
      failure, problem = _read_json(os.path.join(directory, FAILED_FILE))
      result.status = "failed"
      result.failure = failure if isinstance(failure, dict) else {
          "reason": f"unreadable {FAILED_FILE} ({problem})"}
    elif (owner := locks.read(directory)) is not None and not owner.is_stale():
      result.status = "running"
    results.append(result)
  return sweep, results, warnings


def group_rows(results: Sequence[PointResult], swept_keys: Sequence[str] = (),
               seed_key: str = SEED_KEY) -> list[Row]:
  """Rows keyed by the swept keys except `seed_key`, in sweep order.

  `swept_keys` (sweep.json's, in declaration order) orders the columns; keys it lacks
  are appended in order of appearance. A staged point's reference (`sweeps.ref`) differs
  per seed; it is shown, and grouped, as `after W8A8` (the referenced point's quant
  label, once it has finished) or `after K=V,..` (its values that differ from the
  point's own), the seed left out.
  """
  found = dict.fromkeys(k for r in results for k in r.overrides)
  keys = [k for k in dict.fromkeys([*(k for k in swept_keys if k in found), *found])
          if k != seed_key]
  by_name = {r.name: r for r in results}
  rows: dict[str, Row] = {}
  for r in results:
    values = {k: _stage_label(r.overrides, r.overrides.get(k), by_name, seed_key)
              for k in keys}
    key = json.dumps(values, sort_keys=True)
    rows.setdefault(key, Row(values, [])).points.append(r)
  return list(rows.values())


def _stage_label(own: dict[str, Any], value: Any, by_name: dict[str, PointResult],
                 seed_key: str) -> Any:
  if not grid.is_ref(value):
    return value
  parent = by_name.get(value[len(grid.REF_PREFIX):])
  if parent is None:
    return value
  label = axes.quant_label((parent.summary or {}).get("config"))
  diff = [f"{k}={grid.format_value(v)}" for k, v in sorted(parent.overrides.items())
          if k != seed_key and not grid.is_ref(v) and own.get(k) != v
          and not (label and k.startswith("quant."))]  # the label names those
  return "after " + (", ".join(([label] if label else []) + diff) or "the same point")


def choose_metrics(results: Sequence[PointResult]) -> list[str]:
  """The first of DEFAULT_METRICS that some finished run reports (else the first)."""
  for metric in DEFAULT_METRICS:
    if any(r.metric(metric) is not None for r in results):
      return [metric]
  return [DEFAULT_METRICS[0]]


def is_higher_better(metric: str) -> bool:
  """Whether higher is better, from the name (loss, bits_per_byte, error: lower)."""
  return not any(hint in metric for hint in _LOWER_IS_BETTER)



def is_number(value: Any) -> bool:
  """A real number (bools excluded)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
  """A value as a table cell or tick label: None as '—', sequences as '(a,b)'."""
  if value is None:
    return "—"
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(map(str, value)) + ")"
  return str(value)


def _read_json(path: str) -> tuple[Any, Optional[str]]:
  """(parsed, None), (None, problem) when unreadable, (None, None) when absent."""
  try:
    with open(path) as f:
      return json.load(f), None
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as e:
    return None, f"{type(e).__name__}: {e}"

