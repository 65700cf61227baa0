"""AWQ, SmoothQuant, the folds and the statistics against numpy written from the papers."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import numerics
from jaxquant.ptq import awq, fold, smoothquant, stats
from tests.ptq.ptq_reference import correlated_inputs, np_fake_quant

K, N, SAMPLES = 32, 16, 256
W4 = jq.QuantSpec(bits=4)
W4G = jq.QuantSpec(bits=4, granularity="group", group_size=8)


def _data(seed, outliers=3):
  rng = np.random.default_rng(seed)
  x = correlated_inputs(rng, SAMPLES, K, outliers=outliers)
  w = (rng.normal(size=(K, N)) * 0.1).astype(np.float32)
  return x, w


def np_awq(x, w, spec, grid):
  """AWQ's search evaluated on X itself: ||XW − (X/s) Q(sW)||² for α on the grid."""
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  s_x = np.mean(np.abs(x64), axis=0)
  errors = []
  for alpha in np.linspace(0, 1, grid + 1):
    s = np.maximum(s_x ** alpha, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    y_hat = (x64 / s) @ np_fake_quant(w64 * s[:, None], spec)
    errors.append(np.sum((x64 @ w64 - y_hat) ** 2))
  return np.asarray(errors)


@pytest.mark.parametrize("spec", [W4, W4G], ids=["channel", "group"])
def test_awq_errors_match_numpy_on_the_inputs(spec):
  x, w = _data(0)
  st = stats.from_inputs(x)
  res = awq.awq_search(w, st.xtx, stats.mean_abs(st), spec, grid=10)
  ref = np_awq(x, w, spec, grid=10)
  np.testing.assert_allclose(np.asarray(res.errors), ref, rtol=2e-3)
  assert res.alpha == pytest.approx(np.argmin(ref) / 10)
  # α = 0 is round-to-nearest; the search can only improve on it, and with outlier
  # channels (the paper's premise) it does.
  assert res.errors[0] == pytest.approx(np.sum((x @ w - x @ np_fake_quant(w, spec)) ** 2), rel=2e-3)
  assert float(np.min(res.errors)) < 0.9 * float(res.errors[0])


def test_awq_result_is_consistent():
  x, w = _data(1)
  st = stats.from_inputs(x)
  res = awq.awq_search(w, st.xtx, stats.mean_abs(st), W4G)
  s = np.asarray(res.scale)
  assert s.shape == (K,) and np.all(s > 0)
  np.testing.assert_allclose(np.sqrt(s.max() * s.min()), 1.0, rtol=1e-5)  # normalized
  # The codes are the spec's RTN of diag(s) W, and weight = their dequantization / s.
  ref = jq.quantize(jnp.asarray(w) * jnp.asarray(s)[:, None], W4G, reduce_axes=(0,))
  np.testing.assert_array_equal(np.asarray(res.qtensor.values), np.asarray(ref.values))
  np.testing.assert_allclose(np.asarray(res.weight),
                             np.asarray(ref.dequantize()) / s[:, None], rtol=1e-6)
  err = float(stats.output_error(st.xtx, w, res.weight))
  assert err == pytest.approx(float(np.min(res.errors)), rel=1e-4)


@pytest.mark.parametrize("spec", [jq.QuantSpec(bits=3), jq.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=8)],
                         ids=["channel_sym", "group_asym"])
def test_clip_search_matches_numpy(spec):
  x, w = _data(6)
  st = stats.from_inputs(x)
  q, w_hat, ratio = awq.clip_search(w, st.xtx, spec, grid=10, max_shrink=0.5)
  ref = jq.quantize(jnp.asarray(w), spec, reduce_axes=(0,))  # the unclipped grid
  assert q.scale.shape == ref.scale.shape and ratio.shape == ref.scale.shape
  gs = K if spec.granularity == "channel" else spec.group_size
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  s0 = np.asarray(ref.scale, np.float64)
  z0 = None if ref.zero_point is None else np.asarray(ref.zero_point, np.float64)
  qmin, qmax = (-3, 3) if spec.symmetric else (-4, 3)
  for g in range(K // gs):
    rows = slice(g * gs, (g + 1) * gs)
    for n in range(N):
      best_err, best_r = None, None
      for r in 1.0 - np.arange(5) / 10:  # 1.0 .. 0.6
        sc, zp = s0[g, n] * r, (0.0 if z0 is None else z0[g, n])
        deq = (np.clip(np.round(w64[rows, n] / sc + zp), qmin, qmax) - zp) * sc
        err = np.sum((x64[:, rows] @ (w64[rows, n] - deq)) ** 2)
        if best_err is None or err < best_err * (1 - 1e-4):
          best_err, best_r = err, r
      assert float(ratio[g, n]) == pytest.approx(best_r), (g, n)
  # Clipping only ever lowers each entry's own error, so the layer error drops too here.
  err_clip = float(stats.output_error(st.xtx, w, w_hat))
  err_rtn = float(stats.output_error(st.xtx, w, ref.dequantize()))
  assert err_clip < err_rtn
  # The codes are on q's own grid: re-encoding the dequantized weight gives them back.
  codes = numerics.encode(w_hat, q.scale, q.zero_point, spec, None)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.values, np.float32))


