"""'norm': a whole nn.GroupNorm / nn.LayerNorm call, as an integer normalization.

Jacob et al. give none; this follows I-BERT's idea of an integer square root (Kim et al.
2021), with our own fixed-point layout. Program op `norm`: the input (B, *S, C) is viewed
as (B, *S, G, C/G) (G = `groups`) and reduced over the view axes `reduce`; n = elements
per group. With x = q − zp, rdiv = division rounding to nearest, ties away from zero,
RDBPOT = rounding division by 2^k (fixed_point.py), and P, F, A, K = `sigma_bits`,
`mean_bits`, `pre_shift`, `var_shift` (K optional, 0 when absent):
  S1 = Σx;  μ = rdiv(S1, n);  d = RDBPOT(x − μ, K);  S2 = Σd²;  r = S1 − n·μ
  V = max(S2 − rdiv(RDBPOT(r², 2K), n), 0)                 (n · variance / 4^K)
  var = floor(V / n)·2^(2P) + rdiv((V mod n)·2^(2P), n)     (variance · 2^(2P − 2K))
  σ = max(isqrt(var + E), 1)   with E = `eps` = round(ε/s_in²·2^(2P − 2K)) clamped to 2^30
  inv = floor(2^30 / σ);  x_F = x·2^F − rdiv(S1·2^F, n);  t = SRDHM(x_F·2^A, inv)
so t ≈ 2^T·(x − mean)/σ with T = F + A − P + K − 1. `layout(b, n)` picks (P, F, A, K)
for codes of b bits and groups of n ≤ 16384 elements so that every intermediate fits
int32 (the proof is its docstring): int8 codes get (7, 8, 13, 0) (T = 13), the
historical layout, written without `var_shift`; the int16 codes of a wide residual path
(`to_integer(..., residual_bits=16)`) get K > 0, the centered values shifted right
before they are squared (e.g. n = 384: (5, 5, 8, 6), T = 13). γ and β become the node's
affine map (the requantization after it).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only.emit import grid_bits
from jaxquant.integer_only.ir import IntegerOnlyError, Lazy
from jaxquant.integer_only.ops.base import GraphOp, Op

NORM_SIGMA_BITS, NORM_MEAN_BITS, NORM_PRE_SHIFT = 7, 8, 13
NORM_OUT_BITS = NORM_MEAN_BITS + NORM_PRE_SHIFT - NORM_SIGMA_BITS - 1  # T = 13
NORM_MAX_GROUP = 16384


class Layout(NamedTuple):
  """The fixed-point layout of one norm op (see the module docstring)."""
  sigma_bits: int  # P
  mean_bits: int  # F
  pre_shift: int  # A
  var_shift: int  # K

  @property
  def out_bits(self) -> int:
    """T: t ≈ 2^T·(x − mean)/σ."""
    return self.mean_bits + self.pre_shift - self.sigma_bits + self.var_shift - 1

  def bound(self, bits: int) -> float:
    """A bound on |t| for codes of `bits` bits: 2^(b + F + A)."""
    return 2.0 ** (bits + self.mean_bits + self.pre_shift)


def layout(bits: int, n: int) -> Layout:
  """(P, F, A, K) for groups of n ≤ 16384 codes of b = `bits` ≤ 16 bits.

  With X = 2^b − 1 ≥ |x| (q, zp ∈ [−2^(b−1), 2^(b−1) − 1]), and D = b − K:
  - K is the least K ≥ 0 with n·4^D ≤ 2^30: |x − μ| ≤ X (μ is a rounded mean, inside
    the group's [min, max]), so |d| ≤ 2^D and S2 ≤ n·4^D ≤ 2^30; r² ≤ n²/4 ≤ 2^26.
  - P = min(7, 15 − D): V/n ≤ 4^D, so floor(V/n)·2^(2P) ≤ 2^30, and
    (V mod n)·2^(2P) < n·2^14 ≤ 2^28; var < 2^30 strictly (all |d| = 2^D would need
    values on both sides of μ farther apart than X), so var + E < 2^31 for isqrt.
  - F ≤ 8 is the largest with 2·n·X·2^F + n < 2^31, which rdiv(S1·2^F, n) needs
    (|S1| ≤ n·X).
  - A = min(13, 29 − b − F): |x_F| ≤ X·2^F (x·2^F and the rounded mean·2^F lie within
    X·2^F of each other), so |x_F·2^A| < 2^29, and |t| ≤ |x_F·2^A|·2^30/2^31 < 2^28;
    `Layout.bound` reports 2^(b+F+A) ≤ 2^29.
  For b = 8 and every n ≤ 16384 this is (7, 8, 13, 0).
  """
  if not 1 <= n <= NORM_MAX_GROUP or not 1 <= bits <= 16:
    raise ValueError(f"a norm layout for groups of {n} codes of {bits} bits: at most "
                     f"{NORM_MAX_GROUP} elements of at most 16 bits")
  k = 0
  while n * 4 ** (bits - k) > 2 ** 30:
    k += 1
  d, x_max = bits - k, 2 ** bits - 1
  f = 8
  while f > 0 and 2 * n * x_max * 2 ** f + n >= 2 ** 31:
    f -= 1
  return Layout(min(NORM_SIGMA_BITS, 15 - d), f, min(NORM_PRE_SHIFT, 29 - bits - f), k)


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
  """(norm op, accumulator scale, bound) of the integer group / layer normalization (of
  int16 codes on a wide residual path, `Emitter.operand`)."""
  x = node.inputs[0]
  grid = emitter.operand(node, x)
  t = emitter.emit(x, grid)
  a = node.attrs
  shape = node.shape
  view = shape[1:-1] + (a["groups"], shape[-1] // a["groups"])
  n = int(np.prod([view[d - 1] for d in a["reduce"]]))
  if n > NORM_MAX_GROUP:
    raise IntegerOnlyError(f"layer {node.layer!r}: normalization groups of {n} elements "
                           f"exceed the int32 statistics' limit {NORM_MAX_GROUP}")
  bits = grid_bits(grid)
  lay = layout(bits, n)
  p, k = lay.sigma_bits, lay.var_shift
  eps = int(min(np.rint(a["eps"] / grid.scale ** 2 * 2.0 ** (2 * (p - k))), 2 ** 30))
  op = {"op": "norm", "in": [t], "layer": node.layer, "zp": grid.zp,
        "groups": int(a["groups"]), "reduce": list(a["reduce"]), "eps": eps,
        "sigma_bits": p, "mean_bits": lay.mean_bits, "pre_shift": lay.pre_shift}
  if k:
    op["var_shift"] = k
  return op, 2.0 ** -lay.out_bits, lay.bound(bits)


def kernel(op, arr, x):
  p, f, a = op["sigma_bits"], op["mean_bits"], op["pre_shift"]
  groups, axes = op["groups"], tuple(op["reduce"])
  shape = x.shape
  v = (x.astype(jnp.int32) - jnp.int32(op["zp"])).reshape(
      shape[:-1] + (groups, shape[-1] // groups))
  n = 1
  for ax in axes:
    n *= v.shape[ax]
  k = op.get("var_shift", 0)
  s1 = jnp.sum(v, axis=axes, keepdims=True)
  mu = fp.rounding_divide(s1, n)
  d = fp.rounding_divide_by_pot(v - mu, k) if k else v - mu
  s2 = jnp.sum(d * d, axis=axes, keepdims=True)
  r = s1 - n * mu
  r2 = fp.rounding_divide_by_pot(r * r, 2 * k) if k else r * r
  big_v = jnp.maximum(s2 - fp.rounding_divide(r2, n), 0)
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
