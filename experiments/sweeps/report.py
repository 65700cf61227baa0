"""Sweep report: a markdown table over seeds, the failures, and two PNG plots.

`write_report(DIR)` reads the sweep's results (collect.py: sweep.json and each point's
summary.json or failed.json, grouped by every swept key except `seed`), draws the plots
(plots.py) and writes DIR/report.md. A metric cell is the mean ± the sample standard
deviation (ddof=1) over the finished seeds of the row; `serving_<metric>` gets its own
column when present, and `compute_per_example` the columns BOPs/example and
float/BOPs. Each row is labelled as a person would write it ('float', 'W4A4', 'binary
W1A8', plus the swept keys that label does not imply; experiments/sweeps/axes.py).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from experiments.sweeps import axes, plots
from experiments.sweeps.collect import (PointResult, Row, choose_metrics, fmt, group_rows,
                                     is_higher_better, load_results)

REPORT_FILE = "report.md"


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
    cells = [fmt(v).replace("|", "\\|") for v in (label, *row.values.values())]
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


def write_report(workdir: str, metrics: Optional[Sequence[str]] = None, *,
                 x: str = "bits", series: Optional[Sequence[str]] = None,
                 bits_key: str = plots.BITS_KEY, higher_is_better: Optional[bool] = None,
                 x_scale: str = "auto") -> tuple[str, list[str]]:
  """Writes report.md and the plots into `workdir`; returns (markdown, warnings).

  The first metric is the one plotted, against `x` with one line per `series` (see
  plots.xy_series), and against quantized bytes; `x_scale` as in `plots.log_x`. Raises SweepError
  without a usable sweep.json, ValueError for an axis that names nothing or a bad
  x_scale.
  """
  if x_scale not in plots.X_SCALES:
    raise ValueError(f"x_scale={x_scale!r}; choose one of {list(plots.X_SCALES)}")
  sweep, results, warnings = load_results(workdir)
  metrics = list(metrics or choose_metrics(results))
  if higher_is_better is None:
    higher_is_better = is_higher_better(metrics[0])
  swept_keys = sweep.get("swept_keys")
  rows = group_rows(results, swept_keys if isinstance(swept_keys, list) else ())
  drawn = []
  x = axes.resolve_key(x, rows)
  x_plot = plots.plot_file(metrics[0], x)
  if plots.plot_xy(rows, metrics[0], os.path.join(workdir, x_plot), x=x, series=series,
                   bits_key=bits_key, x_scale=x_scale):
    drawn.append(x_plot)
  else:
    warnings.append(f"{x_plot} not drawn: no finished run has {metrics[0]} and a value "
                    f"of {x!r}" + (f" (or a {bits_key} config key)" if x == "bits" else ""))
  if plots.plot_vs_bytes(rows, metrics[0], os.path.join(workdir, plots.BYTES_PLOT),
                         higher_is_better=higher_is_better):
    drawn.append(plots.BYTES_PLOT)
  else:
    warnings.append(f"{plots.BYTES_PLOT} not drawn: no finished run has {metrics[0]} and "
                    "param_bytes.quantized")
  text = markdown(workdir, sweep, results, rows, metrics, warnings, drawn)
  tmp = os.path.join(workdir, f".{REPORT_FILE}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, REPORT_FILE))
  return text, warnings
