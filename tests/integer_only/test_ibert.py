"""I-BERT integer kernels (integer_only/ibert.py) against their numpy twin
(deploy/ibert_numpy.py, loaded by path like a deployed file): bit-exact on random codes
and at the edges; accurate against float64 references within bounds derived from the
paper's approximations; integer dtypes only in their jaxprs; the twin imports no jax."""
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.integer_only import ibert
from jaxquant.integer_only import ibert_plans as P
from tests.integer_only.int_helpers import ROOT, float_dtypes_in

TWIN_PATH = os.path.join(ROOT, "jaxquant", "deploy", "ibert_numpy.py")
_spec = importlib.util.spec_from_file_location("ibert_numpy_under_test", TWIN_PATH)
NP = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(NP)
RNG = np.random.default_rng(26)
ERF = np.vectorize(math.erf)


@pytest.fixture(autouse=True)
def _fresh_rng():
  """Each test draws the same numbers whichever tests ran before it in the worker."""
  global RNG
  RNG = np.random.default_rng(26)


def _i8(shape, lo=-128, hi=127):
  return RNG.integers(lo, hi, shape, endpoint=True).astype(np.int8)


def _same(jax_fn, np_fn, *args):
  """Runs both kernels (the JAX one under jit), asserts equal arrays and dtypes."""
  got = np.asarray(jax.jit(jax_fn)(*args))
  want = np_fn(*args)
  assert got.dtype == want.dtype, (got.dtype, want.dtype)
  np.testing.assert_array_equal(got, want)
  return got


# ------------------------------------------------------------------ act × act matmul
def test_matmul_bit_exact_and_matches_float_requantization():
  plan = P.matmul_plan(0.02, 0.03, 0.05, k=64)
  qa, qb = _i8((2, 3, 5, 64)), _i8((2, 3, 7, 64))
  got = _same(lambda a, b: ibert.int_matmul_act(a, b, plan, transpose_b=True),
              lambda a, b: NP.int_matmul_act(a, b, plan.as_dict(), transpose_b=True), qa, qb)
  acc = np.einsum("...mk,...nk->...mn", qa.astype(np.int64), qb.astype(np.int64))
  ref = np.clip(acc * 0.02 * 0.03 / 0.05, -128, 127)
  # one rounding of the exact product (the multiplier is 31-bit): ≤ 1/2 code + 2^-20
  assert np.max(np.abs(got - ref)) <= 0.5 + 2 ** -20
  qb_kn = np.swapaxes(qb, -1, -2).copy()
  _same(lambda a, b: ibert.int_matmul_act(a, b, plan),
        lambda a, b: NP.int_matmul_act(a, b, plan.as_dict()), qa, qb_kn)


def test_matmul_saturation_and_largest_accumulator():
  k = (2 ** 31 - 1) // 128 ** 2  # 131071: |acc| = k·2^14 just below 2^31
  plan = P.matmul_plan(1e-3, 1e-3, 1.0, k=k)
  qa = np.full((1, 2, k), -128, np.int8)
  qa[0, 1] = 127
  qb = np.full((1, k, 1), -128, np.int8)
  got = _same(lambda a, b: ibert.int_matmul_act(a, b, plan),
              lambda a, b: NP.int_matmul_act(a, b, plan.as_dict()), qa, qb)
  want = np.clip(np.round(np.array([k * 128 * 128, -k * 127 * 128]) * 1e-6), -128, 127)
  np.testing.assert_array_equal(got.reshape(-1), want)  # 127 and −128: saturated
  with pytest.raises(ValueError, match="k=131072"):
    P.matmul_plan(1.0, 1.0, 1.0, k=k + 1)
  with pytest.raises(ValueError, match="exceeds the plan's k=64"):
    ibert.int_matmul_act(_i8((2, 65)), _i8((65, 3)), P.matmul_plan(1, 1, 1, 64))


