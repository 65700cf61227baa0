"""Test-set evaluations of a run: the trained (QAT or float) model, the converted serving
model, the model under evaluation noise, and post-training quantization.

Each evaluator is jitted once with the run's shardings and reused. `final_evaluation` is
what the end of a run computes and logs; `compute_per_example` the MACs and bit
operations its summary reports.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import numpy as np

import jaxquant as jq
from jaxquant import state as jq_state
from experiments.data import BatchIterator, eval_batches
from experiments.training import sharding, steps
from experiments.training.run_setup import Setup, qat_variables


def _padded_eval_batches(ds, batch_size: int):
  """Test batches padded to `batch_size` (fixed shapes under jit) with a mask."""
  for batch in eval_batches(ds, batch_size):
    n = batch["x"].shape[0]
    mask = np.zeros((batch_size,), np.float32)
    mask[:n] = 1.0
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch, mask


def make_evaluator(setup: Setup, apply_fn: Callable, variable_shardings: Any, *,
                   quantized: bool, input_noise_std: float = 0.0
                   ) -> Callable[[Any], dict[str, float]]:
  """`evaluator(variables)`: loss / accuracy (/ bits per byte for 'lm') on the test split.

  The eval step is jitted once here and reused by every evaluation of the run. With
  `input_noise_std` > 0 every test input gets Gaussian noise of that many standard
  deviations of the training inputs (draws fixed by the config's seed).
  """
  batch_sh = sharding.batch_sharding(setup.mesh)
  eval_step = jax.jit(
      steps.make_eval_step(apply_fn, quantized=quantized, lm=setup.lm, seed=setup.config.seed),
      in_shardings=(variable_shardings, batch_sh, batch_sh),
      out_shardings=sharding.replicated(setup.mesh))

  sigma = input_noise_std * float(np.std(setup.dataset.train_x)) if input_noise_std else 0.0

  def evaluator(variables) -> dict[str, float]:
    totals: dict[str, float] = {}
    noise = np.random.default_rng(setup.config.seed)
    for batch, mask in _padded_eval_batches(setup.dataset, setup.config.batch_size):
      if sigma:
        x = batch["x"]
        batch = {**batch, "x": (x + sigma * noise.standard_normal(x.shape)).astype(x.dtype)}
      placed = sharding.global_batch({**batch, "mask": mask}, batch_sh)
      mask_arr = placed.pop("mask")
      # Fetched per batch (float64 sums on the host): it also keeps a single computation
      # in flight, which multi-process CPU collectives (gloo) need to avoid deadlocks.
      sums = jax.device_get(eval_step(variables, placed, mask_arr))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return steps.summarize_eval(totals, lm=setup.lm)

  return evaluator


def noisy_weights(variables, std: float, seed: int):
  """Every kernel ('params' leaf with ndim >= 2) as w * (1 + std * N(0, 1))."""
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), max(len(leaves), 1))
  noisy = [w * (1 + std * jax.random.normal(k, w.shape, w.dtype)) if w.ndim >= 2 else w
           for w, k in zip(leaves, keys)]
  return {**variables, "params": jax.tree_util.tree_unflatten(treedef, noisy)}


def noisy_evaluation(setup: Setup, state) -> dict[str, float]:
  """The trained model's test metrics under the config's eval noise (see schema.py)."""
  config = setup.config
  evaluator = make_evaluator(setup, setup.model.apply, qat_variables(setup.state_shardings),
                             quantized=setup.quantized,
                             input_noise_std=config.eval.input_noise_std)
  variables = qat_variables(state)
  if config.eval.weight_noise_std:
    variables = noisy_weights(variables, config.eval.weight_noise_std, config.seed)
  return evaluator(variables)


def qat_evaluator(setup: Setup) -> Callable[[Any], dict[str, float]]:
  """Evaluates a train state's variables with the (possibly quantized) training model."""
  evaluator = make_evaluator(setup, setup.model.apply, qat_variables(setup.state_shardings),
                             quantized=setup.quantized)
  return lambda state: evaluator(qat_variables(state))


def evaluate_serving(setup: Setup, state, qat_metrics: dict[str, float]):
  """Metrics of the converted serving model and the parameter bytes {float, quantized}."""
  if not setup.quantized:
    float_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(state["trainable"]["params"]))
    return dict(qat_metrics), {"float": float_bytes, "quantized": float_bytes}
  example_x = setup.example_batch["x"][:1]  # lets convert trace the layer table if needed
  return _serve(setup, setup.model, qat_variables(state), example_x)


