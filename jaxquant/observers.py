"""Observers: statistics of a layer's input, as optax-style pure `init` / `update` pairs.

An `Observer` is a pair of pure functions over a dict of arrays:
    state = observer.init(x_BMK)          # zeros of the right shapes
    state = observer.update(state, x_BMK) # after one more batch
    state = observer.update(state, x_BMK, mask_BM)  # rows where mask_BM is False left out
where `x_BMK` is the layer's input viewed as [B, M, K]: K the contracted features (for a
convolution, its input channels), M the rows (tokens, examples, pixels), B the batch axes
a contraction shares with its weight (1 for ordinary layers). The third argument is only
passed when `jq.calibrate(..., masks=...)` gives a token mask (padding excluded from the
statistics); the built-in observers accept it.

`jq.quantize_model(..., observers=...)` runs a tuple of named observer factories at every
quantized layer whose 'quant_stats' collection is mutable; each factory maps the layer's
`Rule` to an `Observer` (or None where it does not apply) and its state is stored under
'quant_stats/<layer path>/<name>_<field>' (`jaxquant.state.observer_key`). Training uses `ema_range` (the default);
`jq.calibrate` uses `calibration_range`, plus `ptq_stats` (XᵀX, per-channel Σ|x| and
max|x|) at the layers whose rule names a PTQ algorithm.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxquant import formats, numerics
from jaxquant.ptq import stats as ptq_stats_lib
from jaxquant.spec import QuantSpec, Rule

State = Dict[str, jax.Array]
EMA_DECAY = 0.99


class Observer(NamedTuple):
  """Pure statistics of a layer input: `init(x) -> state`, `update(state, x) -> state`."""
  init: Callable[[jax.Array], State]
  update: Callable[[State, jax.Array], State]


ObserverFactory = Callable[[Rule], Optional[Observer]]


def batch_range(x, spec: QuantSpec, clip_range=None):
  """(lo, hi) of this batch by the spec's calibration method, over the whole tensor: the
  range its grid covers. `clip_range`, when given, is the batch's
  `numerics.calibrated_range` already computed (the same result, without the pass)."""
  axes = tuple(range(x.ndim))
  tensor_spec = dataclasses.replace(spec, granularity="tensor", group_size=None,
                                    rounding="nearest", ste="identity")
  if clip_range is None:
    scale, zp = numerics.fit_grid(x, tensor_spec, axes)
  else:
    scale, zp = numerics.scale_zero_point(*clip_range, tensor_spec)
  scale = scale.reshape(())
  zp = None if zp is None else zp.reshape(())
  return formats.get(spec.format).grid_range(scale, zp, tensor_spec)


def masked(x_BMK, mask_BM):
  """x with the rows a mask leaves out set to NaN: every range statistic here looks only
  at finite entries, so those rows count for nothing (and hold no range)."""
  if mask_BM is None:
    return x_BMK
  return jnp.where(mask_BM[..., None], x_BMK, jnp.nan)


def _range_state(x) -> State:
  del x
  return {"lo": jnp.zeros((), jnp.float32), "hi": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def _has_range(rule: Rule) -> bool:
  return rule.act is not None and formats.get(rule.act.format).clip_range


# One batch range per layer and step: while training, the quantizer clips the batch with
# its own range and the EMA observer records the same range. The layer computes it once
# (`numerics.calibrated_range`, e.g. a percentile: the costly part) and shares it with
# both for the duration of the observers' update (`sharing_batch_range`).
_SHARED_RANGE = contextvars.ContextVar("jaxquant_shared_batch_range", default=None)


@contextlib.contextmanager
def sharing_batch_range(x, spec: QuantSpec, clip_range):
  """While active, `ema_range` observers updated with this very array `x` and this
  `spec` take `clip_range` (x's `numerics.calibrated_range` over the whole tensor)
  instead of computing it again."""
  token = _SHARED_RANGE.set((x, spec, clip_range))
  try:
    yield
  finally:
    _SHARED_RANGE.reset(token)


def _shared_range(x, spec: QuantSpec):
  shared = _SHARED_RANGE.get()
  if shared is not None and shared[0] is x and shared[1] == spec:
    return shared[2]
  return None


def ema_range(decay: float = EMA_DECAY) -> ObserverFactory:
  """Exponential moving average of the per-batch activation range (the first batch
  starts it); a record of the ranges a layer saw in training."""
  def factory(rule: Rule) -> Optional[Observer]:
    if not _has_range(rule):
      return None

    def update(state, x, mask=None):
      shared = None if mask is not None else _shared_range(x, rule.act)
      x = masked(jax.lax.stop_gradient(x).astype(jnp.float32), mask)
      lo, hi = batch_range(x, rule.act, shared)
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
  counts non-finite inputs ('nonfinite'), which `jq.calibrate` refuses.

  Only per-tensor activation specs get a static range, and not those with
  `static=False` (`QuantSpec.static`). A per-token ('channel') spec has one scale per row
  of the batch, which no fixed range can stand for, so such layers stay dynamic (and
  `static=True` is refused for them): never a silent collapse."""
  def factory(rule: Rule) -> Optional[Observer]:
    if (not _has_range(rule) or rule.act.granularity != "tensor"
        or rule.act.static is False):
      return None

    def update(state, x, mask=None):
      x = jax.lax.stop_gradient(x).astype(jnp.float32)
      lo, hi = batch_range(masked(x, mask), rule.act)
      first = state["count"] == 0
      n = state["count"].astype(jnp.float32)
      if rule.act.calibration == "absmax":
        new_lo = jnp.where(first, lo, jnp.minimum(state["lo"], lo))
        new_hi = jnp.where(first, hi, jnp.maximum(state["hi"], hi))
      else:
        new_lo = (state["lo"] * n + lo) / (n + 1)
        new_hi = (state["hi"] * n + hi) / (n + 1)
      bad = ~jnp.isfinite(x)
      if mask is not None:  # padding rows may hold anything
        bad = bad & mask[..., None]
      bad = jnp.sum(bad).astype(jnp.int32)
      return {"lo": new_lo, "hi": new_hi, "count": state["count"] + 1,
              "nonfinite": state["nonfinite"] + bad}
    init = lambda x: {**_range_state(x), "nonfinite": jnp.zeros((), jnp.int32)}
    return Observer(init, update)
  return factory


def ptq_stats(methods=None) -> ObserverFactory:
  """The statistics the PTQ algorithms need (`jaxquant.ptq.stats`): XᵀX [K, K] (GPTQ's
  Hessian, AWQ's output error), Σ|x| and max|x| per input channel [K] (AWQ, SmoothQuant)
  and the row count. With `methods` (a tuple of `PTQ.method` names) it runs only at
  layers whose rule asks for one of them."""
  def factory(rule: Rule) -> Optional[Observer]:
    if methods is not None and (rule.ptq is None or rule.ptq.method not in methods):
      return None
    init = lambda x: ptq_stats_lib.init(x.shape[-1])._asdict()
    update = lambda state, x, mask=None: ptq_stats_lib.update(
        ptq_stats_lib.Stats(**state), jax.lax.stop_gradient(x), mask)._asdict()
    return Observer(init, update)
  return factory
