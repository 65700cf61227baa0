"""The sweep report's plots: a metric against an x axis (one line per series), and
against quantized bytes with the Pareto front. PNG files through matplotlib's Agg
canvas (no pyplot, no global state).

The x axis is 'bits' by default (the quantized layers' weight bits, float at 32, on a
log2 axis); other numeric axes are linear or logarithmic (`log_x`), text values evenly
spaced categories.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

from matplotlib import ticker
# No pyplot: no global state; a Figure draws on the Agg canvas when saved.
from matplotlib.figure import Figure

from experiments.sweeps import axes
from experiments.sweeps.collect import Row, Stat, fmt, is_number

BITS_KEY = "quant.bits"
FLOAT_BITS = 32
BITS_PLOT = "accuracy_vs_bits.png"
BYTES_PLOT = "accuracy_vs_bytes.png"


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
  if all(is_number(p.x) for pts in lines.values() for p in pts):
    lines = {name: sorted(pts, key=lambda p: p.x) for name, pts in lines.items()}
  return lines


X_SCALES = ("auto", "linear", "log")


def log_x(values: Sequence[Any], x_scale: str = "auto") -> bool:
  """Whether a numeric x axis is drawn on a log scale: always for 'log' (every value
  must be > 0), never for 'linear'; for 'auto', when every value is > 0 and they span
  at least a factor of 10 (learning rates, noise levels over a decade or more)."""
  if x_scale not in X_SCALES:
    raise ValueError(f"x_scale={x_scale!r}; choose one of {list(X_SCALES)}")
  numeric = values and all(is_number(v) for v in values)
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
  numeric = all(is_number(v) for v in values)
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
    labels = [fmt(v) for v in values]
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



def _figure():
  fig = Figure(figsize=(6.4, 4.4), layout="constrained")
  return fig, fig.add_subplot()


def _save(fig, path: str) -> bool:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")  # slanted labels stay inside
  os.replace(tmp, path)
  return True
