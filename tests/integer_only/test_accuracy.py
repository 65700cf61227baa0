"""Accuracy of integer programs on MNIST-1D.

Fast (default suite): a small CNN trained with W4A4 QAT for 300 steps in-process (seconds after compiling);
its integer program classifies the test set like the QAT model on the same static
(EMA) activation ranges. Slow: the recipe's one command, W8A8 and W4A4 as in the
quickstart, within 0.3 points of the QAT model's reported test accuracy.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.data import load_dataset
from jaxquant.integer_only import qat_view, to_integer
from experiments.models import CNN1D
from tests.integer_only.int_helpers import ROOT, rules, train_qat


def test_trained_cnn_program_classifies_like_qat():
  ds = load_dataset("mnist1d")
  (tx, ty), (ex, ey) = ds.split("train"), ds.split("test")
  qm, variables = train_qat(CNN1D(num_classes=10, channels=12), rules(bits=4), np.asarray(tx),
                            np.asarray(ty), steps=300, batch=32, lr=1e-2)
  static = qat_view.ema_as_static(variables)
  program = to_integer(qm, static, [np.asarray(tx[:256])])
  qat_pred = np.asarray(qm.apply(static, ex)).argmax(-1)
  int_pred = np.asarray(program(ex)).argmax(-1)
  qat_acc, int_acc = np.mean(qat_pred == ey), np.mean(int_pred == ey)
  print(f"QAT {qat_acc:.3f} integer {int_acc:.3f}")
  assert qat_acc > 0.25  # it learned something (chance is 0.1): the comparison means something
  assert abs(int_acc - qat_acc) <= 0.005 + 1e-9, (int_acc, qat_acc)  # 5 of 1000 examples
  assert np.mean(int_pred == qat_pred) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["w8a8", "w4a4"])
def test_recipe_within_0p3_points_of_qat(variant, tmp_path):
  cmd = [sys.executable, "-m", "experiments.integer_only",
         f"--config=configs/mnist1d_integer.py:{variant}", f"--workdir={tmp_path}"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(tmp_path, "integer_summary.json")) as f:
    summary = json.load(f)
  assert summary["numpy_runtime_bit_exact"]
  assert summary["numpy_runtime_test_accuracy"] == summary["integer_test_accuracy"]
  assert abs(summary["integer_test_accuracy"] - summary["qat_test_accuracy"]) <= 0.003 + 1e-9
  assert summary["prediction_agreement_with_qat_static"] >= 0.999  # the same model, in integers
  assert os.path.exists(os.path.join(tmp_path, "integer_program", "graph.json"))