def test_attention_head_end_to_end():
  """Q·Kᵀ (int32) → i-softmax with a padding mask → ·V (int8): both runtimes agree bit
  for bit, and the output is close to float attention on the same codes."""
  b, t, d = 3, 8, 16
  sq, sk, sv, s_out = 0.06, 0.05, 0.04, 0.04  # out: convex mixes of v, on v's grid
  q, k, v = _i8((b, t, d), -30, 30), _i8((b, t, d), -30, 30), _i8((b, t, d))
  mask = np.ones((b, 1, t), bool)
  mask[1, :, 5:] = False  # padded keys
  scale = sq * sk / math.sqrt(d)
  sm, mm = P.softmax_plan(scale, t), P.matmul_plan(2.0 ** -7, sv, s_out, k=t)

  def jax_head(q, k, v, mask):
    scores = ibert.int_matmul_acc(q, k, transpose_b=True)
    return ibert.int_matmul_act(ibert.i_softmax(scores, sm, mask), v, mm)

  def np_head(q, k, v, mask):
    scores = NP.int_matmul_acc(q, k, transpose_b=True)
    return NP.int_matmul_act(NP.i_softmax(scores, sm.as_dict(), mask), v, mm.as_dict())

  got = _same(jax_head, np_head, q, k, v, mask)
  x = np.einsum("bmk,bnk->bmn", q * sq, k * sk) / math.sqrt(d)
  ref = np.clip(np.einsum("bmn,bnk->bmk", _softmax(x, mask), v * sv), -128 * s_out,
                127 * s_out)
  # Bound: Σ_j |p̂_j − p_j| over a row ≤ t·2^-8 (7-bit rounding) + 2δ/(1 − δ) (i-exp's
  # relative error δ, as in the i-softmax test, moves the ratios) + t·(t + 1)/exp0 (the
  # floored exp codes); the 127-saturation cannot occur with these spreads (checked).
  # The output moves by that sum times max|v|, plus one requantization (≤ 1/2 code).
  assert _softmax(x, mask).max() < 127.5 / 128
  p = np.linspace(-math.log(2), 0, 100001)
  delta = np.max(np.abs((0.3585 * (p + 1.353) ** 2 + 0.344) / np.exp(p) - 1))
  delta += (31 + 2) * sm.exp.work_scale
  l1 = t * 2.0 ** -8 + 2 * delta / (1 - delta) + t * (t + 1) / sm.exp.exp0
  bound = l1 * np.abs(v * sv).max() + s_out * (0.5 + 2 ** -20)
  err = np.max(np.abs(got * s_out - ref))
  assert err <= bound, (err, bound)


