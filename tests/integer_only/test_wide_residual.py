"""Wide (int16) residual paths, `to_integer(..., residual_bits=16)`: the `add` and `norm`
kernels on int16 codes at their extremes against exact references written from the
documented rules (Python ints and Fractions), both runtimes bit for bit, the layouts'
int32 bounds, and a tiny BERT-style encoder through `to_integer`."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from experiments.pretrained import minilm_integer
from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only.ops import add as add_op
from jaxquant.integer_only.ops import norm as norm_op
from tests.experiments.pretrained.test_minilm_integer import TINY, tiny_ids, tiny_minilm
from tests.integer_only.int_helpers import (float_in_program, numpy_runtime, ref_mbqm,
                                            ref_rdbpot, ref_rounding_divide, ref_srdhm)

NR = numpy_runtime()
I16 = (-2 ** 15, -2 ** 15 + 1, -1, 0, 1, 2 ** 15 - 2, 2 ** 15 - 1)
INT32 = 2 ** 31


def _arr(arrays):
  return lambda op, field: None if op.get(field) is None else jnp.asarray(arrays[op[field]])


# ------------------------------------------------------------------ add
@pytest.mark.parametrize("ratio", [1.0, 0.37, 1e-4])
def test_add_of_saturated_int16_codes_is_exact_and_fits_int32(ratio):
  shift = add_op.left_shift(16)
  assert shift == 12 and add_op.left_shift(8) == add_op.ADD_LEFT_SHIFT == 20
  s_a, s_b = 1.0, ratio  # the larger scale is s_a: m_a = 1/2, m_b = ratio / 2
  m0_a, e_a = fp.quantize_multiplier(s_a / (2 * s_a))
  m0_b, e_b = fp.quantize_multiplier(s_b / (2 * s_a))
  for zp_a, zp_b, sign_b in ((2 ** 15 - 1, -2 ** 15, 1), (-2 ** 15, 2 ** 15 - 1, -1),
                             (0, 7, 1)):
    op = {"zp_a": zp_a, "zp_b": zp_b, "sign_a": 1, "sign_b": sign_b, "m0_a": m0_a,
          "e_a": e_a, "m0_b": m0_b, "e_b": e_b, "left_shift": shift}
    qa, qb = (np.array(v, np.int16).reshape(-1) for v in np.meshgrid(I16, I16))
    got = np.asarray(add_op.kernel(op, None, jnp.asarray(qa), jnp.asarray(qb)))
    np.testing.assert_array_equal(got, NR.add(op, {}, qa, qb))
    want = [ref_mbqm((int(a) - zp_a) * 2 ** shift, m0_a, e_a)
            + ref_mbqm(sign_b * (int(b) - zp_b) * 2 ** shift, m0_b, e_b)
            for a, b in zip(qa, qb)]
    np.testing.assert_array_equal(got, want)
    assert np.abs(np.asarray(want, np.int64)).max() <= 2 ** add_op.ADD_ACC_BITS
    # The accumulator is the real sum at scale 2·s_a/2^L, to within a code and a half.
    real = ((qa.astype(np.float64) - zp_a) * s_a
            + sign_b * (qb.astype(np.float64) - zp_b) * s_b) / (2 * s_a / 2 ** shift)
    assert np.abs(got - real).max() <= 1.5
  assert max(abs(int(a) - z) for a in I16 for z in I16) == 2 ** 16 - 1  # the extremes


def test_add_refuses_codes_wider_than_16_bits():
  with pytest.raises(ValueError, match="at most 16-bit"):
    add_op.left_shift(32)


# ------------------------------------------------------------------ norm
def ref_norm(x_rows, zp, eps, lay):
  """The module docstring's integer normalization of each row (one group) in Python
  ints, asserting every intermediate fits int32."""
  p, f, a, k = lay
  out = []
  for row in x_rows:
    x = [int(q) - zp for q in row]
    n = len(x)
    s1 = sum(x)
    mu = ref_rounding_divide(s1, n)
    d = [ref_rdbpot(v - mu, k) for v in x]
    s2 = sum(v * v for v in d)
    r = s1 - n * mu
    big_v = max(s2 - ref_rounding_divide(ref_rdbpot(r * r, 2 * k), n), 0)
    var = (big_v // n) * 2 ** (2 * p) + ref_rounding_divide((big_v % n) * 2 ** (2 * p), n)
    sigma = max(math.isqrt(var + eps), 1)
    inv = 2 ** 30 // sigma
    x_f = [v * 2 ** f - ref_rounding_divide(s1 * 2 ** f, n) for v in x]
    t = [ref_srdhm(v * 2 ** a, inv) for v in x_f]
    for value in [s1, 2 * abs(s1) + n, s2, r * r, var + eps, 2 * abs(s1 * 2 ** f) + n,
                  (big_v % n) * 2 ** (2 * p) * 2 + n] + [v * 2 ** a for v in x_f] + t:
      assert -INT32 <= value < INT32, value
    out.append(t)
  return np.asarray(out, np.int64)


def _rows(n):
  rng = np.random.default_rng(3)
  rows = [np.full(n, 2 ** 15 - 1), np.full(n, -2 ** 15),  # zero variance at the rails
          np.where(np.arange(n) % 2 == 0, 2 ** 15 - 1, -2 ** 15),  # the largest variance
          np.where(np.arange(n) == 0, 2 ** 15 - 1, -2 ** 15),  # one code off the rail
          rng.integers(-200, 200, n),  # small values around zero
          np.where(np.arange(n) == n // 3, 30000, rng.integers(-120, 120, n))]  # an outlier
  return np.stack(rows).astype(np.int16)


@pytest.mark.parametrize("n", [384, 17])
def test_norm_of_int16_codes_matches_the_exact_reference(n):
  lay = norm_op.layout(16, n)
  assert lay.var_shift > 0 and lay.out_bits == norm_op.NORM_OUT_BITS
  q = _rows(n)
  for zp in (0, -2 ** 15, 2 ** 15 - 1):
    for eps in (0, 3, 2 ** 30):
      op = {"zp": zp, "groups": 1, "reduce": [2], "eps": eps, "sigma_bits": lay.sigma_bits,
            "mean_bits": lay.mean_bits, "pre_shift": lay.pre_shift, "var_shift": lay.var_shift}
      got = np.asarray(norm_op.kernel(op, None, jnp.asarray(q)))
      np.testing.assert_array_equal(got, NR.norm(op, {}, q))
      np.testing.assert_array_equal(got, ref_norm(q, zp, eps, lay))
  # With eps = 0 the output is the normalized row at scale 2^T: a zero-variance row is 0,
  # every other row within 1% of the float normalization's largest value.
  op.update(zp=0, eps=0)
  got = np.asarray(norm_op.kernel(op, None, jnp.asarray(q))) / 2.0 ** lay.out_bits
  x = q.astype(np.float64)
  sd = x.std(-1, keepdims=True)
  want = np.where(sd > 0, (x - x.mean(-1, keepdims=True)) / np.where(sd > 0, sd, 1), 0)
  np.testing.assert_array_equal(got[:2], 0)
  assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()


@pytest.mark.parametrize("bits", [8, 16])
def test_norm_layouts_keep_every_intermediate_inside_int32(bits):
  x_max = 2 ** bits - 1
  for n in [1, 2, 3, 17, 255, 384, 1000, 4096, 16383, 16384]:
    p, f, a, k = lay = norm_op.layout(bits, n)
    d = bits - k
    assert n * 4 ** d <= 2 ** 30 and (k == 0 or n * 4 ** (d + 1) > 2 ** 30)  # K least
    assert 4 ** d * 2 ** (2 * p) <= 2 ** 30 and n * 2 ** (2 * p) <= 2 ** 28
    assert 2 * n * x_max * 2 ** f + n < INT32
    assert x_max * 2 ** (f + a) < 2 ** 29 and lay.bound(bits) <= 2 ** 29
    assert Fraction(lay.out_bits) == f + a - p + k - 1
    if bits == 8:
      assert tuple(lay) == (7, 8, 13, 0)
  with pytest.raises(ValueError, match="at most 16384"):
    norm_op.layout(bits, 16385)


# ------------------------------------------------------------------ through to_integer
def test_tiny_encoder_with_int16_residuals(tmp_path):
  rng = np.random.default_rng(0)
  model, calib, params = tiny_minilm(rng, 2)
  net, variables = minilm_integer.IdsMiniLM(TINY), {"params": params}
  wide = jq.to_integer(net, variables, calib, residual_bits=16)
  narrow = jq.to_integer(net, variables, calib)  # residual_bits=8: the int8 program
  assert not any(op.get("dtype") == "int16" or "var_shift" in op for op in narrow.graph.ops)
  assert ([op["op"] for op in narrow.graph.ops if op["op"] != "requant"]
          == [op["op"] for op in wide.graph.ops if op["op"] != "requant"])
  # On: int16 codes feed exactly the adds, norms and the i-GELU; contractions read int8.
  dtypes = {op["out"]: op.get("dtype") for op in wide.graph.ops}
  readers = {op["op"] for op in wide.graph.ops if any(dtypes.get(t) == "int16" for t in op["in"])}
  assert readers == {"add", "norm", "gelu"}
  assert all(op["left_shift"] == 12 for op in wide.graph.ops if op["op"] == "add")
  ids = tiny_ids(rng, 16)
  y = np.asarray(wide(ids))
  wide.save(str(tmp_path))
  np.testing.assert_array_equal(y, NR.run(NR.load(str(tmp_path)), ids))
  assert float_in_program(wide, wide.quantize_input(ids), str(tmp_path)) == []
  ref = np.asarray(jax.jit(model.apply)(variables, ids, (ids != 0).astype(np.int32)),
                   np.float64)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  assert np.sum(unit(y.astype(np.float64)) * unit(ref), -1).min() >= 0.99
  with pytest.raises(ValueError, match="residual_bits=12"):
    jq.to_integer(net, variables, calib, residual_bits=12)
