"""fake_quant: stochastic rounding, and every gradient rule against its closed form
(STE, clipped STE, LSQ of Esser et al. 2019, PACT of Choi et al. 2018) computed in numpy,
with central finite differences of the published surrogates; jit / vmap / bfloat16."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

QS = jq.QuantSpec


def rng_x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def grads(spec, x, g, learned=None, key=None, reduce_axes=(0,)):
  """(dx, dlearned) of Σ g·fake_quant(x)."""
  def loss(x, learned):
    out = jq.fake_quant(x, spec, reduce_axes=reduce_axes, key=key, learned=learned)
    return jnp.sum(out.astype(jnp.float32) * g)
  if learned is None:
    return jax.grad(loss)(x, None), None
  return jax.grad(loss, argnums=(0, 1))(x, learned)


# ------------------------------------------------------------------ stochastic rounding

def test_stochastic_rounding_is_unbiased():
  x = rng_x((16, 8), seed=1)
  spec = QS(bits=4, rounding="stochastic", granularity="tensor")
  n = 2000
  keys = jax.random.split(jax.random.key(0), n)
  samples = np.asarray(jax.jit(jax.vmap(
      lambda k: jq.fake_quant(x, spec, reduce_axes=(0,), key=k)))(keys))
  s = np.max(np.abs(x)) / np.float32(7)
  # Each sample is floor or ceil of x on the grid.
  lo, hi = np.floor(x / s) * s, np.ceil(x / s) * s
  assert np.all((np.abs(samples - lo) < 1e-5 * s) | (np.abs(samples - hi) < 1e-5 * s))
  # Mean ≈ x within 5 binomial standard deviations (p = fractional part of x/s).
  p = x / s - np.floor(x / s)
  std = s * np.sqrt(p * (1 - p) / n)
  mean = samples.astype(np.float64).mean(axis=0)  # float32 sums drift by ~1e-4 here
  assert np.all(np.abs(mean - x) <= 5 * std + 1e-5 * s)
  # ... and is much closer to x than round-to-nearest is (it really averages out).
  nearest = np.asarray(jq.fake_quant(x, QS(bits=4, granularity="tensor"), reduce_axes=(0,)))
  assert np.mean(np.abs(mean - x)) < 0.2 * np.mean(np.abs(nearest - x))


def test_stochastic_rounding_keys():
  x = rng_x((64, 32), seed=2)
  spec = QS(bits=3, rounding="stochastic")
  a = jq.fake_quant(x, spec, reduce_axes=(0,), key=jax.random.key(1))
  b = jq.fake_quant(x, spec, reduce_axes=(0,), key=jax.random.key(2))
  a2 = jax.jit(functools.partial(jq.fake_quant, spec=spec, reduce_axes=(0,)))(
      x, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # same key: same draw
  q = jq.quantize(x, spec, reduce_axes=(0,), key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), np.asarray(a))


def test_stochastic_rounding_missing_key_raises():
  x = rng_x((8, 4))
  spec = QS(rounding="stochastic")
  with pytest.raises(ValueError, match="key"):
    jq.fake_quant(x, spec, reduce_axes=(0,))
  with pytest.raises(ValueError, match="key"):
    jq.quantize(x, spec, reduce_axes=(0,))


# ------------------------------------------------------------------ STE rules

@pytest.mark.parametrize("fmt", ["int", "binary", "ternary", "fp8_e4m3", "fp8_e5m2"])
def test_identity_ste_passes_gradient(fmt):
  x = rng_x((64, 32), seed=3) * 3
  g = rng_x((64, 32), seed=4)
  dx, _ = grads(QS(format=fmt, ste="identity", calibration="percentile", percentile=90.0), x, g)
  np.testing.assert_array_equal(np.asarray(dx), g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_ste_int_masks_outside_clip_range(symmetric):
  x = rng_x((64, 32), seed=5) ** 3
  g = rng_x((64, 32), seed=6)
  spec = QS(bits=4, symmetric=symmetric, calibration="percentile", percentile=90.0,
            ste="clipped")
  dx, _ = grads(spec, x, g)
  if symmetric:
    hi = np.percentile(np.abs(x), 90.0, axis=0, keepdims=True)
    inside = np.abs(x) <= hi
  else:  # representable range [(qmin − zp)·s, (qmax − zp)·s] with the integer zero point
    hi = np.maximum(np.percentile(x, 90.0, axis=0, keepdims=True), 0)
    lo = np.minimum(np.percentile(x, 10.0, axis=0, keepdims=True), 0)
    s = (hi - lo) / 15
    zp = np.clip(np.round(-8 - lo / s), -8, 7)
    inside = (x >= (-8 - zp) * s) & (x <= (7 - zp) * s)
  assert 0.05 < 1 - inside.mean() < 0.4  # a real mask
  np.testing.assert_array_equal(np.asarray(dx), np.where(inside, g, 0.0))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_clipped_ste_fp8(fmt):
  x = rng_x((64, 32), seed=7) ** 3
  g = rng_x((64, 32), seed=8)
  dx, _ = grads(QS(format=fmt, calibration="percentile", percentile=95.0, ste="clipped"), x, g)
  inside = np.abs(x) <= np.percentile(np.abs(x), 95.0, axis=0, keepdims=True)
  np.testing.assert_array_equal(np.asarray(dx), np.where(inside, g, 0.0))


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_clipped_ste_binary_ternary_htanh(fmt):
  x = rng_x((64, 32), seed=9) * 1.5
  x[0, 0], x[1, 0] = 1.0, -1.0  # the boundary is inside (|x| <= 1)
  g = rng_x((64, 32), seed=10)
  dx, _ = grads(QS(format=fmt, ste="clipped"), x, g)
  np.testing.assert_array_equal(np.asarray(dx), np.where(np.abs(x) <= 1.0, g, 0.0))


def test_all_zero_input_has_finite_gradients():
  x = np.zeros((64, 32), np.float32)
  g = np.ones((64, 32), np.float32)
  for spec in (QS(ste="clipped"), QS(format="binary", ste="clipped"),
               QS(format="ternary", ste="clipped"), QS(format="fp8_e4m3", ste="clipped")):
    dx, _ = grads(spec, x, g)
    assert np.all(np.isfinite(np.asarray(dx)))
  dx, ds = grads(QS(bits=4, ste="lsq"), x, g, learned=jnp.full((1, 32), 0.1))
  assert np.all(np.isfinite(np.asarray(dx))) and np.all(np.isfinite(np.asarray(ds)))


# ------------------------------------------------------------------ LSQ

def np_lsq_grads(x, s, g, bits, n_per_step, red_axis=0, unsigned=False):
  """Esser et al. 2019, eq. 3: ∂x̂/∂s = round(x/s) − x/s inside, −Q_N / Q_P outside, times
  the gradient scale 1/sqrt(N·Q_P); ∂x̂/∂x = 1 inside, 0 outside. Signed data:
  Q_N = Q_P = 2^(b−1) − 1; unsigned: Q_N = 0, Q_P = 2^b − 1."""
  q_n, q_p = 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1
  if unsigned:
    q_n, q_p = 0, 2 ** bits - 1
  y = x.astype(np.float64) / s
  dyds = np.where(y <= -q_n, -q_n, np.where(y >= q_p, q_p, np.round(y) - y))
  ds = np.sum(g * dyds, axis=red_axis, keepdims=True) / np.sqrt(n_per_step * q_p)
  dx = np.where((y >= -q_n) & (y <= q_p), g, 0.0)
  return dx, ds


def lsq_surrogate(x, s, c, q_n, q_p):
  """s·(clip(x/s) + c) with c = round(clip(x/s)) − clip(x/s) frozen at the base point:
  its exact derivatives are LSQ's STE gradients (before the gradient scale)."""
  return s * (np.clip(x / s, -q_n, q_p) + c)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_forward_and_gradients(bits):
  q = 2 ** (bits - 1) - 1
  x = rng_x((64, 32), seed=11) * 2
  g = rng_x((64, 32), seed=12)
  s = np.random.default_rng(13).uniform(0.5, 1.5, (1, 32)).astype(np.float32) * 2.0 / q
  spec = QS(bits=bits, ste="lsq")
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(s)))
  np.testing.assert_allclose(out, np.clip(np.round(x / s), -q, q) * s, rtol=1e-6, atol=1e-7)
  dx, ds = grads(spec, x, g, learned=jnp.asarray(s))
  ref_dx, ref_ds = np_lsq_grads(x, s.astype(np.float64), g, bits, n_per_step=64)
  y = x / s
  assert np.any(np.abs(y) > q)  # some values are clipped
  np.testing.assert_array_equal(np.asarray(dx), ref_dx)
  assert ds.shape == (1, 32)
  np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=2e-4, atol=1e-6)

  # Central finite differences of the surrogate, in float64.
  x64, s64, g64 = x.astype(np.float64), s.astype(np.float64), g.astype(np.float64)
  yc = np.clip(x64 / s64, -q, q)
  c = np.round(yc) - yc
  h = 1e-6 * s64
  fd_s = np.sum(g64 * (lsq_surrogate(x64, s64 + h, c, q, q) -
                       lsq_surrogate(x64, s64 - h, c, q, q)), axis=0, keepdims=True) / (2 * h)
  np.testing.assert_allclose(np.asarray(ds), fd_s / np.sqrt(64 * q), rtol=2e-4, atol=1e-6)
  hx = 1e-6
  fd_x = g64 * (lsq_surrogate(x64 + hx, s64, c, q, q) - lsq_surrogate(x64 - hx, s64, c, q, q)) / (2 * hx)
  np.testing.assert_allclose(np.asarray(dx), fd_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unsigned_lsq_forward_and_gradients(bits):
  """symmetric=False: Esser's unsigned LSQ, x̂ = s·clip(round(x/s), 0, 2^b − 1), with
  eq. 3's gradients for Q_N = 0, Q_P = 2^b − 1; the codes sit at q_min + round(x/s)."""
  q_p = 2 ** bits - 1
  x = np.abs(rng_x((64, 32), seed=21)) * 2 - 0.3  # mostly >= 0, some below the grid
  g = rng_x((64, 32), seed=22)
  s = np.random.default_rng(23).uniform(0.5, 1.5, (1, 32)).astype(np.float32) * 2.0 / q_p
  spec = QS(bits=bits, ste="lsq", symmetric=False)
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(s)))
  np.testing.assert_allclose(out, np.clip(np.round(x / s), 0, q_p) * s, rtol=1e-6, atol=1e-7)
  y = x / s
  assert np.any(y < 0) and np.any(y > q_p)  # both ends clip
  dx, ds = grads(spec, x, g, learned=jnp.asarray(s))
  ref_dx, ref_ds = np_lsq_grads(x, s.astype(np.float64), g, bits, n_per_step=64,
                                unsigned=True)
  np.testing.assert_array_equal(np.asarray(dx), ref_dx)
  np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=2e-4, atol=1e-6)
  q = jq.quantize(x, spec, reduce_axes=(0,), learned=jnp.asarray(s))
  qmin = -(2 ** (bits - 1))
  np.testing.assert_array_equal(np.asarray(q.zero_point), np.full((1, 32), qmin))
  np.testing.assert_array_equal(np.asarray(q.values),
                                np.clip(np.round(x / s), 0, q_p).astype(np.int64) + qmin)
  # The initial step: 2·mean|x| / sqrt(Q_P) (Esser et al. §2.1, with the unsigned Q_P).
  from jaxquant import numerics
  init = np.asarray(numerics.init_learned(jnp.asarray(x), spec, (0,)))
  np.testing.assert_allclose(init, 2 * np.abs(x).mean(0, keepdims=True) / np.sqrt(q_p),
                             rtol=1e-5)