# ------------------------------------------------------------------ i-exp
@pytest.mark.parametrize("scale", [0.05, 0.11, 3e-7])
def test_i_exp_bit_exact_and_relative_error(scale):
  plan = P.exp_plan(scale)
  x_max = 6.5  # a softmax row's spread of int8-scale logits
  top = int(x_max / scale)
  q = np.unique(np.concatenate([-np.arange(0, top, max(1, top // 4000)), [0, -1]]))
  q = q.astype(np.int32)
  got = _same(lambda v: ibert.i_exp(v, plan), lambda v: NP.i_exp(v, plan.as_dict()), q)
  x = q.astype(np.float64) * scale
  rel = np.abs(got * plan.out_scale / np.exp(x) - 1)
  # Bound: the paper's polynomial on (−ln2, 0] (its max relative error, measured here on a
  # dense grid) times 2^-z exactly, plus the floored constants at the working scale S':
  # ln2' = ⌊ln2/S'⌋·S' is short of ln2 by < S', so z·(ln2 − ln2') < z·S' in the exponent;
  # b and c floored move the polynomial by < 2·(b·a·S' + a·S'²)/0.5 relative; the final
  # floor of L >> z costs < 2^z/L(−ln2) ≤ 2^z·2^-27.
  p = np.linspace(-math.log(2), 0, 100001)
  eps_poly = np.max(np.abs((0.3585 * (p + 1.353) ** 2 + 0.344) / np.exp(p) - 1))
  s, z_max = plan.work_scale, math.floor(x_max / math.log(2))
  bound = eps_poly + z_max * s + 4 * 0.3585 * 1.353 * s + 2 ** (z_max - 27)
  assert rel.max() <= bound, (rel.max(), bound)
  assert rel.max() >= 0.5 * eps_poly  # the polynomial's error is really there


def test_i_exp_edges():
  plan = P.exp_plan(0.05)
  q = np.array([0, 5, 2 ** 31 - 1, -2 ** 31, -(2 ** 30), -10 ** 6, -431, -430, -429],
               np.int32)
  got = _same(lambda v: ibert.i_exp(v, plan), lambda v: NP.i_exp(v, plan.as_dict()), q)
  assert got[0] == got[1] == got[2] == plan.exp0  # positive inputs clamp to exp(0)
  assert np.all(got[3:6] == 0)                    # far below −31·ln2: exactly 0
  assert abs(plan.exp0 * plan.out_scale - 1) < 1e-3


# ------------------------------------------------------------------ i-softmax
def _softmax(x, mask=None):
  x = np.where(mask, x, -np.inf) if mask is not None else x
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("n,out_bits", [(64, 7), (384, 7), (16, 4)])
def test_i_softmax_bit_exact_and_max_abs_error(n, out_bits):
  # int32 scores of Q·Kᵀ from int8 codes (scales 0.08, 0.06) with 1/√64 folded in.
  scale = 0.08 * 0.06 / 8
  plan = P.softmax_plan(scale, n, out_bits)
  q = RNG.integers(-2000, 2000, (6, n)).astype(np.int32)
  q[1] = RNG.integers(-128 * 128 * 2, 128 * 128 * 2, n)  # wide rows: near one-hot
  got = _same(lambda v: ibert.i_softmax(v, plan), lambda v: NP.i_softmax(v, plan.as_dict()), q)
  ref = _softmax(q * scale)
  # Bound: output rounding 2^-(B+1); i-exp's relative error δ on every term moves a ratio
  # by < 2δ/(1 − δ) (δ as in the i-exp test, z ≤ 31); each exp code floored loses < 1 of
  # exp0 = L(0) >> r, so < (n + 1)/exp0 more; the saturation at 127 is applied to ref.
  p = np.linspace(-math.log(2), 0, 100001)
  delta = np.max(np.abs((0.3585 * (p + 1.353) ** 2 + 0.344) / np.exp(p) - 1))
  delta += (31 + 2) * plan.exp.work_scale
  bound = 2.0 ** -(out_bits + 1) + 2 * delta / (1 - delta) + (n + 1) / plan.exp.exp0
  err = np.abs(got * plan.out_scale - np.minimum(ref, 127 * plan.out_scale))
  assert err.max() <= bound, (err.max(), bound)


def test_i_softmax_all_equal_rows_masks_and_saturation():
  n = 12
  plan = P.softmax_plan(1e-4, n)
  q = np.zeros((5, n), np.int32)
  q[0] = 1234                                   # all equal
  q[1] = -(2 ** 31)                             # all equal at the int32 edge
  q[2, :] = -(2 ** 31)
  q[2, 3] = 2 ** 31 - 1                         # saturated one-hot
  q[3] = np.arange(n) * 1000                    # masked below
  q[4] = 7
  mask = np.ones((5, n), bool)
  mask[3, ::2] = False                          # padding: every other key
  mask[4] = False                               # fully masked row
  got = _same(lambda v, m: ibert.i_softmax(v, plan, m),
              lambda v, m: NP.i_softmax(v, plan.as_dict(), m), q, mask)
  for row in got[:2]:
    assert np.all(row == row[0])               # equal inputs, equal outputs
    assert abs(int(row.astype(np.int64).sum()) - 128) <= n // 2  # Σ ≈ 1: n·round(128/n)
  np.testing.assert_array_equal(got[2], np.where(np.arange(n) == 3, 127, 0))
  assert np.all(got[3, ::2] == 0) and np.all(got[4] == 0)
  np.testing.assert_array_equal(got[3, 1::2], _same(
      lambda v: ibert.i_softmax(v, P.softmax_plan(1e-4, n // 2)),
      lambda v: NP.i_softmax(v, P.softmax_plan(1e-4, n // 2).as_dict()), q[3:4, 1::2])[0])
  # a [T] key mask broadcast over rows
  key_mask = np.arange(n) < 5
  got_b = _same(lambda v, m: ibert.i_softmax(v, plan, m),
                lambda v, m: NP.i_softmax(v, plan.as_dict(), m), q[:2], key_mask)
  assert np.all(got_b[:, 5:] == 0) and np.all(got_b[:, :5] == round(128 / 5))


def test_softmax_plan_refuses_rows_too_long():
  with pytest.raises(ValueError, match="too long"):
    P.softmax_plan(1e-3, 2 ** 20)
  with pytest.raises(ValueError, match="out_bits=8"):
    P.softmax_plan(1e-3, 8, out_bits=8)


# ------------------------------------------------------------------ i-GELU
def _gelu_float_bound(x_max, se):
  """The paper's i-GELU in float64 (its own approximation error, max over |x| ≤ x_max)
  plus the floored constants at the erf input scale se: b' and the clip move the
  polynomial by < 2·|a|·|b|·se, c' and the 1 term by < 2·|a|·se², times |x|/2."""
  a, b = -0.2888, -1.769
  x = np.linspace(-x_max, x_max, 200001)
  u = x / math.sqrt(2)
  erf_i = np.sign(u) * (a * (np.minimum(np.abs(u), -b) + b) ** 2 + 1)
  approx = np.max(np.abs(x / 2 * (1 + erf_i) - x / 2 * (1 + ERF(u))))
  return approx, approx + x_max / 2 * (2 * abs(a * b) * se + 3 * abs(a) * se * se)


@pytest.mark.parametrize("scale", [0.02, 0.05, 0.09])
def test_i_gelu_bit_exact_and_max_abs_error(scale):
  out_scale = scale  # GELU(x) ∈ [−0.17, x_max]: the input grid does not saturate
  plan = P.gelu_plan(scale, out_scale)
  q = np.arange(-128, 128).astype(np.int8)
  acc = _same(lambda v: ibert.i_gelu_acc(v, plan), lambda v: NP.i_gelu_acc(v, plan.as_dict()), q)
  got = _same(lambda v: ibert.i_gelu(v, plan), lambda v: NP.i_gelu(v, plan.as_dict()), q)
  x = q.astype(np.float64) * scale
  ref = x / 2 * (1 + ERF(x / math.sqrt(2)))
  approx, bound = _gelu_float_bound(128 * scale, plan.work_scale / math.sqrt(2))
  err_acc = np.max(np.abs(acc * plan.acc_scale - ref))
  assert approx * 0.5 <= err_acc <= bound, (err_acc, approx, bound)
  # int8 output: the accumulator's error plus one requantization (≤ 1/2 code + 2^-20)
  err = np.max(np.abs(got * out_scale - ref))
  assert err <= bound + out_scale * (0.5 + 2 ** -20), (err, bound)


def test_i_gelu_int32_inputs_and_saturation():
  # int32 accumulator inputs at a fine scale: the plan divides them down (RDBPOT).
  plan = P.gelu_plan(1e-5, 0.05, max_abs_in=2 ** 20)
  assert plan.shift_in > 0
  q = np.concatenate([RNG.integers(-2 ** 20, 2 ** 20, 2000),
                      [2 ** 31 - 1, -2 ** 31, 2 ** 20, -2 ** 20, 0, 1, -1]]).astype(np.int32)
  got = _same(lambda v: ibert.i_gelu(v, plan), lambda v: NP.i_gelu(v, plan.as_dict()), q)
  x = np.clip(q, -2 ** 20, 2 ** 20) * 1e-5
  ref = np.clip(x / 2 * (1 + ERF(x / math.sqrt(2))), -128 * 0.05, 127 * 0.05)
  _, bound = _gelu_float_bound(2 ** 20 * 1e-5, plan.work_scale / math.sqrt(2))
  # plus half a working-scale step of input rounding (slope of GELU ≤ 1.13)
  assert np.max(np.abs(got * 0.05 - ref)) <= bound + 0.05 * 0.5 + 1.13 * plan.work_scale / 2
  small = P.gelu_plan(0.1, 0.01)  # GELU up to 12.7 on a 0.01 grid: saturates at 127
  sat = _same(lambda v: ibert.i_gelu(v, small), lambda v: NP.i_gelu(v, small.as_dict()),
              np.array([127, 100, -128], np.int8))
  np.testing.assert_array_equal(sat, [127, 127, 0])


# ------------------------------------------------------------------ i-sqrt
def test_i_sqrt_exact_against_isqrt():
  k = np.concatenate([np.arange(0, 300), RNG.integers(300, 46341, 300), [46340]])
  n = np.concatenate([k * k - 1, k * k, k * k + 1, RNG.integers(0, 2 ** 31, 3000),
                      [0, 1, 2, 3, 2 ** 30 - 1, 2 ** 30, 2 ** 31 - 2, 2 ** 31 - 1]])
  n = n[(n >= 0) & (n < 2 ** 31)].astype(np.int32)
  got = _same(ibert.i_sqrt, NP.i_sqrt, n)
  np.testing.assert_array_equal(got, [math.isqrt(int(v)) for v in n])


# ------------------------------------------------------------------ integer LayerNorm
def _layernorm(x, gamma, beta, eps):
  mu = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("n,spread,eps,zp", [(64, 127, 1e-5, 0), (768, 20, 1e-5, 0),
                                             (32, 3, 0.0, 0), (48, 60, 1e-5, -67)])
def test_i_layernorm_bit_exact_and_error(n, spread, eps, zp):
  scale, out_scale = 0.05, 0.04
  gamma = RNG.normal(1.0, 0.3, n)
  gamma[0], gamma[1] = -0.7, 0.0             # a negative and a zero gamma
  beta = RNG.normal(0.0, 0.3, n)
  plan = P.layernorm_plan(scale, gamma, beta, out_scale, eps=eps, zp=zp)
  q = np.clip(zp + RNG.integers(-spread, spread, (8, n), endpoint=True), -128, 127)
  q = q.astype(np.int8)
  got = _same(lambda v: ibert.i_layernorm(v, plan), lambda v: NP.i_layernorm(v, plan.as_dict()), q)
  ref = _layernorm((q.astype(np.int64) - zp) * scale, gamma, beta, eps)
  assert np.all(np.abs(ref) < 127 * out_scale)  # no saturation in this case
  # Bound: one rounding to whole codes (≤ 1/2) after the requantization and beta, each
  # rounded to 2^-beta_bits of a code (≤ 2^-(beta_bits+1) each), in output codes; plus
  # |γ·z| ≤ |γ|·√(n − 1) times σ's relative error: ⌊√W⌋ loses < 1, W's ceiling and
  # eps rounding < 1 of W, so < 2/σ; σ ≥ 2^14.5 − 1 unless the row's shift stops at
  # p_max (4^p_max·n < 2^31), where σ ≥ 2^p_max·√(Σ(x − mean)²) − 1.
  x = q.astype(np.int64) - zp
  v = n * (x * x).sum(-1) - x.sum(-1) ** 2  # n·Σ(x − mean)², exact
  p_max = max(p for p in range(16) if 4 ** p * n < 2 ** 31)
  sigma_lo = min(2 ** 14.5, 2 ** p_max * math.sqrt((v / n).min())) - 1
  z = np.abs(ref - beta) / np.maximum(np.abs(gamma), 1e-12)
  bound = out_scale * (0.5 + 2.0 ** -plan.beta_bits + 2 ** -20) + np.max(
      np.abs(gamma) * z * 2 / sigma_lo)
  err = np.max(np.abs(got * out_scale - ref))
  assert err <= bound, (err, bound)


def test_i_layernorm_zero_variance_and_extremes():
  n = 16
  gamma, beta = RNG.normal(1, 0.5, n), RNG.normal(0, 1, n)
  for eps in (0.0, 1e-5):
    plan = P.layernorm_plan(0.05, gamma, beta, 0.03, eps=eps)
    q = np.zeros((5, n), np.int8)
    q[0], q[1], q[2] = -128, 127, 3         # constant rows: zero variance
    q[3, ::2], q[3, 1::2] = -128, 127       # the largest variance
    q[4, 0] = 1                             # one code apart
    got = _same(lambda v: ibert.i_layernorm(v, plan),
                lambda v: NP.i_layernorm(v, plan.as_dict()), q)
    # output = beta: each code is the nearest to β/out_scale (beta kept to 2^-beta_bits)
    assert np.max(np.abs(got[:3] - np.clip(beta / 0.03, -128, 127))) <= 0.5 + 2.0 ** -(
        plan.beta_bits + 1)
    assert np.all(got[:3] == got[0])
    ref = np.clip(_layernorm(q[3:] * 0.05, gamma, beta, eps), -128 * 0.03, 127 * 0.03)
    # as in the test above: row 4's Σ(x − mean)² = 15/16, p_max = 13 for n = 16
    bound = 0.03 * (0.5 + 2.0 ** -8 + 2 ** -20) + np.max(np.abs(gamma)) * math.sqrt(n - 1) * 2 / (
        2 ** 13 * math.sqrt(15 / 16) - 1)
    assert np.max(np.abs(got[3:] * 0.03 - ref)) <= bound
  plan = P.layernorm_plan(0.1, [2.0], [0.5], 0.1)  # n = 1: always zero variance
  np.testing.assert_array_equal(_same(lambda v: ibert.i_layernorm(v, plan),
                                      lambda v: NP.i_layernorm(v, plan.as_dict()),
                                      np.array([[-128], [127]], np.int8)), [[5], [5]])
  with pytest.raises(ValueError, match="int32 variance"):
    P.layernorm_plan(0.05, np.ones(40000), np.zeros(40000), 0.1)


def test_i_layernorm_longest_rows_stay_inside_int32():
  """n = 32768 (n·255² just below 2^31): the largest variance, one code off, random."""
  n = 2 ** 15
  gamma, beta = RNG.normal(1, 0.2, n), RNG.normal(0, 0.2, n)
  plan = P.layernorm_plan(0.05, gamma, beta, 0.04)
  q = np.zeros((3, n), np.int8)
  q[0, ::2], q[0, 1::2] = -128, 127
  q[1, 7] = -1
  q[2] = _i8((n,))
  got = _same(lambda v: ibert.i_layernorm(v, plan), lambda v: NP.i_layernorm(v, plan.as_dict()), q)
  ref = _layernorm(q * 0.05, gamma, beta, 1e-5)
  # Per element, as in test_i_layernorm_bit_exact_and_error: σ's relative error < 2/σ,
  # σ ≥ min(2^14.5, 2^p_max·√(Σ(x − mean)²)) − 1 per row, times |γ·z|; clipping both
  # sides to the int8 grid can only shrink the difference.
  x = q.astype(np.int64)
  v = (n * (x * x).sum(-1) - x.sum(-1) ** 2) / n
  sigma_lo = np.minimum(2 ** 14.5, 2.0 ** plan.p_max * np.sqrt(v)) - 1
  bound = 0.04 * (0.5 + 2.0 ** -8 + 2 ** -20) + np.abs(ref - beta) * 2 / sigma_lo[:, None]
  err = np.abs(got * 0.04 - np.clip(ref, -128 * 0.04, 127 * 0.04))
  assert np.all(err <= bound), np.max(err - bound)


# ------------------------------------------------------------------ int8 embedding
@pytest.mark.parametrize("per_row", [True, False])
def test_embedding_lookup_int8(per_row):
  vocab, dim = 50, 8
  table = _i8((vocab, dim))
  table[3] = -128
  table[4] = 127
  scales = RNG.uniform(0.01, 0.1, vocab) if per_row else 0.04
  plan = P.embed_plan(scales, 0.06)
  ids = np.concatenate([RNG.integers(0, vocab, 30), [3, 4, -5, vocab + 7]]).reshape(2, 17)
  got = _same(lambda t, i: ibert.embedding_lookup_int8(t, i, plan),
              lambda t, i: NP.embedding_lookup_int8(t, i, plan.as_dict()), table,
              ids.astype(np.int32))
  rows = table[np.clip(ids, 0, vocab - 1)].astype(np.float64)
  s = np.broadcast_to(np.asarray(scales, np.float64), (vocab,))[np.clip(ids, 0, vocab - 1)]
  ref = np.clip(rows * s[..., None] / 0.06, -128, 127)
  assert np.max(np.abs(got - ref)) <= 0.5 + 2 ** -20


# ------------------------------------------------------------------ integer-only jaxprs
def test_no_float_dtype_inside_any_kernel():
  mm = P.matmul_plan(0.02, 0.03, 0.05, 16)
  sm = P.softmax_plan(1e-4, 8)
  ln = P.layernorm_plan(0.05, np.ones(8), np.zeros(8), 0.04)
  cases = {
      "int_matmul_act": (lambda a, b: ibert.int_matmul_act(a, b, mm),
                         (_i8((2, 4, 16)), _i8((2, 16, 3)))),
      "i_exp": (lambda v: ibert.i_exp(v, P.exp_plan(0.05)), (np.zeros(8, np.int32),)),
      "i_softmax": (lambda v, m: ibert.i_softmax(v, sm, m),
                    (np.zeros((2, 8), np.int32), np.ones((2, 8), bool))),
      "i_gelu": (lambda v: ibert.i_gelu(v, P.gelu_plan(0.05, 0.05)), (_i8((8,)),)),
      "i_gelu(int32)": (lambda v: ibert.i_gelu(v, P.gelu_plan(1e-5, 0.05, 2 ** 20)),
                        (np.zeros(8, np.int32),)),
      "i_sqrt": (ibert.i_sqrt, (np.zeros(8, np.int32),)),
      "i_layernorm": (lambda v: ibert.i_layernorm(v, ln), (_i8((2, 8)),)),
      "embedding_lookup_int8": (lambda t, i: ibert.embedding_lookup_int8(
          t, i, P.embed_plan(np.full(5, 0.1))), (_i8((5, 4)), np.zeros(3, np.int32))),
  }
  for name, (fn, args) in cases.items():
    jaxpr = jax.make_jaxpr(fn)(*args)
    assert float_dtypes_in(jaxpr) == [], name
    assert len(jaxpr.jaxpr.eqns) > 0, name


def test_same_codes_with_x64_enabled():
  """x64 changes jnp's default integer; the kernels keep int32 and the same results."""
  sm = P.softmax_plan(1e-3, 16)
  ln = P.layernorm_plan(0.05, RNG.normal(1, 0.2, 16), RNG.normal(0, 0.2, 16), 0.04)
  scores, codes = RNG.integers(-5000, 5000, (3, 16)).astype(np.int32), _i8((3, 16))
  with jax.enable_x64(True):
    got_sm = np.asarray(jax.jit(lambda v: ibert.i_softmax(v, sm))(scores))
    got_ln = np.asarray(jax.jit(lambda v: ibert.i_layernorm(v, ln))(codes))
  np.testing.assert_array_equal(got_sm, NP.i_softmax(scores, sm.as_dict()))
  np.testing.assert_array_equal(got_ln, NP.i_layernorm(codes, ln.as_dict()))


def test_kernels_refuse_float_inputs_and_bad_scales():
  with pytest.raises(TypeError, match="integer codes"):
    ibert.i_exp(jnp.zeros(3), P.exp_plan(0.1))
  with pytest.raises(ValueError, match="in_scale=-1.0"):
    P.exp_plan(-1.0)
  with pytest.raises(ValueError, match="row length 5"):
    ibert.i_softmax(jnp.zeros((2, 5), jnp.int32), P.softmax_plan(0.1, 4))


def test_numpy_twin_imports_no_jax(tmp_path):
  """The twin runs where jax cannot be imported, and gives the same codes."""
  plan = P.softmax_plan(1e-3, 6)
  q = RNG.integers(-3000, 3000, (3, 6)).astype(np.int32)
  np.save(tmp_path / "q.npy", q)
  script = textwrap.dedent(f"""
      import importlib.abc, importlib.util, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split('.')[0] in ('jax', 'jaxlib', 'jaxquant', 'flax'):
            raise ImportError(name + ' is blocked')
      sys.meta_path.insert(0, Block())
      import numpy as np
      spec = importlib.util.spec_from_file_location('twin', {TWIN_PATH!r})
      twin = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(twin)
      out = twin.i_softmax(np.load({str(tmp_path / 'q.npy')!r}), {plan.as_dict()!r})
      np.save({str(tmp_path / 'out.npy')!r}, out)
      assert not any(m.split('.')[0] in ('jax', 'jaxlib') for m in sys.modules)
      """)
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ""})
  assert res.returncode == 0, res.stderr
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ibert.i_softmax(q, plan))
