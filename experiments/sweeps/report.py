"""Sweep report: a markdown table over seeds, the failures, and two PNG plots.

Reads `DIR/sweep.json` and each point's `summary.json` (or `failed.json`), never
crashing on a point that has neither ("not run") or whose summary is malformed (a
warning). From each summary it reads `metrics[<metric>]`, `metrics["serving_<metric>"]`,
`param_bytes["float"]`, `param_bytes["quantized"]`, its resolved `config` and, when
present, `compute_per_example` (MACs and bit operations; columns BOPs/example and
float/BOPs).

Rows group the points by every swept key except `seed`; a metric cell is the mean ±
the sample standard deviation (ddof=1) over the finished seeds of the row. Each row is
labelled as a person would write it ('float', 'W4A4', 'binary W1A8', plus the swept
keys that label does not imply; experiments/sweeps/axes.py). The first metric is
plotted against a chosen x axis (default 'bits': the quantized layers' weight bits,
float at 32) with one line per chosen series, and against quantized bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

from matplotlib import ticker
# No pyplot: no global state; a Figure draws on the Agg canvas when saved.
from matplotlib.figure import Figure
import numpy as np

from experiments.sweeps import axes, grid, locks
from experiments.sweeps.plan import FAILED_FILE, SUMMARY_FILE, read_sweep_json

SEED_KEY = "seed"
BITS_KEY = "quant.bits"
FLOAT_BITS = 32
DEFAULT_METRICS = ("test_accuracy", "test_bits_per_byte")  # first one present wins
REPORT_FILE = "report.md"
BITS_PLOT = "accuracy_vs_bits.png"
BYTES_PLOT = "accuracy_vs_bytes.png"
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
    return float(value) if _is_number(value) else None

  def param_bytes(self, kind: str) -> Optional[float]:
    """`param_bytes[kind]` ('float' or 'quantized') of a finished run, or None."""
    param_bytes = (self.summary or {}).get("param_bytes")
    value = param_bytes.get(kind) if isinstance(param_bytes, dict) else None
    return float(value) if _is_number(value) else None

  def compute(self, kind: str) -> Optional[float]:
    """`compute_per_example[kind]` ('macs', 'bops', 'float_bops') of a finished run."""
    compute = (self.summary or {}).get("compute_per_example")
    value = compute.get(kind) if isinstance(compute, dict) else None
    return float(value) if _is_number(value) else None


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


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool = True
                 ) -> list[int]:
  """Indices of (bytes, metric) points on the front, by increasing bytes.

  A point is on it when no point of at most its bytes has a metric as good or better
  (best metric for <= bytes); NaN metrics never are.
  """
  sign = 1.0 if higher_is_better else -1.0
  order = sorted((i for i, (_, m) in enumerate(points) if not math.isnan(m)),
                 key=lambda i: (points[i][0], -sign * points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if sign * points[i][1] > best:
      front.append(i)
      best = sign * points[i][1]
  return front


def markdown(workdir: str, sweep: dict[str, Any], results: Sequence[PointResult],
             rows: Sequence[Row], metrics: Sequence[str], warnings: Sequence[str] = (),
             plots: Sequence[str] = ()) -> str:
  """The whole report.md text."""
  counts = {s: sum(r.status == s for r in results)
            for s in ("ok", "failed", "malformed", "running", "not run")}
  lines = [f"# Sweep report: {workdir}", "",
           f"Config `{sweep.get('config', '?')}`, {len(results)} points: "
           + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
  value_columns = []
  for metric in metrics:
    value_columns.append((metric, metric))
    if any(r.metric(f"serving_{metric}") is not None for r in results):
      value_columns.append((f"serving {metric}", f"serving_{metric}"))
  with_compute = any(r.compute("bops") is not None for r in results)
  header = ["setting", *(rows[0].values if rows else ()), "runs",
            *(title for title, _ in value_columns), "quantized bytes", "float/quantized",
            *(("BOPs/example", "float/BOPs") if with_compute else ())]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row, label in zip(rows, axes.row_labels(rows)):
    quantized, floating = row.mean_bytes("quantized"), row.mean_bytes("float")
    cells = [_fmt(v).replace("|", "\\|") for v in (label, *row.values.values())]
    cells.append(f"{len(row.ok)}/{len(row.points)}")
    cells += [str(s) if (s := row.stat(key)) else "—" for _, key in value_columns]
    cells.append(f"{quantized:,.0f}" if quantized is not None else "—")
    cells.append(f"{floating / quantized:.2f}×" if quantized and floating else "—")
    if with_compute:
      bops, float_bops = row.mean_compute("bops"), row.mean_compute("float_bops")
      cells.append(f"{bops:,.0f}" if bops is not None else "—")
      cells.append(f"{float_bops / bops:.1f}×" if bops and float_bops else "—")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Cells: mean ± sample std (ddof=1) over seeds; runs: finished/declared.", ""]
  lines += [f"![{plot}]({plot})" for plot in plots] + ([""] if plots else [])

  failed = [r for r in results if r.status == "failed"]
  if failed:
    lines += ["## Failed points", ""]
    for r in failed:
      tail = str(r.failure.get("log_tail", "")).rstrip() or "(empty log)"
      fence = "~~~~" if "```" in tail else "```"
      lines += [f"### {r.name}", "", f"{r.failure.get('reason', 'failed')}; "
                f"rerun the sweep to retry. Log tail:", "", fence, tail, fence, ""]
  for status, title in (("running", "Running"), ("not run", "Not run")):
    names = [r.name for r in results if r.status == status]
    if names:
      lines += [f"## {title}", ""] + [f"- {n}" for n in names] + [""]
  if warnings:
    lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class XYPoint:
  """One point of a metric-vs-x plot; `label` names the row when the axes do not."""
  x: Any
  stat: Stat
  label: str


def xy_series(rows: Sequence[Row], metric: str, x: str = "bits",
              series: Optional[Sequence[str]] = None, *, bits_key: str = BITS_KEY
              ) -> dict[str, list[XYPoint]]:
  """The plot's lines, {name: points by increasing x}; {} when no row has an x value.

  `x` and `series` are axes as axes.resolve_key takes them (derived 'bits' / 'label',
  a config key or a unique suffix of a swept key). `series` None: the varying swept
  keys that are neither x, the seed nor quant.* (axes.default_series). Each point is
  annotated with its row's human label minus the axes, when those differ along its line.
  """
  x = axes.resolve_key(x, rows)
  series = ([axes.resolve_key(k, rows) for k in series] if series is not None
            else axes.default_series(rows, x))
  labels = axes.row_labels(rows, exclude=[x, *series])
  data = [(row, label, axes.row_value(row, x, bits_key), s)
          for row, label in zip(rows, labels) if (s := row.stat(metric))]
  data = [d for d in data if d[2] is not None]
  if not data:
    return {}
  lines: dict[str, list[XYPoint]] = {}
  for row, label, value, s in data:
    name = axes.series_name(rows, row, series, bits_key) or metric
    lines.setdefault(name, []).append(XYPoint(value, s, label))
  # Labels shared by a whole line say nothing the legend does not.
  lines = {name: pts if len({p.label for p in pts}) > 1
           else [dataclasses.replace(p, label="") for p in pts]
           for name, pts in lines.items()}
  if all(_is_number(p.x) for pts in lines.values() for p in pts):
    lines = {name: sorted(pts, key=lambda p: p.x) for name, pts in lines.items()}
  return lines


X_SCALES = ("auto", "linear", "log")


def log_x(values: Sequence[Any], x_scale: str = "auto") -> bool:
  """Whether a numeric x axis is drawn on a log scale: always for 'log' (every value
  must be > 0), never for 'linear'; for 'auto', when every value is > 0 and they span
  at least a factor of 10 (learning rates, noise levels over a decade or more)."""
  if x_scale not in X_SCALES:
    raise ValueError(f"x_scale={x_scale!r}; choose one of {list(X_SCALES)}")
  numeric = values and all(_is_number(v) for v in values)
  if x_scale == "linear" or not numeric:
    return False
  positive = all(v > 0 for v in values)
  if x_scale == "log":
    if not positive:
      raise ValueError(f"x_scale='log' needs x values > 0, got {sorted(values)}")
    return True
  return positive and max(values) >= 10 * min(values)


def plot_xy(rows: Sequence[Row], metric: str, path: str, *, x: str = "bits",
            series: Optional[Sequence[str]] = None, bits_key: str = BITS_KEY,
            x_scale: str = "auto") -> bool:
  """Metric against `x` (error bars = std over seeds), one line per series; False if
  no data. 'bits' is drawn on a log2 axis with float at 32; other numeric axes
  linearly or on a log axis (`log_x`: 'auto' picks log for values > 0 spanning ≥ 10x);
  text values as evenly spaced categories in order of appearance."""
  lines = xy_series(rows, metric, x, series, bits_key=bits_key)
  if not lines:
    return False
  x = axes.resolve_key(x, rows)
  values = list(dict.fromkeys(p.x for pts in lines.values() for p in pts))
  numeric = all(_is_number(v) for v in values)
  position = (lambda v: v) if numeric else {v: i for i, v in enumerate(values)}.get
  fig, ax = _figure()
  for name, pts in lines.items():
    ax.errorbar([position(p.x) for p in pts], [p.stat.mean for p in pts],
                yerr=[p.stat.std for p in pts], marker="o", capsize=3, label=name)
    for p in pts:
      if p.label:
        ax.annotate(p.label, (position(p.x), p.stat.mean), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
  if x == "bits":
    ticks = sorted(values)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" + ("\n(float)" if t == FLOAT_BITS else "") for t in ticks])
    ax.minorticks_off()
  elif numeric and log_x(values, x_scale):
    ticks = sorted(values)
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
  elif not numeric:
    labels = [_fmt(v) for v in values]
    long = sum(len(t) for t in labels) > 60  # would overlap: slant them
    ax.set_xticks(range(len(values)), labels, rotation=30 if long else 0,
                  ha="right" if long else "center")
  ax.margins(x=0.1)
  ax.set(xlabel="bits (float = 32)" if x == "bits" else x, ylabel=metric,
         title=f"{metric} vs {x}")
  if len(lines) > 1:
    ax.legend(fontsize=8)
  return _save(fig, path)


def plot_file(metric: str, x: str = "bits") -> str:
  """The plot's file name: accuracy_vs_bits.png for x='bits' (whatever the metric),
  else METRIC_vs_X.png."""
  if x == "bits":
    return BITS_PLOT
  return f"{metric}_vs_{x.replace('.', '_')}.png"


def plot_vs_bytes(rows: Sequence[Row], metric: str, path: str, *,
                  higher_is_better: bool = True) -> bool:
  """Metric against quantized bytes (log x) with the Pareto front; False if no data."""
  data = [(row, b, s) for row in rows
          if (s := row.stat(metric)) and (b := row.mean_bytes("quantized"))]
  if not data:
    return False
  fig, ax = _figure()
  ax.errorbar([b for _, b, _ in data], [s.mean for _, _, s in data],
              yerr=[s.std for _, _, s in data], fmt="o", capsize=3, label="runs")
  labels = axes.row_labels([row for row, _, _ in data])  # 'W4A4', 'binary W1A8', ...
  for (row, b, s), text in zip(data, labels):
    ax.annotate(text, (b, s.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
  front = pareto_front([(b, s.mean) for _, b, s in data], higher_is_better=higher_is_better)
  ax.step([data[i][1] for i in front], [data[i][2].mean for i in front], where="post",
          color="tab:red", label="Pareto front")
  ax.set_xscale("log")
  # Labelled ticks at 1-2-5 steps in bytes: default log labels collide on short ranges.
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.margins(x=0.1)
  better = "higher" if higher_is_better else "lower"
  ax.set(xlabel="quantized parameter size", ylabel=f"{metric} ({better} is better)",
         title=f"{metric} vs model size")
  ax.legend(fontsize=8)
  return _save(fig, path)


def write_report(workdir: str, metrics: Optional[Sequence[str]] = None, *,
                 x: str = "bits", series: Optional[Sequence[str]] = None,
                 bits_key: str = BITS_KEY, higher_is_better: Optional[bool] = None,
                 x_scale: str = "auto") -> tuple[str, list[str]]:
  """Writes report.md and the plots into `workdir`; returns (markdown, warnings).

  The first metric is the one plotted, against `x` with one line per `series` (see
  xy_series), and against quantized bytes; `x_scale` as in `log_x`. Raises SweepError
  without a usable sweep.json, ValueError for an axis that names nothing or a bad
  x_scale.
  """
  if x_scale not in X_SCALES:
    raise ValueError(f"x_scale={x_scale!r}; choose one of {list(X_SCALES)}")
  sweep, results, warnings = load_results(workdir)
  metrics = list(metrics or choose_metrics(results))
  if higher_is_better is None:
    higher_is_better = is_higher_better(metrics[0])
  swept_keys = sweep.get("swept_keys")
  rows = group_rows(results, swept_keys if isinstance(swept_keys, list) else ())
  plots = []
  x = axes.resolve_key(x, rows)
  x_plot = plot_file(metrics[0], x)
  if plot_xy(rows, metrics[0], os.path.join(workdir, x_plot), x=x, series=series,
             bits_key=bits_key, x_scale=x_scale):
    plots.append(x_plot)
  else:
    warnings.append(f"{x_plot} not drawn: no finished run has {metrics[0]} and a value "
                    f"of {x!r}" + (f" (or a {bits_key} config key)" if x == "bits" else ""))
  if plot_vs_bytes(rows, metrics[0], os.path.join(workdir, BYTES_PLOT),
                   higher_is_better=higher_is_better):
    plots.append(BYTES_PLOT)
  else:
    warnings.append(f"{BYTES_PLOT} not drawn: no finished run has {metrics[0]} and "
                    "param_bytes.quantized")
  text = markdown(workdir, sweep, results, rows, metrics, warnings, plots)
  tmp = os.path.join(workdir, f".{REPORT_FILE}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, REPORT_FILE))
  return text, warnings


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
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


def _figure():
  fig = Figure(figsize=(6.4, 4.4), layout="constrained")
  return fig, fig.add_subplot()


def _save(fig, path: str) -> bool:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")  # slanted labels stay inside
  os.replace(tmp, path)
  return True
