"""Everything the integer converter reads from a QAT model, in one place.

The converter depends only on public things: the user's float model (a quantized Linen
model is an instance of a subclass of the float model's class, built with the same
fields), the rules, the variables' collections ('params' = the float tree; the
quantization state under the keys `jaxquant.state` names: learned LSQ / PACT
quantities, the static range after jq.calibrate, the EMA range from training) and
`jq.quantize`. When the transform's internals change, this file is the one to adapt.
An NNX model (quantized or float) is read the same way: its float forward through
`jaxquant.nnx_float` (layers as Linen twins, under the same paths), its rules from its
root, its `nnx.State` as the Linen model's variables (`nnx_functional.linen_variables`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta, unfreeze

from jaxquant import nnx_float
from jaxquant import nnx_functional
from jaxquant import nnx_transform
from jaxquant import state
from jaxquant.quantize import quantize
from jaxquant.spec import QuantSpec, Rule

QAT_COLLECTIONS = state.COLLECTIONS + ("serving",)
# One compiled call per shape instead of dozens of eager ops: conversion-time speed only.
_quantize = jax.jit(quantize, static_argnames=("spec", "reduce_axes"))


def is_quantized(model) -> bool:
  """True for a model made by `jq.quantize_model` (its class carries the rules; an NNX
  model, the rules attribute of its root)."""
  if isinstance(model, nnx.Module):
    return nnx_transform.rules_of(model) is not None
  return getattr(type(model), "_jq_config", None) is not None


def rules_of(model) -> Tuple[Rule, ...]:
  """The rules of a quantized model, () for a plain float model."""
  if isinstance(model, nnx.Module):
    return tuple(nnx_transform.rules_of(model) or ())
  plan = getattr(type(model), "_jq_config", None)
  return () if plan is None else tuple(plan.rules)  # plan: the QuantConfig


def float_model_of(model):
  """The user's float model: the quantized class's parent class, same fields. For an
  NNX model (quantized or float), its float forward as a Linen-style view whose layers
  run under their own paths (`nnx_float.FloatView`)."""
  if isinstance(model, nnx.Module):
    return nnx_float.FloatView(model)
  if not isinstance(model, nn.Module):
    raise ValueError(f"model={type(model).__name__} must be a flax.linen or flax.nnx Module "
                     "(a jq.quantize_model result or a float model)")
  if not is_quantized(model):
    return model
  base = type(model).__mro__[1]
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return base(**fields)


def trace_names(float_model) -> Dict[str, str]:
  """The `trace.trace` keywords naming `float_model_of`'s result: the name-stack scope
  that precedes layer paths and the model's name in messages."""
  if isinstance(float_model, nnx_float.FloatView):
    return {"root_scope": float_model.root_scope, "model_name": float_model.name}
  return {}


def plain(variables) -> Dict[str, Any]:
  """Variables as nested plain dicts with unboxed numpy leaves (an NNX model's
  `nnx.State` as the same model's Linen variables: 'params', 'quant', 'quant_stats'...)."""
  if isinstance(variables, (nnx.State, nnx.Module)):
    variables = nnx_functional.linen_variables(variables)
  tree = unfreeze(meta.unbox(variables))
  def conv(t):
    return {k: conv(v) for k, v in t.items()} if isinstance(t, dict) else np.asarray(t)
  return conv(tree)


def float_variables(variables: Dict[str, Any]) -> Dict[str, Any]:
  """The collections the float model reads ('params', 'batch_stats', ...)."""
  return {k: v for k, v in variables.items() if k not in QAT_COLLECTIONS}


def ema_as_static(variables) -> Dict[str, Any]:
  """The variables with every layer's training EMA range also stored as its static range
  (what jq.calibrate writes): the QAT model then quantizes activations on exactly the
  grids an integer program made from the EMA uses."""
  def visit(t):
    if not isinstance(t, dict):
      return t
    out = {k: visit(v) for k, v in t.items()}
    ema = state.observer_state(state.EMA, t)
    if "lo" in ema and state.static_range(t) is None:
      state.set_static_range(out, ema["lo"], ema["hi"], ema["count"])
    return out
  variables = plain(variables)
  return {**variables,
          state.QUANT_STATS: visit(variables.get(state.QUANT_STATS, {}))}


