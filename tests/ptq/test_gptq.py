"""GPTQ against an independent OBQ-form numpy reference, RTN, and a hand-worked case."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import numerics
from jaxquant.ptq import gptq as G
from jaxquant.ptq import stats as S
from tests.ptq.ptq_reference import correlated_inputs, np_fake_quant, np_gptq

K, N, SAMPLES = 32, 8, 256

CASES = [
    ("channel_sym", jq.QuantSpec(bits=4), False),
    ("channel_asym_act_order", jq.QuantSpec(bits=4, symmetric=False), True),
    ("group_sym", jq.QuantSpec(bits=4, granularity="group", group_size=8), False),
    ("group_asym_act_order", jq.QuantSpec(bits=3, symmetric=False, granularity="group",
                                          group_size=8), True),
    ("tensor_sym", jq.QuantSpec(bits=4, granularity="tensor"), False),
]


def _layer(seed, dead=()):
  rng = np.random.default_rng(seed)
  x = correlated_inputs(rng, SAMPLES, K)
  x[:, list(dead)] = 0.0
  w = rng.normal(size=(K, N)).astype(np.float32)
  return x, w


@pytest.mark.parametrize("name,spec,act_order", CASES, ids=[c[0] for c in CASES])
def test_matches_numpy_reference(name, spec, act_order):
  x, w = _layer(1, dead=(5,))
  h = np.asarray(S.hessian(S.from_inputs(x)))
  res = G.gptq(w, h, spec, act_order=act_order)
  codes_ref, deq_ref = np_gptq(w, h, spec, act_order=act_order)
  codes = np.asarray(res.qtensor.values, np.float64)
  # float32 vs float64: a value within rounding noise of a grid midpoint may round the
  # other way (then later rows compensate differently); on these seeds none does.
  assert np.array_equal(codes, codes_ref), f"{np.sum(codes != codes_ref)} codes differ"
  np.testing.assert_allclose(np.asarray(res.weight), deq_ref, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(res.weight)[5] == 0.0)  # the dead input's row


@pytest.mark.parametrize("name,spec,act_order", CASES, ids=[c[0] for c in CASES])
def test_codes_are_the_specs_grid(name, spec, act_order):
  x, w = _layer(2)
  res = G.gptq(w, S.hessian(S.from_inputs(x)), spec, act_order=act_order)
  q = res.qtensor
  # The same layout jq.quantize gives this spec, so the serving path can store it as is.
  ref = jq.quantize(jnp.asarray(w), spec, reduce_axes=(0,))
  assert q.values.dtype == jnp.int8 and q.scale.shape == ref.scale.shape
  assert (q.zero_point is None) == (ref.zero_point is None)
  qmin, qmax = numerics.int_range(spec)
  assert int(q.values.min()) >= qmin and int(q.values.max()) <= qmax
  # Re-quantizing the dequantized weight on its own grid gives the same codes back.
  deq = q.dequantize()
  again = numerics.encode(deq, q.scale, q.zero_point, spec, None)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(q.values, np.float32))
  np.testing.assert_array_equal(np.asarray(deq), np.asarray(res.weight))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [jq.QuantSpec(bits=4),
                                  jq.QuantSpec(bits=4, granularity="group", group_size=8)],
                         ids=["channel", "group"])
def test_beats_round_to_nearest_on_correlated_inputs(seed, spec):
  x, w = _layer(10 + seed)
  st = S.from_inputs(x)
  for act_order in (False, True):
    res = G.gptq(w, S.hessian(st), spec, act_order=act_order)
    err_gptq = float(S.output_error(st.xtx, w, res.weight))
    err_rtn = float(S.output_error(st.xtx, w, np_fake_quant(w, spec)))
    assert err_gptq < err_rtn, (act_order, err_gptq, err_rtn)


def test_hand_worked_case():
  # Tensor grid from max|w| = 0.7 at 4 bits: scale 0.1. Row 0: 0.26 -> 0.3, error -0.04.
  # Rows 0 and 1 are correlated (H01 = 0.9): row 1 absorbs -[H⁻¹]10/[H⁻¹]00 · (-0.04)
  # = 0.9 · -0.04, so 0.16 -> 0.124 -> 0.1 (RTN gives 0.2). Row 2 is independent.
  w = np.array([[0.26], [0.16], [0.7]], np.float32)
  h = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  res = G.gptq(w, h, jq.QuantSpec(bits=4, granularity="tensor"), percdamp=0.0)
  np.testing.assert_allclose(np.asarray(res.weight)[:, 0], [0.3, 0.1, 0.7], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(res.qtensor.values)[:, 0], [3, 1, 7])
  # Layer error eᵀHe: GPTQ's (-0.04, 0.06, 0) gives 0.00088; RTN's (-0.04, -0.04, 0) 0.00608.
  e = w[:, 0] - np.asarray(res.weight)[:, 0]
  np.testing.assert_allclose(e @ h @ e, 0.00088, rtol=1e-3)


def test_act_order_processes_rows_by_decreasing_hessian_diagonal():
  # The first row processed is the one no compensation reaches: it is plain rounding
  # (RTN) on the channel grid. Under act_order that is the largest diag H (row 7 here),
  # in natural order row 0. (The full order is checked against numpy above.)
  rng = np.random.default_rng(3)
  x = correlated_inputs(rng, SAMPLES, K)
  x[:, 7] *= 10.0  # the largest diag H: processed first under act_order
  w = rng.normal(size=(K, N)).astype(np.float32)
  spec = jq.QuantSpec(bits=4)
  res = G.gptq(w, S.hessian(S.from_inputs(x)), spec, act_order=True)
  rtn_row7 = np_fake_quant(w, spec)[7]
  np.testing.assert_allclose(np.asarray(res.weight)[7], rtn_row7, rtol=1e-5, atol=1e-6)
  plain = G.gptq(w, S.hessian(S.from_inputs(x)), spec, act_order=False)
  np.testing.assert_allclose(np.asarray(plain.weight)[0], np_fake_quant(w, spec)[0],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(res.weight), np.asarray(plain.weight))


def test_not_positive_definite_gets_more_damping_and_a_warning():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(K, N)).astype(np.float32)
  h = np.eye(K, dtype=np.float32)
  h[3, 3] = -5.0  # indefinite: 1% damping cannot fix it
  with pytest.warns(UserWarning, match="not positive definite"):
    res = G.gptq(w, h, jq.QuantSpec(bits=4))
  assert np.all(np.isfinite(np.asarray(res.weight)))
  assert res.damp > 5.0
  # Rank-deficient XᵀX (fewer samples than inputs) with no damping: same fallback.
  x = rng.normal(size=(4, K)).astype(np.float32)
  with pytest.warns(UserWarning, match="not positive definite"):
    res = G.gptq(w, S.hessian(S.from_inputs(x)), jq.QuantSpec(bits=4), percdamp=0.0)
  assert np.all(np.isfinite(np.asarray(res.weight)))


def test_a_damping_retry_reruns_the_compiled_core_and_matches_that_damping_directly():
  rng = np.random.default_rng(7)
  k, n = 24, 5  # a shape no other test compiles the core for
  w = rng.normal(size=(k, n)).astype(np.float32)
  q_mat, _ = np.linalg.qr(rng.normal(size=(k, k)))
  d = rng.uniform(0.5, 2.0, size=k)
  d[0] = -1e-3  # indefinite: no damping fails, 1% of mean diag H (> 1e-3) factors
  h = ((q_mat * d) @ q_mat.T).astype(np.float32)
  spec = jq.QuantSpec(bits=4, granularity="group", group_size=8)
  before = G._core._cache_size()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = G.gptq(w, h, spec, percdamp=0.0)
  retries = [c for c in caught if "not positive definite" in str(c.message)]
  assert len(retries) == 1, [str(c.message) for c in caught]
  assert G._core._cache_size() - before <= 1  # the retry ran the program compiled for λ = 0
  assert res.damp == pytest.approx(0.01 * float(np.mean(np.diag(h))), rel=1e-6)
  codes, scale, zp, weight, _, ok = G._core(w, h, np.float32(res.damp), spec, False)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(res.qtensor.values), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(res.qtensor.scale), np.asarray(scale))
  np.testing.assert_array_equal(np.asarray(res.qtensor.zero_point), np.asarray(zp))
  np.testing.assert_array_equal(np.asarray(res.weight), np.asarray(weight))


def test_positive_definite_hessian_does_not_warn():
  x, w = _layer(5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    G.gptq(w, S.hessian(S.from_inputs(x)), jq.QuantSpec(bits=4))


def test_bad_arguments_name_the_field():
  x, w = _layer(6)
  h = S.hessian(S.from_inputs(x))
  with pytest.raises(ValueError, match="format"):
    G.gptq(w, h, jq.QuantSpec(format="binary"))
  with pytest.raises(ValueError, match="rounding"):
    G.gptq(w, h, jq.QuantSpec(bits=4, rounding="stochastic"))
  with pytest.raises(ValueError, match="group_size=12"):
    G.gptq(w, h, jq.QuantSpec(bits=4, granularity="group", group_size=12))
  with pytest.raises(ValueError, match="h \\(4, 4\\)"):
    G.gptq(w, np.eye(4), jq.QuantSpec(bits=4))
  with pytest.raises(ValueError, match="NaN"):
    G.gptq(w, np.full((K, K), np.nan), jq.QuantSpec(bits=4))
