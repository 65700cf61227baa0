"""'norm': a whole nn.GroupNorm / nn.LayerNorm call, as an integer normalization.

Jacob et al. give none; this follows I-BERT's idea of an integer square root (Kim et al.
2021), with our own fixed-point layout. Program op `norm`: the input (B, *S, C) is viewed
as (B, *S, G, C/G) (G = `groups`) and reduced over the view axes `reduce`; n = elements
per group. With x = q − zp, rdiv = division rounding to nearest, ties away from zero,
and P, F, A = `sigma_bits`, `mean_bits`, `pre_shift` (7, 8, 13; T = F + A − P − 1):
  S1 = Σx;  μ = rdiv(S1, n);  S2 = Σ(x − μ)²;  r = S1 − n·μ;  V = S2 − rdiv(r², n)
  var = floor(V / n)·2^(2P) + rdiv((V mod n)·2^(2P), n)          (variance · 2^(2P))
  σ = max(isqrt(var + E), 1)   with E = `eps` = round(ε/s_in²·2^(2P)) clamped to 2^30
  inv = floor(2^30 / σ);  x_F = x·2^F − rdiv(S1·2^F, n);  t = SRDHM(x_F·2^A, inv)
so t ≈ 2^T·(x − mean)/σ; every intermediate fits int32 for n ≤ 16384 (checked by the
converter). γ and β become the node's affine map (the requantization after it).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only.ir import IntegerOnlyError, Lazy
from jaxquant.integer_only.ops.base import GraphOp, Op

NORM_SIGMA_BITS, NORM_MEAN_BITS, NORM_PRE_SHIFT = 7, 8, 13
NORM_OUT_BITS = NORM_MEAN_BITS + NORM_PRE_SHIFT - NORM_SIGMA_BITS - 1  # T = 13
NORM_MAX_GROUP = 16384


def trace_module(tracer, x, path, module):
  """The normalization node of one GroupNorm / LayerNorm call, γ and β as its affine."""
  shape = tracer.shape_of(x)
  c = shape[-1]
  if isinstance(module, nn.GroupNorm):
    if module.reduction_axes is not None:
      return tracer.fail("GroupNorm with reduction_axes set", path)
    groups = module.num_groups or c // module.group_size
    reduce = tuple(range(1, len(shape) - 1)) + (len(shape),)
  else:
    if module.reduction_axes not in (-1, (-1,)) or module.feature_axes not in (-1, (-1,)):
      return tracer.fail("LayerNorm over axes other than the last", path)
    groups, reduce = 1, (len(shape),)
  params = tracer.params
  for part in path.split("/"):
    params = params.get(part, {}) if isinstance(params, dict) else {}
  gamma = np.asarray(params.get("scale", np.ones((c,))), np.float64)
  beta = np.asarray(params.get("bias", np.zeros((c,))), np.float64)
  bshape = (1,) * (len(shape) - 1) + (c,)
  core = tracer.core_lazy("norm", [tracer.materialize(x)], shape, path, groups=int(groups),
                          reduce=reduce, eps=float(module.epsilon))
  return Lazy(core.core, gamma.reshape(bshape), beta.reshape(bshape))


def evaluate(node, ins, ctx):
  x = ins[0]
  g = node.attrs["groups"]
  v = x.astype(np.float64).reshape(x.shape[:-1] + (g, x.shape[-1] // g))
  axes = node.attrs["reduce"]
  mean = v.mean(axis=axes, keepdims=True)
  var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
  return ((v - mean) / np.sqrt(var + node.attrs["eps"])).reshape(x.shape).astype(np.float32)


def emit(emitter, node):
  """(norm op, accumulator scale, bound) of the integer group / layer normalization."""
  x = node.inputs[0]
  grid = emitter.natural(x)
  t = emitter.emit(x, grid)
  a = node.attrs
  shape = node.shape
  view = shape[1:-1] + (a["groups"], shape[-1] // a["groups"])
  n = int(np.prod([view[d - 1] for d in a["reduce"]]))
  if n > NORM_MAX_GROUP:
    raise IntegerOnlyError(f"layer {node.layer!r}: normalization groups of {n} elements "
                           f"exceed the int32 statistics' limit {NORM_MAX_GROUP}")
  p = NORM_SIGMA_BITS
  eps = int(min(np.rint(a["eps"] / grid.scale ** 2 * 2.0 ** (2 * p)), 2 ** 30))
  op = {"op": "norm", "in": [t], "layer": node.layer, "zp": grid.zp,
        "groups": int(a["groups"]), "reduce": list(a["reduce"]), "eps": eps,
        "sigma_bits": p, "mean_bits": NORM_MEAN_BITS, "pre_shift": NORM_PRE_SHIFT}
  return op, 2.0 ** -NORM_OUT_BITS, 2.0 ** 29


def kernel(op, arr, x):
  p, f, a = op["sigma_bits"], op["mean_bits"], op["pre_shift"]
  groups, axes = op["groups"], tuple(op["reduce"])
  shape = x.shape
  v = (x.astype(jnp.int32) - jnp.int32(op["zp"])).reshape(
      shape[:-1] + (groups, shape[-1] // groups))
  n = 1
  for ax in axes:
    n *= v.shape[ax]
  s1 = jnp.sum(v, axis=axes, keepdims=True)
  mu = fp.rounding_divide(s1, n)
  s2 = jnp.sum((v - mu) * (v - mu), axis=axes, keepdims=True)
  r = s1 - n * mu
  big_v = s2 - fp.rounding_divide(r * r, n)
  var = (big_v // n) * (1 << 2 * p) + fp.rounding_divide((big_v % n) * (1 << 2 * p), n)
  sigma = jnp.maximum(fp.isqrt(var + op["eps"]), 1)
  inv = lax.div(jnp.int32(1 << 30), sigma)
  x_f = v * (1 << f) - fp.rounding_divide(s1 * (1 << f), n)
  t = fp.srdhm(x_f * (1 << a), inv)
  return t.reshape(shape)


OP = Op(
    kind="norm", summary="GroupNorm / LayerNorm",
    graph_ops={"norm": GraphOp(fields=("zp", "groups", "reduce", "eps", "sigma_bits",
                                       "mean_bits", "pre_shift"), kernel=kernel)},
    modules=(nn.GroupNorm, nn.LayerNorm), trace_module=trace_module, evaluate=evaluate,
    emit=emit)

OPS = (OP,)
