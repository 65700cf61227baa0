"""The sweep report: numbers against numpy on hand-made summaries, the Pareto front,
tolerance of broken points, the plots, and the failures of a real (fake-trainer) sweep."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import sweeps
from experiments.sweeps import axes, collect, plots, report
from experiments.sweeps import plan

REPO = pathlib.Path(__file__).resolve().parents[2]


def summary(accuracy, *, bits=4, quantized=500, serving=None, config=None):
  metrics = {"test_accuracy": accuracy, "final_loss": 0.1}
  if serving is not None:
    metrics["serving_test_accuracy"] = serving
  return {"config": config if config is not None else {"quant": {"bits": bits}},
          "metrics": metrics, "param_bytes": {"float": 4000, "quantized": quantized},
          "wall_time_s": 1.0, "steps": 10, "versions": {}}


def make_sweep(workdir, points):
  """points: [(overrides, summary dict | raw str | None)] -> writes sweep.json + files."""
  built = sweeps.build_points([o for o, _ in points], config_arg="c.py", workdir=str(workdir))
  plan.write_sweep_json(str(workdir), built, config_arg="c.py", trainer="t")
  for point, (_, content) in zip(built, points):
    if content is None:
      continue
    os.makedirs(point.directory, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    pathlib.Path(point.directory, plan.SUMMARY_FILE).write_text(text)
  return built


def is_png(path):
  data = pathlib.Path(path).read_bytes()
  return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000


def test_table_mean_std_match_numpy(tmp_path):
  rng = np.random.default_rng(0)
  acc = {(bits, width): rng.uniform(0.5, 0.9, size=3) for bits in (2, 8) for width in (16, 32)}
  points = [({"quant.bits": b, "model.width": w, "seed": s},
             summary(float(acc[b, w][s]), bits=b, quantized=b * 100 + w,
                     serving=float(acc[b, w][s]) - 0.01))
            for b in (2, 8) for w in (16, 32) for s in range(3)]
  make_sweep(tmp_path, points)
  text, warnings = report.write_report(str(tmp_path))
  assert warnings == []
  _, results, _ = collect.load_results(str(tmp_path))
  rows = collect.group_rows(results)
  assert [r.values for r in rows] == [{"quant.bits": b, "model.width": w}
                                      for b in (2, 8) for w in (16, 32)]
  for row in rows:
    values = acc[row.values["quant.bits"], row.values["model.width"]]
    stat = row.stat("test_accuracy")
    assert stat.n == 3
    assert stat.mean == pytest.approx(np.mean(values))
    assert stat.std == pytest.approx(np.std(values, ddof=1))
    assert row.stat("serving_test_accuracy").mean == pytest.approx(np.mean(values) - 0.01)
    b, w = row.values["quant.bits"], row.values["model.width"]
    ratio = 4000 / (b * 100 + w)
    cells = (f"| {b} | {w} | 3/3 | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} | "
             f"{np.mean(values) - 0.01:.4f} ± {np.std(values, ddof=1):.4f} | "
             f"{b * 100 + w:,} | {ratio:.2f}× |")
    assert cells in text
  assert "| quant.bits | model.width | runs | test_accuracy | serving test_accuracy |" in text
  assert (tmp_path / "report.md").read_text() == text
  assert is_png(tmp_path / plots.BITS_PLOT) and is_png(tmp_path / plots.BYTES_PLOT)
  lines = plots.xy_series(rows, "test_accuracy")
  assert sorted(lines) == ["width=16", "width=32"]
  assert [p.x for p in lines["width=16"]] == [2.0, 8.0]
  # No rules in these configs: the bits alone, and the width it does not imply.
  assert "| 2 bits, width=16 | 2 | 16 | 3/3 |" in text


def test_float_is_32_bits_and_presets_label_points(tmp_path):
  make_sweep(tmp_path, [
      ({"quant.preset": "float", "seed": 0}, summary(0.9, config={"quant": {"bits": None}})),
      ({"quant.preset": "w4a4", "seed": 0}, summary(0.7, bits=4)),
      ({"quant.preset": "w4a8", "seed": 0}, summary(0.8, bits=4)),
      ({"quant.preset": "none", "seed": 0}, summary(0.91, config={"model": {}})),
  ])
  _, results, _ = collect.load_results(str(tmp_path))
  rows = collect.group_rows(results)
  # None: the key is absent, so that row has no x and is left off the plot.
  assert [axes.row_value(r, "bits") for r in rows] == [32.0, 4.0, 4.0, None]
  (line,) = plots.xy_series(rows, "test_accuracy").values()
  assert [(p.x, p.label) for p in line] == [
      (4.0, "4 bits, preset=w4a4"), (4.0, "4 bits, preset=w4a8"), (32.0, "float, preset=float")]
  assert plots.plot_xy(rows, "test_accuracy", str(tmp_path / "b.png"))
  assert is_png(tmp_path / "b.png")


def test_pareto_front_hand_made():
  pts = [(100, .5), (200, .7), (150, .4), (300, .7), (400, .9), (50, .45), (200, .65),
         (500, math.nan)]
  assert plots.pareto_front(pts) == [5, 0, 1, 4]
  # Lower is better (e.g. bits per byte): only strict improvements as bytes grow.
  assert plots.pareto_front(pts, higher_is_better=False) == [5, 2]
  assert plots.pareto_front([(10, 2.0), (20, 1.5), (30, 1.7), (40, 1.0)],
                             higher_is_better=False) == [0, 1, 3]
  assert plots.pareto_front([]) == []


def test_pareto_front_matches_brute_force():
  rng = np.random.default_rng(1)
  pts = [(float(b), float(m)) for b, m in zip(rng.uniform(1, 1e6, 60), rng.uniform(0, 1, 60))]
  front = plots.pareto_front(pts)
  brute = [i for i, (b, m) in enumerate(pts)
           if not any(j != i and bj <= b and mj >= m for j, (bj, mj) in enumerate(pts))]
  assert sorted(front) == sorted(brute)
  assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_single_point_and_no_bits_key(tmp_path):
  make_sweep(tmp_path, [({"seed": 0}, summary(0.8, config={"model": {"width": 8}}))])
  text, warnings = report.write_report(str(tmp_path))
  assert "| all runs" not in text and "| 1/1 | 0.8000 |" in text
  assert any(plots.BITS_PLOT in w for w in warnings)
  assert not (tmp_path / plots.BITS_PLOT).exists()
  assert is_png(tmp_path / plots.BYTES_PLOT)


def test_broken_points_are_reported_not_fatal(tmp_path):
  built = make_sweep(tmp_path, [
      ({"quant.bits": 2}, summary(0.6, bits=2)),
      ({"quant.bits": 3}, "{not json"),
      ({"quant.bits": 4}, {"metrics": "nope"}),
      ({"quant.bits": 5}, None),
      ({"quant.bits": 6}, summary(0.7, bits=6) | {"param_bytes": None}),
      ({"quant.bits": 7}, None),
  ])
  os.makedirs(built[5].directory)
  plan.record_failure(built[5].directory, 3, command="train")
  text, warnings = report.write_report(str(tmp_path))
  assert sum("malformed" in w for w in warnings) == 2
  assert "## Warnings" in text and "quant.bits=3/summary.json is malformed" in text
  assert "## Not run\n\n- quant.bits=5\n" in text
  assert "## Failed points\n\n### quant.bits=7\n\nexit status 3" in text
  assert "| 6 | 1/1 | 0.7000 | — | — |" in text
  assert "6 points: 2 ok, 1 failed, 2 malformed, 1 not run" in text


def test_cli_lists_failures_of_a_real_sweep_and_needs_sweep_json(tmp_path):
  env = dict(os.environ, FAKE_TRAIN_LEDGER=str(tmp_path / "ledger.txt"))
  sweep = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=tests/experiments/fixtures/fake_config.py:crash",
       f"--workdir={tmp_path / 's'}", "--trainer=tests.experiments.fixtures.fake_train"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert sweep.returncode == 1, sweep.stdout + sweep.stderr
  result = subprocess.run(
      [sys.executable, "-m", "experiments.report", f"--workdir={tmp_path / 's'}",
       "--metric=test_accuracy,final_loss"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "| crash | runs | test_accuracy | serving test_accuracy | final_loss |" in result.stdout
  assert "| False | 2/2 | 0.9100 ± 0.0141 |" in result.stdout  # seeds 0 and 2
  assert "| True | 0/1 | — |" in result.stdout
  assert "### crash=True,seed=1" in result.stdout
  assert "RuntimeError: fake crash at step 3" in result.stdout
  assert (tmp_path / "s" / "report.md").read_text().strip() == result.stdout.strip()
  missing = subprocess.run(
      [sys.executable, "-m", "experiments.report", f"--workdir={tmp_path / 'nope'}"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and "sweep.json not found" in missing.stderr


def _resolved(overrides, make=None):
  """A recipe config with overrides applied, as the trainer writes it to summary.json."""
  from configs import quickstart
  from experiments.training.config_build import config_to_dict
  from tests.experiments.test_configs import _apply
  return config_to_dict(_apply((make or quickstart.get_config)(), overrides))


def test_quant_labels_of_real_configs():
  from configs import quickstart
  got = {name: axes.quant_label(_resolved(o)) for name, o in quickstart.SETTINGS.items()}
  assert got == {"float": "float", "w8a8": "W8A8", "w4a4": "W4A4", "w2a2": "W2A2",
                 "binary": "binary W1A8"}
  assert axes.quant_label(_resolved({"quant.bits": 3, "quant.act_bits": 8})) == "W3A8"
  config = _resolved({"quant.bits": 4})
  last = config["quant"]["rules"][-1]
  assert axes.quant_label(config | {"quant": config["quant"] | {
      "rules": [{**last, "act": None}]}}) == "W4 weight-only"
  assert axes.quant_label(config | {"quant": config["quant"] | {
      "rules": [{**last, "weight": None}]}}) == "A4 activation-only"
  grad = {"format": "int", "bits": 8, "rounding": "stochastic"}
  assert axes.quant_label(config | {"quant": config["quant"] | {
      "rules": [{**last, "grad": grad}]}}) == "W4A4, G8 grads (stochastic)"
  binary = {"format": "binary"}  # BNN: binary weights and activations
  assert axes.quant_label(config | {"quant": config["quant"] | {
      "rules": [{**last, "weight": binary, "act": binary}]}}) == "binary W1A1"
  assert [axes.config_bits(_resolved(o)) for o in quickstart.SETTINGS.values()] == [
      32.0, 8.0, 4.0, 2.0, 1.0]
  assert axes.quant_label({"model": {}}) is None


def test_quickstart_shape_is_one_labelled_line(tmp_path):
  """The quickstart's points all differ in quant.* keys only: one line, each point
  annotated with its human label (not `quant.format=int, quant.act_bits=32, ...`)."""
  from configs import quickstart
  accs = {"float": .94, "w8a8": .95, "w4a4": .93, "w2a2": .88, "binary": .91}
  make_sweep(tmp_path, [({**o, "seed": s}, summary(accs[n] + s / 100, config=_resolved(o)))
                        for n, o in quickstart.SETTINGS.items() for s in range(2)])
  text, warnings = report.write_report(str(tmp_path))
  assert warnings == []
  _, results, _ = collect.load_results(str(tmp_path))
  lines = plots.xy_series(collect.group_rows(results), "test_accuracy")
  assert list(lines) == ["test_accuracy"]
  assert [(p.x, p.label) for p in lines["test_accuracy"]] == [
      (1.0, "binary W1A8"), (2.0, "W2A2"), (4.0, "W4A4"), (8.0, "W8A8"), (32.0, "float")]
  assert [round(p.stat.mean, 4) for p in lines["test_accuracy"]] == [.915, .885, .935, .955,
                                                                     .945]
  assert "| float | 32 | int | 32 | lsq | 2/2 |" in text
  assert "| binary W1A8 | 1 | binary | 8 | identity | 2/2 |" in text


def test_chosen_x_and_series(tmp_path):
  """--x=lr --series=quant.bits: lines per bits over the lr values; a text axis is
  categorical; an ambiguous or unknown axis is an error naming the keys."""
  acc = {(b, lr): 0.5 + b / 100 + lr for b in (2, 4) for lr in (0.01, 0.03)}
  make_sweep(tmp_path, [
      ({"quant.bits": b, "optimizer.lr": lr, "eval.input_noise_std": 0.0,
        "eval.weight_noise_std": 0.0, "seed": s},
       summary(acc[b, lr] + s / 1000, config=_resolved({"quant.bits": b})))
      for b in (2, 4) for lr in (0.03, 0.01) for s in range(3)])
  text, _ = report.write_report(str(tmp_path), x="lr", series=["quant.bits"])
  assert is_png(tmp_path / "test_accuracy_vs_optimizer_lr.png")
  assert "![test_accuracy_vs_optimizer_lr.png]" in text
  _, results, _ = collect.load_results(str(tmp_path))
  rows = collect.group_rows(results)
  lines = plots.xy_series(rows, "test_accuracy", "lr", ["quant.bits"])
  assert sorted(lines) == ["bits=2", "bits=4"]
  for b in (2, 4):
    pts = lines[f"bits={b}"]
    assert [p.x for p in pts] == [0.01, 0.03]  # sorted numerically
    assert [p.stat.mean for p in pts] == pytest.approx([acc[b, .01] + .001, acc[b, .03] + .001])
    assert all(p.label == "" for p in pts)  # the axes already say everything
  by_label = plots.xy_series(rows, "test_accuracy", "label", [])
  assert [p.x for p in by_label["test_accuracy"]] == ["W2A2", "W2A2", "W4A4", "W4A4"]
  assert plots.plot_xy(rows, "test_accuracy", str(tmp_path / "l.png"), x="label", series=[])
  with pytest.raises(ValueError, match="ambiguous.*input_noise_std.*weight_noise_std"):
    plots.xy_series(rows, "test_accuracy", "noise_std")
  with pytest.raises(ValueError, match="neither.*optimizer.lr"):
    plots.xy_series(rows, "test_accuracy", "nonsense")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.report", f"--workdir={tmp_path}", "--x=nonsense"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "nonsense" in result.stderr


def test_staged_points_group_over_seeds_under_their_stage(tmp_path):
  points = []
  for seed in (0, 1):
    first = {"quant.bits": 8, "seed": seed}
    second = {"quant.bits": 4, "seed": seed, "start": sweeps.ref(first)}
    points += [(first, summary(0.9 + 0.01 * seed, bits=8)),
               (second, summary(0.8 + 0.02 * seed, bits=4))]
  make_sweep(tmp_path, points)
  _, results, _ = collect.load_results(str(tmp_path))
  rows = collect.group_rows(results, ["quant.bits", "seed", "start"])
  assert [r.values for r in rows] == [{"quant.bits": 8, "start": None},
                                      {"quant.bits": 4, "start": "after 8 bits"}]
  assert rows[1].stat("test_accuracy").mean == pytest.approx(0.81)
  assert rows[1].stat("test_accuracy").n == 2


def test_bops_columns_when_summaries_count_compute(tmp_path):
  def with_compute(acc, bops):
    s = summary(acc)
    s["compute_per_example"] = {"macs": 100, "bops": bops, "float_bops": 102400}
    return s
  make_sweep(tmp_path, [({"quant.bits": 4, "seed": 0}, with_compute(0.9, 1600)),
                        ({"quant.bits": 4, "seed": 1}, with_compute(0.8, 1600)),
                        ({"quant.bits": 2, "seed": 0}, summary(0.7))])
  sweep, results, _ = collect.load_results(str(tmp_path))
  rows = collect.group_rows(results, sweep["swept_keys"])
  text = report.markdown(str(tmp_path), sweep, results, rows, ["test_accuracy"])
  assert "| BOPs/example | float/BOPs |" in text
  assert "| 1,600 | 64.0× |" in text
  assert text.rstrip().count("| — | — |") >= 1  # the row without compute


def test_x_scale_log_for_values_over_decades(tmp_path, monkeypatch):
  """'auto' draws a numeric x on a log axis when its values are > 0 and span ≥ 10x
  (learning rates), linearly otherwise; 'log' refuses values ≤ 0; unknown scales fail."""
  assert plots.log_x([1e-4, 1e-3, 3e-2]) and plots.log_x([1e-3, 3e-2])
  assert not plots.log_x([0.01, 0.03])  # 3x: linear
  assert not plots.log_x([0.0, 0.5, 1.0])  # zero: linear
  assert not plots.log_x(["W4A4", "W2A2"])  # text: categories
  assert not plots.log_x([1e-4, 3e-2], "linear") and plots.log_x([0.01, 0.03], "log")
  with pytest.raises(ValueError, match="> 0"):
    plots.log_x([0.0, 1.0], "log")
  with pytest.raises(ValueError, match="x_scale"):
    plots.log_x([1.0], "cubic")
  make_sweep(tmp_path, [({"optimizer.lr": lr, "seed": s}, summary(0.5 + s / 100))
                        for lr in (1e-4, 1e-3, 1e-2) for s in range(2)])
  from matplotlib.axes import Axes  # pylint: disable=import-outside-toplevel
  scales = []
  real_set_xscale = Axes.set_xscale
  monkeypatch.setattr(Axes, "set_xscale",
                      lambda ax, v, **kw: (scales.append(v), real_set_xscale(ax, v, **kw)))
  report.write_report(str(tmp_path), x="lr")
  report.write_report(str(tmp_path), x="lr", x_scale="linear")
  assert is_png(tmp_path / "test_accuracy_vs_optimizer_lr.png")
  # first report: log for lr (and for the bytes plot); second: only the bytes plot's
  assert scales == ["log", "log", "log"]
  with pytest.raises(ValueError, match="x_scale"):
    report.write_report(str(tmp_path), x="lr", x_scale="cubic")
