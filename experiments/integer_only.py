r"""Train (QAT), convert to an integer-only program, save it and evaluate it: one command.

    python -m experiments.integer_only --config=configs/mnist1d_integer.py:w8a8 --workdir=DIR
    python -m experiments.integer_only --config=configs/digits_resnet.py:w8a8 --workdir=DIR

Any training config works; one without an `integer` section (configs/mnist1d_integer.py
documents its keys) gets its defaults: jq.calibrate on the whole training split in
batches of the training batch size.

Steps: `train_and_evaluate` on the config without its `integer` section (a finished run in
DIR is reused: rerunning resumes from its last checkpoint); restore the trained variables;
`jq.calibrate` them on batches of the training split (static activation ranges, the
library's PTQ step: the QAT model's own evaluation uses each test batch's range, which a
fixed-point program cannot); `jq.to_integer` with the same batches; save the program to
DIR/integer_program; evaluate its test accuracy with JAX (`program(x)`) and with
jaxquant/deploy/numpy_runtime.py on the saved directory (logits compared bit for bit);
write DIR/integer_summary.json and print one line.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

from absl import app, flags
import ml_collections
from ml_collections import config_flags
import jax
import numpy as np

import jaxquant as jq
from jaxquant.integer_only import qat_view
from experiments.training import loop, restore
from experiments.training.results import write_json_atomic

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/mnist1d_integer.py[:arg]",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


def _numpy_runtime():
  # the runtime file ships inside the package
  path = os.path.join(os.path.dirname(jq.__file__), "deploy", "numpy_runtime.py")
  spec = importlib.util.spec_from_file_location("numpy_runtime", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, converts, saves and evaluates; returns the integer summary dict."""

  train_config = ml_collections.ConfigDict(config.to_dict())
  if "integer" in train_config:
    int_cfg = config.integer
    del train_config["integer"]
  else:  # any training config: the recipe's defaults
    int_cfg = ml_collections.ConfigDict({"ranges": "calibrate", "calibration_batches": -1,
                                         "calibration_batch_size": config.batch_size,
                                         "eval_batch_size": 500})
  summary = loop.train_and_evaluate(train_config, workdir)
  step, state, setup = restore.load_checkpoint(train_config, workdir)
  variables = {**state["trainable"], **state["state"]}

  t0 = time.time()
  train_x, _ = setup.dataset.split("train")
  b = int_cfg.calibration_batch_size
  n = len(train_x) // b if int_cfg.calibration_batches < 0 else int_cfg.calibration_batches
  batches = [np.asarray(train_x[i * b:(i + 1) * b]) for i in range(n)]
  if int_cfg.ranges not in ("calibrate", "ema"):
    raise ValueError(f"integer.ranges={int_cfg.ranges!r}; choose 'calibrate' or 'ema'")
  if int_cfg.ranges == "calibrate":
    variables = jq.calibrate(setup.model, variables, batches)
  else:  # the same grids to_integer takes from the EMA, for the QAT comparison below
    variables = qat_view.ema_as_static(variables)
  program = jq.to_integer(setup.model, variables, batches)
  out_dir = os.path.join(os.path.abspath(workdir), "integer_program")
  program.save(out_dir)
  convert_s = time.time() - t0

  test_x, test_y = setup.dataset.split("test")
  nr = _numpy_runtime()
  saved = nr.load(out_dir)
  qat_static = jax.jit(setup.model.apply)  # the QAT model on the program's static ranges
  jax_logits, np_logits, qat_logits = [], [], []
  for i in range(0, len(test_x), int_cfg.eval_batch_size):
    x = np.asarray(test_x[i:i + int_cfg.eval_batch_size])
    jax_logits.append(np.asarray(program(x)))
    np_logits.append(nr.run(saved, nr.quantize_input(saved, x)))
    qat_logits.append(np.asarray(qat_static(variables, x)))
  jax_logits, np_logits = np.concatenate(jax_logits), np.concatenate(np_logits)
  qat_logits = np.concatenate(qat_logits)
  bytes_on_disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
  result = {
      "workdir": os.path.abspath(workdir),
      "steps": step,
      "qat_test_accuracy": summary["metrics"]["test_accuracy"],
      "serving_test_accuracy": summary["metrics"]["serving_test_accuracy"],
      "qat_static_ranges_test_accuracy": float(np.mean(qat_logits.argmax(-1) == test_y)),
      "prediction_agreement_with_qat_static": float(np.mean(
          qat_logits.argmax(-1) == jax_logits.argmax(-1))),
      "integer_test_accuracy": float(np.mean(jax_logits.argmax(-1) == test_y)),
      "numpy_runtime_test_accuracy": float(np.mean(np_logits.argmax(-1) == test_y)),
      "numpy_runtime_bit_exact": bool(np.array_equal(jax_logits, np_logits)),
      "program_ops": len(program.graph.ops),
      "program_bytes": bytes_on_disk,
      "output_scale": program.output_scale,
      "convert_and_eval_s": round(time.time() - t0, 1),
      "convert_s": round(convert_s, 1),
      "ranges": int_cfg.ranges,
      "calibration_examples": n * b,
      "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
  }
  result["delta_points"] = 100 * (result["integer_test_accuracy"] - result["qat_test_accuracy"])
  write_json_atomic(os.path.join(os.path.abspath(workdir), "integer_summary.json"), result)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value or _CONFIG.value is None:
    raise app.UsageError("--config and --workdir are required")
  r = run(_CONFIG.value, _WORKDIR.value)
  print(f"done: QAT test_accuracy={r['qat_test_accuracy']:.4f} (static ranges "
        f"{r['qat_static_ranges_test_accuracy']:.4f}) integer={r['integer_test_accuracy']:.4f} "
        f"({r['delta_points']:+.2f} points) numpy_runtime={r['numpy_runtime_test_accuracy']:.4f} "
        f"bit_exact={r['numpy_runtime_bit_exact']} program={r['program_bytes']} bytes "
        f"-> {r['workdir']}/integer_program", flush=True)


if __name__ == "__main__":
  app.run(main)