def test_lsq_without_gradient_scale():
  """lsq_grad_scale=False: the step's gradient is Esser's eq. 3 without 1/sqrt(N·Q_P);
  the input gradient and the forward are unchanged."""
  x = rng_x((64, 32), seed=11) * 2
  g = rng_x((64, 32), seed=12)
  s = np.full((1, 32), 0.3, np.float32)
  dx, ds = grads(QS(bits=4, ste="lsq"), x, g, learned=jnp.asarray(s))
  dx0, ds0 = grads(QS(bits=4, ste="lsq", lsq_grad_scale=False), x, g, learned=jnp.asarray(s))
  np.testing.assert_array_equal(np.asarray(dx0), np.asarray(dx))
  _, ref_ds = np_lsq_grads(x, 0.3, g, 4, n_per_step=64)
  np.testing.assert_allclose(np.asarray(ds0), ref_ds * np.sqrt(64 * 7), rtol=2e-4, atol=1e-5)
  with pytest.raises(ValueError, match="lsq_grad_scale"):
    QS(bits=4, ste="clipped", lsq_grad_scale=False)


def test_lsq_group_steps_and_sign():
  x = rng_x((64, 32), seed=14)
  g = rng_x((64, 32), seed=15)
  s = np.full((4, 32), 0.2, np.float32)  # 4 groups of 16 along axis 0
  spec = QS(bits=4, ste="lsq", granularity="group", group_size=16)
  dx, ds = grads(spec, x, g, learned=jnp.asarray(s))
  assert ds.shape == (4, 32)
  xb, gb = x.reshape(4, 16, 32), g.reshape(4, 16, 32)
  _, ref_ds = np_lsq_grads(xb, 0.2, gb, 4, n_per_step=16, red_axis=1)
  np.testing.assert_allclose(np.asarray(ds), ref_ds[:, 0], rtol=2e-4, atol=1e-6)
  # The step enters as |s|: a negative step gives the same output and a flipped gradient.
  out = jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(s))
  out_neg = jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(-s))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out_neg))
  _, ds_neg = grads(spec, x, g, learned=jnp.asarray(-s))
  np.testing.assert_allclose(np.asarray(ds_neg), -np.asarray(ds), rtol=1e-6)


