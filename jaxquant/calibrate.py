"""`calibrate`: post-training statistics of a quantized model on calibration batches.

It runs the quantized model with the calibration observer (and, for layers whose rule
names a PTQ algorithm, the PTQ statistics) on each batch and turns the observer's range
into each layer's static activation range in 'quant_stats' (`jaxquant.state`). `convert`
then reads both.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import nnx_functional
from jaxquant import observers as obs
from jaxquant import state
from jaxquant import transform
from jaxquant.spec import PTQ_METHODS

FORWARDS = ("quantized", "float")


def calibrate(qmodel, variables, batches: Iterable, *, masks=None, forward="quantized",
              rngs=None, observers=(), **model_kwargs):
  """Post-training calibration of static activation ranges (and PTQ statistics).

  Runs `qmodel` on every batch (each a positional input, or a tuple of them) and returns
  `variables` with, for every quantized layer with an activation spec, the static range
  'act_lo' / 'act_hi' / 'act_count' in 'quant_stats' (`observers.calibration_range`:
  min/max over batches for absmax, the mean of per-batch clip ranges for percentile /
  MSE). Calibrated layers then quantize activations with that fixed range instead of the
  batch's own. Layers whose rule names a PTQ algorithm also collect its statistics
  (`observers.ptq_stats`, under 'ptq_*'). `observers` adds named observer factories; their
  states are kept in 'quant_stats'.
  `**model_kwargs` are the model's own keyword arguments (e.g. `train=False`,
  `deterministic=True`), passed to every `apply` as the Python values they are (never
  traced), so `if train:` and `nn.BatchNorm(use_running_average=not train)` work.
  An NNX model takes and returns its `nnx.State` (apply it with `nnx.update(model,
  state)`). Earlier static ranges are dropped first. Raises ValueError for an empty set of
  batches, and names the layer whose calibration input held NaN or Inf.

  `masks`: None, or one array per batch (same order) marking the real rows (1 / True)
  of every quantized layer's input, e.g. the [batch, tokens] attention mask of a padded
  text batch. Rows a mask leaves out (padding) count in no statistic: not in the static
  ranges, nor in XᵀX, Σ|x|, max|x| or their row count, nor in the NaN/Inf check. Each
  mask's shape must equal the leading axes of every quantized layer's input rows (its
  non-contracted axes; it is broadcast over the rest); a layer where it does not gets a
  ValueError naming it.

  `forward`: which model the calibration batches run through. 'quantized' (default):
  every layer computes as its rule says (weights round-to-nearest, activations with
  their own dynamic ranges), so each layer's statistics are of the inputs the
  quantized model feeds it. 'float': every matched layer computes in float, so each
  layer's statistics are of the float model's activations (the one-pass calibration
  of the GPTQ, AWQ and SmoothQuant papers; each layer's error is then measured
  against the float model's own inputs).
  """
  if forward not in FORWARDS:
    raise ValueError(f"forward={forward!r} is not allowed; choose one of {list(FORWARDS)}")
  float_forward = forward == "float"
  qmodel, variables, finish = nnx_functional.as_functional(qmodel, variables)
  ptq_names = () if not any(r.ptq for r in transform.config_of(qmodel).rules) else (
      (state.PTQ_STATS, obs.ptq_stats(methods=PTQ_METHODS)),)
  observers = ptq_names + tuple(observers)
  view = transform.with_observers(  # no mask
      qmodel, ((state.CALIBRATION, obs.calibration_range()),) + observers,
      float_forward=float_forward)
  variables = state.mutable_copy(variables)
  names = [state.CALIBRATION] + [name for name, _ in observers]
  stats = _drop(variables.pop(state.QUANT_STATS, {}), names)

  observer_list = ((state.CALIBRATION, obs.calibration_range()),) + observers

  @jax.jit
  def step(others, stats, mask, *batch):  # parameters are arguments: no constant folding
    run = view if mask is None else transform.with_observers(qmodel, observer_list, mask,
                                                             float_forward)
    _, upd = run.apply({**others, state.QUANT_STATS: stats}, *batch,
                       mutable=[state.QUANT_STATS], rngs=rngs, **model_kwargs)
    return upd[state.QUANT_STATS]

  mask_iter = None if masks is None else iter(masks)
  n = 0
  for batch in batches:
    batch = batch if isinstance(batch, tuple) else (batch,)
    mask = None
    if mask_iter is not None:
      mask = next(mask_iter, None)
      if mask is None:
        raise ValueError(f"calibrate: masks has {n} entries but batches has more; give "
                         "one mask per batch")
      mask = jnp.asarray(mask).astype(bool)
    stats = step(variables, stats, mask, *batch)
    n += 1
  if n == 0:
    raise ValueError("calibrate needs at least one batch; got an empty iterable")
  if mask_iter is not None and next(mask_iter, None) is not None:
    raise ValueError(f"calibrate: masks has more entries than the {n} batches; give one "
                     "mask per batch")
  stats = state.mutable_copy(jax.device_get(stats))
  for path, node in state.layer_dicts(stats):
    xtx = node.get(state.observer_key(state.PTQ_STATS, "xtx"))
    if xtx is not None and not np.all(np.isfinite(xtx)):
      raise ValueError(f"calibration input of layer {path!r} holds NaN/Inf values (its PTQ "
                       "statistics are not finite); clean the calibration batches")
    calib = state.observer_state(state.CALIBRATION, node)
    if "hi" not in calib:
      continue
    for k in calib:
      del node[state.observer_key(state.CALIBRATION, k)]
    bad = int(calib["nonfinite"])
    if bad:
      raise ValueError(f"calibration input of layer {path!r} holds {bad} NaN/Inf values; "
                       "clean the calibration batches")
    state.set_static_range(node, calib["lo"], calib["hi"], calib["count"])
  return finish({**variables, state.QUANT_STATS: stats})


def _drop(tree, names):
  """'quant_stats' without static ranges and earlier states of the named observers."""
  if not isinstance(tree, dict):
    return tree
  return {k: _drop(v, names) for k, v in tree.items()
          if k not in state.STATIC_RANGE and not state.is_observer_key(k, names)}