def rule_for(rules: Sequence[Rule], path: str) -> Optional[Rule]:
  """First rule whose pattern fully matches `path` (the transform's own order)."""
  for rule in rules:
    if rule.matches(path):
      return rule
  return None


def _layer_vars(variables, collection: str, path: str) -> Dict[str, Any]:
  node = variables.get(collection, {})
  for part in path.split("/") if path else []:
    if not isinstance(node, dict) or part not in node:
      return {}
    node = node[part]
  return node if isinstance(node, dict) else {}


def weight_codes(kernel, spec: QuantSpec, reduce_axes, variables, path: str):
  """(int8 codes, float scale shaped like the kernel with reduced axes of length 1): the
  kernel's codes exactly as the QAT forward quantizes them (learned LSQ step included;
  stochastic rounding stored as nearest, as jq.convert does)."""
  learned = None
  if spec.learned:
    learned = _layer_vars(variables, state.QUANT, path).get(
        state.learned_key(state.WEIGHT, spec.learned))
  if spec.rounding == "stochastic":
    spec = dataclasses.replace(spec, rounding="nearest")
  q = _quantize(jnp.asarray(kernel), spec, reduce_axes=tuple(reduce_axes),
               learned=None if learned is None else jnp.asarray(learned))
  return np.asarray(q.values, np.int8), np.asarray(q.scale, np.float64), q.zero_point


def act_range(spec: QuantSpec, variables, path: str) -> Optional[Tuple[str, Any]]:
  """The QAT model's own input range of layer `path`: ('learned', value) for LSQ / PACT,
  ('range', (lo, hi)) from jq.calibrate's static range, else from the training EMA, or
  None when the variables hold none."""
  if spec.learned:
    value = _layer_vars(variables, state.QUANT, path).get(
        state.learned_key(state.ACT, spec.learned))
    return None if value is None else ("learned", np.asarray(value).reshape(()))
  stats = _layer_vars(variables, state.QUANT_STATS, path)
  static = state.static_range(stats)
  if static is not None:
    return "range", (float(static[0]), float(static[1]))
  ema = state.observer_state(state.EMA, stats)
  if "hi" in ema and int(np.asarray(ema.get("count", 1))) > 0:
    return "range", (float(ema["lo"]), float(ema["hi"]))
  return None


def grid_of(spec: QuantSpec, source) -> Tuple[float, int]:
  """(scale, zero point) of a per-tensor activation grid, computed by jq.quantize itself
  so it equals the QAT forward's: a learned LSQ step / PACT α, or a (lo, hi) range (the
  absmax range of the two-point tensor [lo, hi] is exactly the static-range grid)."""
  kind, value = source
  tensor_spec = dataclasses.replace(spec, granularity="tensor", group_size=None,
                                    rounding="nearest")
  if kind == "learned":
    q = _quantize(jnp.zeros((1,), jnp.float32), tensor_spec, reduce_axes=(0,),
                 learned=jnp.asarray(value, jnp.float32).reshape(1))
  else:
    lo, hi = value
    tensor_spec = dataclasses.replace(tensor_spec, calibration="absmax", ste="identity")
    q = _quantize(jnp.asarray([lo, hi], jnp.float32), tensor_spec, reduce_axes=(0,))
  zp = 0 if q.zero_point is None else int(np.asarray(q.zero_point).reshape(()))
  return float(np.asarray(q.scale).reshape(())), zp


def measured_grid(spec: QuantSpec, samples: np.ndarray) -> Tuple[float, int]:
  """(scale, zero point) of the per-tensor grid `spec`'s calibration method gives the
  concatenated calibration samples."""
  tensor_spec = dataclasses.replace(spec, granularity="tensor", group_size=None,
                                    rounding="nearest", ste="identity")
  flat = jnp.asarray(np.asarray(samples, np.float32).reshape(-1))
  q = _quantize(flat, tensor_spec, reduce_axes=(0,))
  zp = 0 if q.zero_point is None else int(np.asarray(q.zero_point).reshape(()))
  return float(np.asarray(q.scale).reshape(())), zp
