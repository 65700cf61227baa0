"""I-BERT's integer-only kernels in JAX (Kim et al., "I-BERT: Integer-only BERT
Quantization", ICML 2021): integer dtypes only inside.

Each kernel takes integer codes and a plan from `ibert_plans` (Python ints computed once
from the static scales; the plan's docstring states every equation and rounding rule):
  int_matmul_acc / _act s8×s8→s32 activation products (Q·Kᵀ scores in int32, attention·V
                        requantized to int8)
  i_exp / i_softmax     I-EXP (range reduction + I-POLY) and the integer-only softmax
  i_gelu                I-GELU (I-ERF through I-POLY, the second-order polynomial)
  i_sqrt                Algorithm 4 (integer Newton iteration for ⌊√n⌋)
  i_layernorm           integer-only LayerNorm (int32 mean and variance, i_sqrt)
  embedding_lookup_int8 gathered int8 rows requantized to one scale
Everything is int32 (no int64, no x64 needed; bounds are in the plans; with
jax_enable_x64 on, reductions still accumulate in int32 and the results are the same).
Shifts by a traced amount are clamped to [0, 31] so XLA never sees an out-of-range one.
The numpy twin is jaxquant/deploy/ibert_numpy.py.

Where these kernels go beyond the paper's equations (all integer, all in the plans):
i-exp and i-GELU first move their input to a power-of-two multiple of its scale (an
exact left shift of int8-scale codes, or a rounded right shift of fine int32 ones) so
the floored constants ⌊ln2/S⌋, ⌊b/S⌋, ... keep ~14 bits and the products fit int32;
i-softmax shifts its exp values right by a static amount so a row's sum fits int32 and
divides each by the sum exactly (rounded) instead of through a truncated reciprocal;
LayerNorm computes ⌈4^P·Σ(x − mean)²⌉ exactly with a per-row P before i_sqrt (so ⌊√·⌋
keeps ~15 bits even for a row a code or two wide) and divides by long division; beta is
added at 2^−8 of an output code before the one rounding to int8.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only import ibert_plans as plans

I32 = jnp.int32


def _requant_int8(acc, m0, left, right):
  """clamp(RDBPOT(SRDHM(acc·2^left, m0), right), −128, 127) as int8."""
  y = fp.requantize(acc, m0, left, right)
  return jnp.clip(y, -128, 127).astype(jnp.int8)


def _to_working(q, shift: int, clamp: int):
  """Codes at scale S → codes at S·2^shift: exact left shift of codes clamped to
  ±clamp (shift < 0), or RDBPOT (shift > 0; ties away from zero)."""
  if shift < 0:
    return jnp.clip(q, -clamp, clamp) << I32(-shift)
  if shift > 0:
    return fp.rounding_divide_by_pot(q, shift)
  return q


def _check_int(name, x):
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer codes, got dtype {x.dtype}")


# ------------------------------------------------------------------ act × act matmul
def int_matmul_acc(qa: jax.Array, qb: jax.Array, transpose_b: bool = False) -> jax.Array:
  """The int32 accumulator of qa @ qb (or qa @ qbᵀ with transpose_b): an XLA
  s8×s8→s32 dot of int8 codes with zero point 0, e.g. Q·Kᵀ scores for `i_softmax`.

  qa [..., M, K] and qb [..., K, N] (or [..., N, K]) share their leading (batch) axes;
  K ≤ 131071 so that |acc| ≤ K·128² fits int32."""
  _check_int("qa", qa)
  _check_int("qb", qb)
  if qa.dtype != jnp.int8 or qb.dtype != jnp.int8:
    raise TypeError(f"int8 codes expected, got {qa.dtype} and {qb.dtype}")
  k_axis_b = qb.ndim - 1 if transpose_b else qb.ndim - 2
  if qa.shape[-1] != qb.shape[k_axis_b] or qa.shape[:-2] != qb.shape[:-2]:
    raise ValueError(f"shapes {qa.shape} and {qb.shape} do not contract "
                     f"(transpose_b={transpose_b})")
  if qa.shape[-1] > (2 ** 31 - 1) // 128 ** 2:
    raise ValueError(f"contraction length {qa.shape[-1]} would overflow int32")
  batch = tuple(range(qa.ndim - 2))
  return lax.dot_general(qa, qb, (((qa.ndim - 1,), (k_axis_b,)), (batch, batch)),
                         precision=lax.Precision.DEFAULT, preferred_element_type=I32)


def int_matmul_act(qa: jax.Array, qb: jax.Array, plan: plans.MatmulPlan,
                   transpose_b: bool = False) -> jax.Array:
  """int8 codes of qa @ qb (or qa @ qbᵀ with transpose_b) at plan.scale_out, e.g.
  attention·V: `int_matmul_acc`, then clamp(requantize(acc), −128, 127) (see
  `ibert_plans.MatmulPlan`)."""
  if qa.shape[-1] > plan.k:
    raise ValueError(f"contraction length {qa.shape[-1]} exceeds the plan's k={plan.k}")
  acc = int_matmul_acc(qa, qb, transpose_b)
  return _requant_int8(acc, I32(plan.m0), I32(plan.left), I32(plan.right))


# ------------------------------------------------------------------ i-exp / i-softmax
def i_exp(q: jax.Array, plan: plans.ExpPlan) -> jax.Array:
  """int32 codes of exp(q·in_scale) at plan.out_scale (I-BERT's I-EXP).

  Inputs above 0 are clamped to 0; the equations are in `ibert_plans.ExpPlan`."""
  _check_int("q", q)
  x = jnp.minimum(q.astype(I32), 0)
  x = _to_working(x, plan.shift_in, plan.in_floor)
  x = jnp.maximum(x, -plans.EXP_MAX_Z * plan.q_ln2)
  z = lax.div(-x, I32(plan.q_ln2))  # −x ≥ 0: truncation is floor
  p = x + z * plan.q_ln2            # ∈ (−q_ln2, 0]
  poly = (p + plan.q_b) * (p + plan.q_b) + plan.q_c
  shift = jnp.minimum(z + plan.out_shift, 31)
  return poly >> shift


def i_softmax(q: jax.Array, plan: plans.SoftmaxPlan,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """int8 codes (scale 2^−out_bits) of softmax over the last axis of int scores q.

  Scores saturate to ±2^30, the row max is subtracted (so every input of i-exp is ≤ 0),
  e = i_exp(·), Σ = Σ e over the row, and the codes are ⌊(e·2^B + ⌊Σ/2⌋)/Σ⌋ (round half
  up, exact), saturated at 127. `mask` (bool, broadcasting against q; True = keep):
  masked entries take no part in the max or the sum and get code 0; a fully masked row
  is all 0."""
  _check_int("q", q)
  if q.shape[-1] != plan.n:
    raise ValueError(f"row length {q.shape[-1]} does not match the plan's n={plan.n}")
  lim = plans.SOFTMAX_CLAMP
  x = jnp.clip(q.astype(I32), -lim, lim)
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    x = jnp.where(mask, x, I32(-lim))
  e = i_exp(x - jnp.max(x, axis=-1, keepdims=True), plan.exp)
  if mask is not None:
    e = jnp.where(mask, e, I32(0))
  total = jnp.sum(e, axis=-1, keepdims=True, dtype=I32)
  codes = lax.div((e << plan.out_bits) + (total >> 1), jnp.maximum(total, 1))
  return jnp.minimum(codes, 127).astype(jnp.int8)


# ------------------------------------------------------------------ i-GELU
def i_gelu_acc(q: jax.Array, plan: plans.GeluPlan) -> jax.Array:
  """int32 GELU(q·in_scale) at plan.acc_scale, before requantization (see GeluPlan)."""
  _check_int("q", q)
  x = jnp.clip(q.astype(I32), -plan.in_clamp, plan.in_clamp)
  x = _to_working(x, plan.shift_in, plan.in_clamp)
  mag = jnp.minimum(jnp.abs(x), plan.q_clip)
  poly = (mag + plan.q_b) * (mag + plan.q_b) + plan.q_c
  erf = jnp.sign(x) * poly
  return -(x * (erf + plan.q_one))


def i_gelu(q: jax.Array, plan: plans.GeluPlan) -> jax.Array:
  """int8 codes of GELU(q·in_scale) at plan.out_scale (I-BERT's I-GELU)."""
  return _requant_int8(i_gelu_acc(q, plan), I32(plan.m0), I32(plan.left), I32(plan.right))


# ------------------------------------------------------------------ i-sqrt
def i_sqrt(n: jax.Array) -> jax.Array:
  """⌊√n⌋ of int32 n ≥ 0 by I-BERT's Algorithm 4 (integer Newton iteration).

  x₀ = 2^⌈bits(n)/2⌉ ≥ √n; x_{i+1} = ⌊(x_i + ⌊n/x_i⌋)/2⌋ until x_{i+1} ≥ x_i, returning
  x_i (and 0 for n = 0). Elementwise with a while loop that runs until every element
  has stopped; negative n is refused by clamping to 0."""
  _check_int("n", n)
  n = jnp.maximum(n.astype(I32), 0)
  bits = 32 - lax.clz(n)
  x0 = I32(1) << ((bits + 1) >> 1)
  safe = jnp.maximum(n, 1)

  def body(state):
    x, done = state
    y = (x + lax.div(safe, x)) >> 1
    stop = done | (y >= x)
    return jnp.where(stop, x, y), stop

  x, _ = lax.while_loop(lambda s: ~jnp.all(s[1]), body, (x0, n == 0))
  return jnp.where(n == 0, 0, x)


# ------------------------------------------------------------------ integer LayerNorm
def _round_div_bits(d, sigma, bits: int):
  """round(d·2^bits/sigma) (ties away from zero) for |d| < 2^31, 0 < sigma ≤ 46340, by
  long division in chunks of ≤ 15 bits (each remainder·2^15 stays below 2^31)."""
  a = jnp.abs(d)
  quot, rem = lax.div(a, sigma), lax.rem(a, sigma)
  left = bits
  while left > 0:
    c = min(left, 15)
    t = rem << c
    quot = (quot << c) + lax.div(t, sigma)
    rem = lax.rem(t, sigma)
    left -= c
  quot = quot + (2 * rem >= sigma).astype(I32)
  return jnp.where(d < 0, -quot, quot)


def i_layernorm(q: jax.Array, plan: plans.LayerNormPlan) -> jax.Array:
  """int8 codes of LayerNorm(q·in_scale)·γ + β over the last axis (I-BERT's integer-only
  LayerNorm); the equations, bounds and roundings are in `ibert_plans.LayerNormPlan`.
  A zero-variance row gives d = 0, so u = 0 and its output is beta (with any eps)."""
  _check_int("q", q)
  n = plan.n
  if q.shape[-1] != n:
    raise ValueError(f"row length {q.shape[-1]} does not match the plan's n={n}")
  x = q.astype(I32) - plan.zp
  s1 = jnp.sum(x, axis=-1, keepdims=True, dtype=I32)
  m = fp.rounding_divide(s1, n)
  c = x - m
  r2 = (s1 - n * m) * (s1 - n * m)
  a, b = lax.div(r2, I32(n)), lax.rem(r2, I32(n))  # r² ≥ 0: floor and remainder
  v_ceil = jnp.sum(c * c, axis=-1, keepdims=True, dtype=I32) - a
  p = jnp.minimum((31 - (32 - lax.clz(v_ceil + plan.eps_ceil))) >> 1, plan.p_max)
  eps = jnp.take(jnp.asarray(plan.eps_table, I32), p)
  w = (v_ceil << (2 * p)) - lax.div(b << (2 * p), I32(n)) + eps
  sigma = i_sqrt(w)
  d = n * x - s1
  u = _round_div_bits(d << p, jnp.maximum(sigma, 1), plan.frac_bits)
  row = lambda a: jnp.asarray(a, I32).reshape((1,) * (q.ndim - 1) + (n,))
  y = fp.requantize(u * row(plan.sign), row(plan.m0), row(plan.left), row(plan.right))
  y = fp.rounding_divide_by_pot(y + row(plan.beta), plan.beta_bits)
  return jnp.clip(y, -128, 127).astype(jnp.int8)


# ------------------------------------------------------------------ int8 embedding
def embedding_lookup_int8(table: jax.Array, ids: jax.Array, plan: plans.EmbedPlan) -> jax.Array:
  """int8 codes of table rows `ids` at plan.out_scale.

  table [V, D] int8, ids int (any shape; clipped to [0, V − 1]); each gathered row is
  requantized with its row's multiplier (or the one per-tensor multiplier):
  clamp(requantize(table[id], m0, left, right), −128, 127) → [..., D]."""
  _check_int("ids", ids)
  if table.dtype != jnp.int8:
    raise TypeError(f"table must be int8 codes, got {table.dtype}")
  vocab = table.shape[0]
  if plan.m0.shape[0] not in (1, vocab):
    raise ValueError(f"plan has {plan.m0.shape[0]} row scales for a table of {vocab} rows")
  ids = jnp.clip(ids.astype(I32), 0, vocab - 1)
  rows = jnp.take(table, ids, axis=0).astype(I32)
  sel = ids if plan.m0.shape[0] == vocab else jnp.zeros_like(ids)
  pick = lambda a: jnp.take(jnp.asarray(a, I32), sel, axis=0)[..., None]
  return _requant_int8(rows, pick(plan.m0), pick(plan.left), pick(plan.right))