def test_awq_scales_skip_dead_channels():
  a = jnp.asarray([0.0, 1.0, 4.0, 0.0])
  s = np.asarray(awq.scales_for(a, 1.0))
  np.testing.assert_allclose(s, [1.0, 0.5, 2.0, 1.0], rtol=1e-6)  # 1 and 4 over sqrt(4)
  np.testing.assert_allclose(np.asarray(awq.scales_for(a, 0.0)), 1.0)


def test_smoothquant_closed_form():
  x, w = _data(2)
  a = np.max(np.abs(x), axis=0)
  wmax = np.max(np.abs(w), axis=1)
  for alpha in (0.0, 0.5, 0.8, 1.0):
    s = np.asarray(smoothquant.smoothquant_scales(jnp.asarray(a), w, alpha))
    np.testing.assert_allclose(s, a ** alpha / wmax ** (1 - alpha), rtol=1e-5)
  s = np.asarray(smoothquant.smoothquant_scales(jnp.asarray(a), w, 0.5))
  x_max, w_s = smoothquant.smooth(a, w, s)
  # α = 0.5 balances the two ranges: both become sqrt(max|X_j| · max|W_j|).
  np.testing.assert_allclose(np.asarray(x_max), np.sqrt(a * wmax), rtol=1e-5)
  np.testing.assert_allclose(np.max(np.abs(np.asarray(w_s)), axis=1), np.sqrt(a * wmax), rtol=1e-5)
  # The product is unchanged.
  np.testing.assert_allclose((x / s) @ np.asarray(w_s), x @ w, rtol=1e-4, atol=1e-4)


def test_smoothquant_helps_w8a8_with_outlier_channels():
  x, w = _data(3, outliers=2)
  a = np.max(np.abs(x), axis=0)
  act = jq.QuantSpec(bits=8, granularity="tensor")

  def w8a8_error(s):
    xs, ws = x / s, w * s[:, None]
    y = np_fake_quant(xs.T, act).T @ np_fake_quant(ws, jq.QuantSpec(bits=8))
    return np.sum((x @ w - y) ** 2)

  s = np.asarray(smoothquant.smoothquant_scales(jnp.asarray(a), w, 0.5))
  assert w8a8_error(s) < 0.5 * w8a8_error(np.ones(K))


def test_smoothquant_leaves_unseen_channels_alone():
  a = jnp.asarray([0.0, 2.0, 3.0])
  w = jnp.asarray([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(smoothquant.smoothquant_scales(a, w)), [1.0, 2.0, 1.0])
  with pytest.raises(ValueError, match="alpha"):
    smoothquant.smoothquant_scales(a, w, 1.5)


def test_folds_preserve_the_function():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(5, 6)).astype(np.float32)
  s = rng.uniform(0.5, 2.0, size=(6,)).astype(np.float32)
  gamma, beta = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
  ln = lambda v, g, b: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6) * g + b
  g2, b2 = fold.into_layernorm(gamma, beta, s)
  np.testing.assert_allclose(ln(z, np.asarray(g2), np.asarray(b2)), ln(z, gamma, beta) / s, rtol=1e-5, atol=1e-6)
  # A DenseGeneral value kernel [D, H, Dh] followed by out [H, Dh, D]: fold s into the
  # value's columns and diag(s) into out's rows; the composition is unchanged.
  v_k, v_b = rng.normal(size=(6, 2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
  o_k = rng.normal(size=(2, 3, 4)).astype(np.float32)
  v2, vb2 = fold.into_columns(v_k, v_b, s, n_output=2)
  o2 = fold.scale_rows(o_k, s, n_contracting=2)
  ref = np.einsum("bhd,hdo->bo", np.einsum("bk,khd->bhd", z, v_k) + v_b, o_k)
  got = np.einsum("bhd,hdo->bo", np.einsum("bk,khd->bhd", z, np.asarray(v2)) + np.asarray(vb2),
                  np.asarray(o2))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="positive"):
    fold.scale_rows(o_k, -s, n_contracting=2)


def test_stats_accumulate_like_numpy_and_skip_masked_rows():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 4, K)).astype(np.float32)
  mask = rng.integers(0, 2, size=(3, 4))
  x_masked = np.where(mask[..., None] > 0, x, np.nan)  # padding may hold anything
  st = stats.update(stats.update(stats.init(K), x_masked[:2], mask[:2]), x_masked[2:], mask[2:])
  rows = x.reshape(-1, K)[mask.reshape(-1) > 0]
  np.testing.assert_allclose(np.asarray(st.xtx), rows.T @ rows, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.mean_abs(st)), np.abs(rows).mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(st.abs_max), np.abs(rows).max(0), rtol=1e-6)
  assert int(st.count) == rows.shape[0]
  np.testing.assert_allclose(np.asarray(stats.hessian(st)), 2 * rows.T @ rows / rows.shape[0],
                             rtol=1e-5, atol=1e-5)
  w = rng.normal(size=(K, N)).astype(np.float32)
  w_hat = w + rng.normal(size=(K, N)).astype(np.float32) * 0.01
  assert float(stats.output_error(st.xtx, w, w_hat)) == pytest.approx(
      np.sum((rows @ w - rows @ w_hat) ** 2), rel=1e-3)
  with pytest.raises(ValueError, match="count = 0"):
    stats.hessian(stats.init(K))
