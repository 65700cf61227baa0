r"""MNIST-1D CNN: the quickstart's QAT, then its integer-only program, saved and evaluated.

  python -m experiments.integer_only --config=configs/mnist1d_integer.py:w8a8 --workdir=runs/int_w8a8
  python -m experiments.integer_only --config=configs/mnist1d_integer.py:w4a4 --workdir=runs/int_w4a4
  Expected (seed 0): the integer program's test accuracy within 0.3 points of the QAT
    model's (RESULTS.md has the measured numbers); the numpy runtime's int32 logits are
    bit-identical to the JAX program's on the whole test set.
  Runtime: the quickstart's QAT run (4000 steps, ~1-2 min on a 2-core CPU) plus ~30 s of
    conversion and evaluation (the numpy runtime is the slow part).

One command trains (or resumes / reuses a finished run in --workdir), calibrates static
activation ranges on batches of the training split (`jq.calibrate`; the QAT model's own
test metric quantizes each test batch with that batch's range, which no fixed-point
program can), converts with `jq.to_integer` (the same batches give the ranges QAT has
none for), saves the program to WORKDIR/integer_program, evaluates it
with JAX and with jaxquant/deploy/numpy_runtime.py, and writes WORKDIR/integer_summary.json.

Keys beyond the training config (the `integer` section, stripped before training):
  integer.ranges                   'calibrate': jq.calibrate before converting (static
                                   ranges: the mean over batches of each batch's range, as
                                   the model saw them in training); 'ema': the training EMA
  integer.calibration_batches      batches of the training split for both (-1: all of it)
  integer.calibration_batch_size   examples per calibration batch (default: the training
                                   batch size, so each batch's range is the kind of range
                                   the model was trained and evaluated with)
  integer.eval_batch_size          batch of the integer program's test-set evaluation
"""

import ml_collections

from configs import mnist1d_cnn, quickstart


def get_config(arg="w8a8"):
  config = quickstart.get_config()
  mnist1d_cnn.set_quant(config, arg)
  config.integer = ml_collections.ConfigDict()
  config.integer.ranges = "calibrate"
  config.integer.calibration_batches = -1
  config.integer.calibration_batch_size = config.batch_size
  config.integer.eval_batch_size = 500
  return config
