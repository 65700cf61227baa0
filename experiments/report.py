"""Summarises a sweep directory: report.md (mean ± std over seeds, failures) and plots.

    python -m experiments.report --workdir=runs/sweep [--metric=test_accuracy] \
        [--x=bits] [--series=optimizer.lr] [--x_scale=auto|linear|log]

Writes DIR/report.md, the metric against --x (DIR/accuracy_vs_bits.png for the default
x, else DIR/METRIC_vs_X.png) with one line per --series value, and
DIR/accuracy_vs_bytes.png, and prints the markdown. --x and --series take 'bits'
(weight bits of the quantized layers, float = 32), 'label' (the human setting name:
float, W4A4, binary W1A8, ...), any dotted config key, or a unique suffix of a swept
key (--x=noise_std). Points that failed, never ran, or left a malformed summary.json
are listed, not fatal. Exit status 2 when DIR has no readable sweep.json or an axis
names no key.
"""
from __future__ import annotations

import sys

from absl import app, flags

from experiments.sweeps import SweepError, plots, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (holds sweep.json).")
_METRIC = flags.DEFINE_list(
    "metric", None, "Metric(s) from summary.json's 'metrics' to tabulate; the first is "
    "plotted. Default: test_accuracy, or test_bits_per_byte for language models.")
_BITS_KEY = flags.DEFINE_string("bits_key", plots.BITS_KEY,
                                "Dotted config key giving a run's bits (absent/None: float).")
_X = flags.DEFINE_string("x", "bits", "Plot x axis: 'bits', 'label' or a config key.")
_SERIES = flags.DEFINE_list(
    "series", None, "Keys whose values make the plot's lines (default: the varying swept "
    "keys other than x, seed and quant.*; an empty string: one line).")
_X_SCALE = flags.DEFINE_enum("x_scale", "auto", ["auto", "linear", "log"],
                             "Numeric --x axis scale (auto: log when the values are > 0 "
                             "and span >= 10x, e.g. learning rates).")
_GOAL = flags.DEFINE_enum("goal", "auto", ["auto", "max", "min"],
                          "Whether a higher metric is better (auto: from its name).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  """Writes and prints the report; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  higher_is_better = {"auto": None, "max": True, "min": False}[_GOAL.value]
  try:
    text, warnings = report.write_report(_WORKDIR.value, _METRIC.value,
                                         x=_X.value, series=_SERIES.value,
                                         bits_key=_BITS_KEY.value,
                                         higher_is_better=higher_is_better,
                                         x_scale=_X_SCALE.value)
  except (SweepError, ValueError) as e:
    print(f"report: error: {e}", file=sys.stderr)
    return 2
  print(text)
  for warning in warnings:
    print(f"report: warning: {warning}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(main)