def _serve(setup: Setup, qmodel, variables, *example_args):
  """Converts `qmodel`'s variables, evaluates the serving model and sizes its weights:
  (metrics, {float, quantized} parameter bytes)."""
  serving_model, serving_vars = jq.convert(qmodel, variables, *example_args)
  replicated = sharding.replicated(setup.mesh)
  serving_vars = jax.device_put(serving_vars, replicated)
  metrics = make_evaluator(setup, serving_model.apply, replicated, quantized=True)(serving_vars)
  report = jq.size_report(serving_vars)  # float bytes vs the bytes serving stores
  return metrics, {"float": int(report.total_float_bytes),
                   "quantized": int(report.total_quantized_bytes)}


def post_training_quantize(setup: Setup, state) -> tuple[dict, dict, dict]:
  """PTQ of a trained float state with `setup.ptq_rules`.

  Calibrates the static activation ranges (and the PTQ algorithm's statistics) on the
  first `ptq.calib_batches` training batches (`jaxquant.calibrate`), evaluates that
  model, converts it (`jaxquant.convert`, which runs the rules' PTQ algorithm) and
  evaluates the serving model. Returns (PTQ metrics, serving metrics, param bytes); with
  a PTQ algorithm (GPTQ, AWQ, SmoothQuant) the PTQ metrics are the serving model's, the
  only one holding the algorithm's weights.
  """
  config = setup.config
  qmodel = jq.quantize_model(setup.float_model, setup.ptq_rules)
  example_x = np.asarray(setup.example_batch["x"][:1])
  key = jax.random.key(config.seed)
  qvars = dict(qmodel.init({"params": key, jq_state.RNG: key}, example_x))
  trained = jax.device_get(qat_variables(state))
  if (jax.tree_util.tree_structure(qvars["params"])
      != jax.tree_util.tree_structure(trained["params"])):
    raise ValueError("the quantized model's parameters do not match the trained float "
                     "model's; PTQ cannot map the weights")
  qvars.update(trained)  # float params (and e.g. batch_stats); quant_stats from init
  data = BatchIterator(setup.dataset, batch_size=config.batch_size, seed=config.seed)
  batches = [np.asarray(next(data)["x"]) for _ in range(config.ptq.calib_batches)]
  calibrated = jq.calibrate(qmodel, qvars, batches, rngs={jq_state.RNG: key})
  serving, param_bytes = _serve(setup, qmodel, calibrated)
  if any(rule.ptq is not None for rule in setup.ptq_rules):
    return dict(serving), serving, param_bytes
  replicated = sharding.replicated(setup.mesh)
  ptq_metrics = make_evaluator(setup, qmodel.apply, replicated, quantized=True)(
      jax.device_put(calibrated, replicated))
  return ptq_metrics, serving, param_bytes


def final_evaluation(setup: Setup, state, evaluate_qat, metrics_logger, step: int):
  """(test, serving, param bytes, extra metrics) at the end of a run, logged as it goes.

  QAT: the trained model and its converted serving model. PTQ: 'test' is the
  post-training-quantized model and the float model's metrics are kept as 'float_test'.
  """
  test = evaluate_qat(state)
  extra = {}
  if setup.config.eval.input_noise_std or setup.config.eval.weight_noise_std:
    noisy = noisy_evaluation(setup, state)
    metrics_logger.write(step, "noisy_test", noisy)
    extra.update({f"noisy_test_{k}": v for k, v in noisy.items()})
  if setup.ptq_rules:
    metrics_logger.write(step, "float_test", test)
    extra.update({f"float_test_{k}": v for k, v in test.items()})
    test, serving, param_bytes = post_training_quantize(setup, state)
  else:
    serving, param_bytes = evaluate_serving(setup, state, test)
  metrics_logger.write(step, "test", test)
  metrics_logger.write(step, "serving_test", serving)
  return test, serving, param_bytes, extra


def compute_per_example(setup: Setup) -> dict[str, int]:
  """MACs and bit operations of one example's forward pass (`jaxquant.compute_report`):
  {macs, bops, float_bops}, the bit widths those of the rules the run quantizes with
  (training's or the PTQ stage's; none for a float run)."""
  rules = setup.rules or setup.ptq_rules
  with warnings.catch_warnings():  # a float run's empty rule list matches no layer
    warnings.simplefilter("ignore")
    qmodel = jq.quantize_model(setup.float_model, rules)
    example = np.asarray(setup.example_batch["x"][:1])
    variables = jax.eval_shape(lambda k: qmodel.init({"params": k, jq_state.RNG: k}, example),
                               jax.random.key(0))
    report = jq.compute_report(qmodel, variables, example)
  return {"macs": report.total_macs, "bops": report.total_bops,
          "float_bops": report.total_float_bops}
