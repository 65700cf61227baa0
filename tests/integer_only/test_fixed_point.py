"""Fixed-point rules of integer-only inference against exact Python-integer references:
SRDHM (ties toward +inf, saturation), RDBPOT (ties away from zero), the full multiplier,
its (M0, e) encoding, isqrt and rounding division; JAX int32 path, JAX int64 (x64) path
and the numpy runtime."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.integer_only import fixed_point as fp
from tests.integer_only.int_helpers import (numpy_runtime, ref_mbqm, ref_rdbpot, ref_requantize,
                         ref_rounding_divide, ref_srdhm)

MIN, MAX = -2 ** 31, 2 ** 31 - 1
EDGES = [MIN, MIN + 1, -2 ** 30 - 1, -2 ** 30, -2 ** 30 + 1, -3 * 2 ** 29, -3, -2, -1, 0, 1,
         2, 3, 3 * 2 ** 29, 2 ** 30 - 1, 2 ** 30, 2 ** 30 + 1, MAX - 1, MAX]
RNG = np.random.default_rng(0)
RANDOM = [int(v) for v in RNG.integers(MIN, MAX, 60, endpoint=True)]
NR = numpy_runtime()


def _pairs():
  vals = EDGES + RANDOM
  a = np.array([x for x in vals for _ in vals], np.int64)
  b = np.array([y for _ in vals for y in vals], np.int64)
  return a, b


def test_srdhm_all_paths_match_exact_reference():
  a, b = _pairs()
  ref = np.array([ref_srdhm(int(x), int(y)) for x, y in zip(a, b)], np.int64)
  a32, b32 = a.astype(np.int32), b.astype(np.int32)
  got32 = np.asarray(jax.jit(fp.srdhm)(a32, b32))
  with jax.enable_x64(True):
    got64 = np.asarray(jax.jit(lambda x, y: fp.srdhm(x, y))(jnp.asarray(a32), jnp.asarray(b32)))
  np.testing.assert_array_equal(got32, ref)
  np.testing.assert_array_equal(got64, ref)
  np.testing.assert_array_equal(NR.srdhm(a32, b32), ref)


def test_srdhm_documented_rule_on_ties_and_saturation():
  # a·b/2^31 = ±0.5, ±1.5: ties go toward +inf (gemmlowp's nudge), not away from zero.
  a = np.array([2 ** 30, -2 ** 30, 3 * 2 ** 29, -3 * 2 ** 29, MIN, MIN, MAX], np.int32)
  b = np.array([1, 1, 2, 2, MIN, MAX, MAX], np.int32)
  want = [1, 0, 2, -1, MAX, -MAX, MAX - 1]
  np.testing.assert_array_equal(np.asarray(jax.jit(fp.srdhm)(a, b)), want)
  np.testing.assert_array_equal(NR.srdhm(a, b), want)


def test_rounding_divide_by_pot_ties_away_from_zero():
  x = np.array([v for v in EDGES + RANDOM for _ in range(32)], np.int64)
  n = np.array([k for _ in EDGES + RANDOM for k in range(32)], np.int64)
  ref = np.array([ref_rdbpot(int(v), int(k)) for v, k in zip(x, n)])
  got = np.asarray(jax.jit(fp.rounding_divide_by_pot)(x.astype(np.int32), n.astype(np.int32)))
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(NR.rdbpot(x, n), ref)
  # The negative-rounding cases spelled out: −0.5 → −1, −1.5 → −2, −1.25 → −1, −2^31/2^31.
  xs = np.array([-1, -3, -5, 1, 3, MIN, MAX, -6], np.int32)
  ns = np.array([1, 1, 2, 1, 1, 31, 31, 2], np.int32)
  want = [-1, -2, -1, 1, 2, -1, 1, -2]
  np.testing.assert_array_equal(np.asarray(jax.jit(fp.rounding_divide_by_pot)(xs, ns)), want)
  np.testing.assert_array_equal(NR.rdbpot(xs, ns), want)


def test_multiply_by_quantized_multiplier_with_left_shift_saturation():
  xs = EDGES + RANDOM[:20]
  m0s = [2 ** 30, 2 ** 30 + 1, MAX, 1518500250, 0] + [int(v) for v in RNG.integers(2 ** 30, MAX, 5)]
  es = [-31, -20, -9, -1, 0, 1, 3, 30]
  grid = [(x, m, e) for x in xs for m in m0s for e in es]
  x, m0, e = (np.array(c, np.int64) for c in zip(*grid))
  ref = np.array([ref_mbqm(*t) for t in grid], np.int64)
  got = np.asarray(jax.jit(fp.multiply_by_quantized_multiplier)(
      x.astype(np.int32), m0.astype(np.int32), e.astype(np.int32)))
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(NR.requantize(x, m0, e), ref)
  shifted = x.astype(np.float64) * 2.0 ** np.maximum(e, 0)
  assert np.any(shifted > MAX) and np.any(shifted < MIN)  # the saturating shift was hit


@pytest.mark.parametrize("m", [1.0, 0.5, 0.75, 1 / 3, 2.0 ** -20, 1 - 2.0 ** -40, 123.456,
                               0.0123, 2.0 ** 29 + 7, 2.0 ** -31])
def test_quantize_multiplier_encoding(m):
  m0, e = fp.quantize_multiplier(m)
  assert 2 ** 30 <= m0 < 2 ** 31
  approx = m0 * 2.0 ** (e - 31)
  assert abs(approx - m) <= 2.0 ** (e - 32) * (1 + 1e-9)  # half a unit of M0's last place


def test_quantize_multiplier_limits():
  assert fp.quantize_multiplier(0.0) == (0, 0)
  assert fp.quantize_multiplier(2.0 ** -40) == (0, 0)
  assert fp.quantize_multiplier(1 - 2.0 ** -40) == (2 ** 30, 1)  # M0 rounded up to 2^31
  for bad in (2.0 ** 31, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="multiplier"):
      fp.quantize_multiplier(bad)


def test_isqrt_and_rounding_divide_exact():
  roots = [0, 1, 2, 3, 255, 4096, 46340]
  v = sorted({max(0, r * r + d) for r in roots for d in (-1, 0, 1)} | {MAX, 2 ** 30}
             | {int(t) for t in RNG.integers(0, MAX, 200)})
  got = np.asarray(jax.jit(fp.isqrt)(np.array(v, np.int32)))
  np.testing.assert_array_equal(got, [math.isqrt(t) for t in v])
  a = np.arange(-40, 41, dtype=np.int32)
  for d in (1, 2, 3, 4, 7, 16):
    want = [ref_rounding_divide(int(t), d) for t in a]
    np.testing.assert_array_equal(np.asarray(fp.rounding_divide(a, d)), want)
    np.testing.assert_array_equal(NR.rdiv(a, d), want)


@pytest.mark.parametrize("bound", [7, 300, 2 ** 20, 2 ** 27])
def test_requant_shifts_round_once(bound):
  # Multipliers like those of 4-bit layers (M ~ 0.1–0.5 on accumulators of ~10): with the
  # pre-shift the result is x·M rounded once, off by at most 1/2 + 2^-(right+1) (+ M0's
  # relative error), where a single right shift could be off by up to 3/4.
  m = np.array([0.1234, 0.26, 0.4999, 0.75, 1.0, 3.3, 2.0 ** -20, 0.0])
  m0, left, right = fp.requant_shifts(m, bound)
  assert np.all((left >= 0) & (left <= 30) & (right >= 0) & (right <= 31))
  np.testing.assert_allclose(m0 * 2.0 ** (left.astype(float) - right - 31), m, rtol=1e-9)
  assert np.all(bound * 2.0 ** left.astype(float) <= 2 ** 30)
  x = np.linspace(-bound, bound, 41).round().astype(np.int64)
  for j in range(m.size):
    got = np.asarray(fp.requantize(x.astype(np.int32), m0[j], left[j], right[j]))
    ref = [ref_requantize(int(v), int(m0[j]), int(left[j]), int(right[j])) for v in x]
    np.testing.assert_array_equal(got, ref)
    fits = np.abs(x * 2.0 ** left[j]) < 2 ** 31  # beyond: the shift saturates, as specified
    err = np.abs(got - x * m[j])[fits]
    assert np.all(err <= 0.5 + 2.0 ** -(right[j] + 1) + 1e-9 * np.abs(x * m[j])[fits])


def test_requant_offset_and_headroom():
  # A bias carried at 2^-left of the accumulator: (x + 0.3)·M rounded once.
  m0, left, right = fp.requant_shifts(np.array([0.05]), 100 + 1)
  offset = int(round(0.3 * 2 ** int(left[0])))
  x = np.arange(-100, 101, dtype=np.int32)
  got = np.asarray(fp.requantize(x, m0[0], left[0], right[0], offset))
  ref = [ref_rdbpot(ref_srdhm(int(v) * 2 ** int(left[0]) + offset, int(m0[0])), int(right[0]))
         for v in x]
  np.testing.assert_array_equal(got, ref)
  assert np.all(np.abs(got - (x + 0.3) * 0.05) <= 0.5 + 1e-6)
  with pytest.raises(ValueError, match="left shift"):
    fp.requant_shifts(np.array([4.0]), 2 ** 29)  # M = 4 needs 3 bits; only 1 is free