def test_lsq_without_learned_step_uses_calibration_and_clips():
  x = rng_x((64, 32), seed=16)
  g = rng_x((64, 32), seed=17)
  dx, _ = grads(QS(bits=4, ste="lsq"), x, g)
  np.testing.assert_array_equal(np.asarray(dx), g)  # absmax range: everything inside


# ------------------------------------------------------------------ PACT

def test_pact_forward_and_alpha_gradient():
  bits, q = 4, 7
  x = rng_x((64, 32), seed=18) * 2
  g = rng_x((64, 32), seed=19)
  alpha = np.random.default_rng(20).uniform(1.0, 3.0, (1, 32)).astype(np.float32)
  spec = QS(bits=bits, ste="pact")
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(alpha)))
  s = alpha / np.float32(q)
  np.testing.assert_allclose(out, np.round(np.clip(x, -alpha, alpha) / s) * s, rtol=1e-5,
                             atol=1e-6)
  dx, dalpha = grads(spec, x, g, learned=jnp.asarray(alpha))
  # Choi et al. 2018, eq. 3 (symmetric clip): ∂/∂α = 1 for x ≥ α, −1 for x ≤ −α.
  ref_da = (np.sum(np.where(x >= alpha, g, 0), axis=0, keepdims=True)
            - np.sum(np.where(x <= -alpha, g, 0), axis=0, keepdims=True))
  assert np.all(np.sum(np.abs(x) >= alpha, axis=0) > 0)
  np.testing.assert_allclose(np.asarray(dalpha), ref_da, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(dx), np.where(np.abs(x) < alpha, g, 0.0))
  # Finite differences of the clip PACT differentiates: Σ g·clip(x, −α, α). The quantized
  # output is a step function of α inside the range (its grid is α/q), so FD of
  # fake_quant itself says nothing useful; PACT's STE drops that term by design.
  x64, g64, a64 = x.astype(np.float64), g.astype(np.float64), alpha.astype(np.float64)
  assert np.min(np.abs(np.abs(x64) - a64)) > 1e-4  # no x within h of ±α
  h = 1e-6
  clipped = lambda a: np.sum(g64 * np.clip(x64, -a, a), axis=0, keepdims=True)
  fd = (clipped(a64 + h) - clipped(a64 - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(dalpha), fd, rtol=1e-5, atol=1e-5)


def test_pact_asymmetric_relu_range():
  """symmetric=False: clip to [0, α] on the full 2^b-level grid (zero point q_min);
  dα = Σ g over x ≥ α, dx = g on (0, α)."""
  x = rng_x((64, 32), seed=26) * 2
  g = rng_x((64, 32), seed=27)
  alpha = np.random.default_rng(28).uniform(1.0, 3.0, (1, 32)).astype(np.float32)
  spec = QS(bits=4, ste="pact", symmetric=False)
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,), learned=jnp.asarray(alpha)))
  s = alpha / np.float32(15)
  np.testing.assert_allclose(out, np.round(np.clip(x, 0, alpha) / s) * s, rtol=1e-5, atol=1e-6)
  assert len(np.unique(np.round(out / s))) == 16  # all 2^4 levels in use
  dx, dalpha = grads(spec, x, g, learned=jnp.asarray(alpha))
  np.testing.assert_allclose(np.asarray(dalpha),
                             np.sum(np.where(x >= alpha, g, 0), axis=0, keepdims=True),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(dx), np.where((x > 0) & (x < alpha), g, 0.0))


