"""Observers: statistics of a layer's input, as optax-style pure `init` / `update` pairs.

An `Observer` is a pair of pure functions over a dict of arrays:
    state = observer.init(x_BMK)          # zeros of the right shapes
    state = observer.update(state, x_BMK) # after one more batch
where `x_BMK` is the layer's input viewed as [B, M, K]: K the contracted features (for a
convolution, its input channels), M the rows (tokens, examples, pixels), B the batch axes
a contraction shares with its weight (1 for ordinary layers).

`jq.quantize_model(..., observers=...)` runs a tuple of named observer factories at every
quantized layer whose 'quant_stats' collection is mutable; each factory maps the layer's
`Rule` to an `Observer` (or None where it does not apply) and its state is stored under
'quant_stats/<layer path>/<name>_<field>'. Training uses `ema_range` (the default);
`jq.calibrate` uses `calibration_range` and whatever PTQ statistics a caller asks for
(`second_moment` for GPTQ's XᵀX, `channel_absmax` / `channel_mean_abs` for SmoothQuant and
AWQ).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxquant import numerics
from jaxquant.spec import QuantSpec, Rule

State = Dict[str, jax.Array]
EMA_DECAY = 0.99


class Observer(NamedTuple):
  """Pure statistics of a layer input: `init(x) -> state`, `update(state, x) -> state`."""
  init: Callable[[jax.Array], State]
  update: Callable[[State, jax.Array], State]


ObserverFactory = Callable[[Rule], Optional[Observer]]


def batch_range(x, spec: QuantSpec):
  """(lo, hi) of this batch by the spec's calibration method, over the whole tensor."""
  axes = tuple(range(x.ndim))
  tensor_spec = dataclasses.replace(spec, granularity="tensor", group_size=None,
                                    rounding="nearest", ste="identity")
  scale, zp = numerics.calibrate(x, tensor_spec, axes)
  scale = scale.reshape(())
  if spec.format in numerics.FP8_DTYPES:
    hi = scale * numerics.FP8_MAX[spec.format]
    return -hi, hi
  qmin, qmax = numerics.int_range(tensor_spec)
  if zp is None:
    return -scale * qmax, scale * qmax
  zp = zp.reshape(()).astype(jnp.float32)
  return (qmin - zp) * scale, (qmax - zp) * scale


def _range_state(x) -> State:
  del x
  return {"lo": jnp.zeros((), jnp.float32), "hi": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def _has_range(rule: Rule) -> bool:
  return rule.act is not None and rule.act.format not in ("binary", "ternary")


def ema_range(decay: float = EMA_DECAY) -> ObserverFactory:
  """Exponential moving average of the per-batch activation range (the first batch
  starts it); a record of the ranges a layer saw in training."""
  def factory(rule: Rule) -> Optional[Observer]:
    if not _has_range(rule):
      return None

    def update(state, x):
      lo, hi = batch_range(jax.lax.stop_gradient(x).astype(jnp.float32), rule.act)
      first = state["count"] == 0
      return {"lo": jnp.where(first, lo, decay * state["lo"] + (1 - decay) * lo),
              "hi": jnp.where(first, hi, decay * state["hi"] + (1 - decay) * hi),
              "count": state["count"] + 1}
    return Observer(_range_state, update)
  return factory


def calibration_range() -> ObserverFactory:
  """The static activation range of PTQ: over the calibration batches, the min / max of
  the per-batch ranges for absmax calibration, and their mean for percentile / MSE (a
  clip range is a statistic of one batch; its mean is the usual estimate). It also
  counts non-finite inputs ('nonfinite'), which `jq.calibrate` refuses."""
  def factory(rule: Rule) -> Optional[Observer]:
    if not _has_range(rule):
      return None

    def update(state, x):
      lo, hi = batch_range(jax.lax.stop_gradient(x).astype(jnp.float32), rule.act)
      first = state["count"] == 0
      n = state["count"].astype(jnp.float32)
      if rule.act.calibration == "absmax":
        new_lo = jnp.where(first, lo, jnp.minimum(state["lo"], lo))
        new_hi = jnp.where(first, hi, jnp.maximum(state["hi"], hi))
      else:
        new_lo = (state["lo"] * n + lo) / (n + 1)
        new_hi = (state["hi"] * n + hi) / (n + 1)
      bad = jnp.sum(~jnp.isfinite(x)).astype(jnp.int32)
      return {"lo": new_lo, "hi": new_hi, "count": state["count"] + 1,
              "nonfinite": state["nonfinite"] + bad}
    init = lambda x: {**_range_state(x), "nonfinite": jnp.zeros((), jnp.int32)}
    return Observer(init, update)
  return factory


def _rows(x_BMK):
  """[B·M, K] float32 with non-finite entries as 0 (they would poison every sum)."""
  x = jax.lax.stop_gradient(x_BMK).astype(jnp.float32)
  x = x.reshape(-1, x.shape[-1])
  return jnp.where(jnp.isfinite(x), x, 0.0)


def second_moment() -> ObserverFactory:
  """Σ xᵀx over every input row ('xtx', [K, K]) and the row count ('rows'): GPTQ's
  Hessian is H = 2·xtx/rows (Frantar et al. 2022)."""
  def init(x):
    k = x.shape[-1]
    return {"xtx": jnp.zeros((k, k), jnp.float32), "rows": jnp.zeros((), jnp.int32)}

  def update(state, x):
    r = _rows(x)
    xtx = jax.lax.dot_general(r, r, (((0,), (0,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST)
    return {"xtx": state["xtx"] + xtx, "rows": state["rows"] + r.shape[0]}
  return lambda rule: Observer(init, update)


def channel_absmax() -> ObserverFactory:
  """max |x| per input channel ('absmax', [K]): SmoothQuant's activation statistic."""
  def init(x):
    return {"absmax": jnp.zeros((x.shape[-1],), jnp.float32)}

  def update(state, x):
    return {"absmax": jnp.maximum(state["absmax"], jnp.max(jnp.abs(_rows(x)), axis=0))}
  return lambda rule: Observer(init, update)


def channel_mean_abs() -> ObserverFactory:
  """Σ |x| per input channel ('abs_sum', [K]) and the row count ('rows'): AWQ's
  activation magnitude is abs_sum / rows."""
  def init(x):
    return {"abs_sum": jnp.zeros((x.shape[-1],), jnp.float32),
            "rows": jnp.zeros((), jnp.int32)}

  def update(state, x):
    r = _rows(x)
    return {"abs_sum": state["abs_sum"] + jnp.sum(jnp.abs(r), axis=0),
            "rows": state["rows"] + r.shape[0]}
  return lambda rule: Observer(init, update)


def prefixed(name: str, state: State) -> Dict[str, Any]:
  """The state's fields as they are stored: '<name>_<field>'."""
  return {f"{name}_{k}": v for k, v in state.items()}