def test_pact_tensor_alpha_scalar_shape():
  x = rng_x((64, 32), seed=21) * 3
  g = np.ones((64, 32), np.float32)
  spec = QS(bits=8, ste="pact", granularity="tensor")
  _, dalpha = grads(spec, x, g, learned=jnp.full((1, 1), 1.5))
  assert dalpha.shape == (1, 1)
  np.testing.assert_allclose(float(dalpha[0, 0]),
                             np.sum(x >= 1.5) - np.sum(x <= -1.5), rtol=1e-6)


# ------------------------------------------------------------------ jit / vmap / dtypes

@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fake_quant_jit_and_dtypes(use_jit, dtype):
  x = jnp.asarray(rng_x((64, 32), seed=22)).astype(dtype)
  spec = QS(bits=8, ste="clipped")
  f = functools.partial(jq.fake_quant, spec=spec, reduce_axes=(0,))
  f = jax.jit(f) if use_jit else f
  out = f(x)
  assert out.dtype == dtype and out.shape == x.shape
  x32 = np.asarray(x.astype(jnp.float32))
  s = np.max(np.abs(x32), axis=0, keepdims=True) / np.float32(127)
  out32 = np.asarray(out.astype(jnp.float32))
  if dtype == jnp.float32:
    ref = (np.clip(np.round(x32 / s), -127, 127) * s).astype(np.float32)
    np.testing.assert_allclose(out32, ref, rtol=1e-6)
  else:  # bf16 inputs often sit on rounding ties of x/s: check the bound (+ bf16 rounding)
    assert np.all(np.abs(out32 - x32) <= s / 2 * (1 + 1e-5) + 2.0 ** -8 * np.abs(x32))
  dx = (jax.jit(jax.grad(lambda x: jnp.sum(f(x))))) (x) if use_jit else \
      jax.grad(lambda x: jnp.sum(f(x)))(x)
  assert dx.dtype == dtype
  np.testing.assert_array_equal(np.asarray(dx.astype(jnp.float32)), np.ones((64, 32)))


def test_fake_quant_vmap_matches_loop():
  xs = rng_x((3, 16, 8), seed=23)
  spec = QS(bits=4, symmetric=False)
  f = jax.jit(lambda x: jq.fake_quant(x, spec, reduce_axes=(0,)))
  out = np.asarray(jax.jit(jax.vmap(f))(xs))
  for i in range(3):
    np.testing.assert_array_equal(out[i], np.asarray(f(xs[i])))
  # vmap of the gradient with a learned step per example.
  steps = jnp.full((3, 1, 8), 0.3)
  lsq = QS(bits=4, ste="lsq")
  dsteps = jax.jit(jax.vmap(jax.grad(
      lambda x, s: jnp.sum(jq.fake_quant(x, lsq, reduce_axes=(0,), learned=s)),
      argnums=1)))(xs, steps)
  for i in range(3):
    _, ref = np_lsq_grads(xs[i], 0.3, np.ones((16, 8)), 4, n_per_step=16)
    np.testing.assert_allclose(np.asarray(dsteps[i]), ref, rtol=2e-4, atol=1e-6)


def test_nan_gradient_passes_and_output_keeps_nan():
  x = rng_x((8, 4), seed=24)
  x[3, 1] = np.nan
  g = rng_x((8, 4), seed=25)
  out = np.asarray(jq.fake_quant(x, QS(ste="clipped"), reduce_axes=(0,)))
  assert np.isnan(out[3, 1]) and np.sum(np.isnan(out)) == 1
  dx, _ = grads(QS(ste="clipped"), x, g)
  assert np.all(np.isfinite(np.asarray(dx)))


# ------------------------------------------------------------------ BinaryConnect


def test_binary_unscaled_is_plain_sign():
  x = rng_x((64, 32), seed=21)
  out = jq.fake_quant(x, QS(format="binary", scaled=False), reduce_axes=(0,))
  np.testing.assert_array_equal(np.asarray(out), np.where(x < 0, -1.0, 1.0))
  scaled = jq.fake_quant(x, QS(format="binary"), reduce_axes=(0,))  # XNOR: α = mean|x|
  np.testing.assert_allclose(np.asarray(scaled),
                             np.where(x < 0, -1.0, 1.0) * np.abs(x).mean(0), rtol=1e-6)


@pytest.mark.parametrize("scaled", [False, True])
def test_binary_stochastic_is_hard_sigmoid(scaled):
  """Courbariaux et al. 2015, eq. 3: P(+1) = clip((x/α + 1)/2, 0, 1), so the expected
  code is clip(x/α, −1, 1) (unbiased inside [−α, α])."""
  levels = np.linspace(-1.5, 1.5, 13).astype(np.float32)
  n = 20000
  x = np.repeat(levels[None, :], n, axis=0)  # one column per level
  spec = QS(format="binary", rounding="stochastic", scaled=scaled, granularity="tensor")
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0, 1), key=jax.random.key(0)))
  alpha = 1.0 if not scaled else float(np.abs(levels).mean())
  codes = out / alpha
  assert set(np.unique(codes).tolist()) <= {-1.0, 1.0}
  p = np.clip((levels / alpha + 1) / 2, 0, 1)
  sd = np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
  np.testing.assert_array_less(np.abs((codes == 1).mean(0) - p), 5 * sd + 1e-9)
  with pytest.raises(ValueError, match="PRNG key"):
    jq.fake_quant(x, spec, reduce_axes=(0, 1))
