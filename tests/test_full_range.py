"""Full-range symmetric integer codes (`QuantSpec(full_range=True)`): −2^(b−1)..2^(b−1)−1
with scale absmax/(qmax + 1/2), against a numpy closed form, through every path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.ptq import gptq as gptq_lib
from tests.np_reference import np_quant


def _x(seed=0, shape=(64, 48), block=16):
  """Normal data whose largest |x| in every block of `block` rows (and so every column)
  is positive: −absmax, the one value that rounds exactly half-way (to code −2^(b−1) or
  −2^(b−1) + 1, equally close), then never occurs."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  for r in range(0, shape[0], block):
    x[r] = 1.25 * np.max(np.abs(x[r:r + block]), axis=0)
  return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_and_values_match_the_numpy_closed_form(bits):
  spec = jq.QuantSpec(bits=bits, full_range=True)
  x = _x()
  q = jq.quantize(x, spec, reduce_axes=(0,))
  codes = np.asarray(q.values)
  absmax = np.max(np.abs(x), axis=0, keepdims=True)
  scale = absmax / np.float32(2 ** (bits - 1) - 0.5)
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  y = x / scale
  ref = np.clip(np.round(y), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  tie = np.abs(np.abs(y - np.trunc(y)) - 0.5) < 1e-4  # x/scale one ulp either side of k + 1/2
  assert tie.mean() < 0.05
  np.testing.assert_array_equal(codes[~tie], ref[~tie])
  assert np.all(np.abs(codes - ref) <= 1)
  deq = np.asarray(jq.dequantize(q))
  np.testing.assert_allclose(deq[~tie], np_quant(x, spec, (0,))[~tie], rtol=1e-6, atol=1e-7)
  assert codes.min() >= -2 ** (bits - 1) and codes.max() == 2 ** (bits - 1) - 1
  # Every value is within half a step of its code, the column maxima included.
  assert np.all(np.abs(x - codes * scale) <= 0.5 * scale + 1e-6)


def test_four_bits_give_sixteen_codes_and_two_bits_four():
  for bits, want in ((4, list(range(-8, 8))), (2, [-2, -1, 0, 1])):
    # absmax = qmax + 1/2 makes the scale exactly 1: every integer and both ends ±absmax.
    half = 2 ** (bits - 1) - 0.5
    x = np.concatenate([[-half], np.arange(-half + 0.5, half), [half]]).astype(np.float32)[:, None]
    full = np.unique(np.asarray(jq.quantize(x, jq.QuantSpec(bits=bits, full_range=True),
                                            reduce_axes=(0,)).values))
    assert full.tolist() == want
    restricted = np.unique(np.asarray(jq.quantize(x, jq.QuantSpec(bits=bits),
                                                  reduce_axes=(0,)).values))
    assert len(restricted) == 2 ** bits - 1


def test_fake_quant_gradient_and_group_granularity():
  spec = jq.QuantSpec(bits=4, granularity="group", group_size=16, full_range=True,
                      ste="clipped")
  x = jnp.asarray(_x(1))
  y = jq.fake_quant(x, spec, reduce_axes=(0,))
  np.testing.assert_allclose(np.asarray(y), np_quant(x, spec, (0,)), rtol=1e-6, atol=1e-7)
  g = jax.jit(jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, reduce_axes=(0,)))))(x)
  np.testing.assert_array_equal(np.asarray(g), 1.0)  # ±absmax lie inside the clip range


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(24, name="fc")(x)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_dot_packing_and_serving_equal_the_qat_forward(bits):
  w = jq.QuantSpec(bits=bits, granularity="group", group_size=16, full_range=True)
  rule = jq.Rule(".*", weight=w, act=jq.QuantSpec(bits=8, full_range=True))
  x = jnp.asarray(_x(2, (48, 5), block=48).T)  # each row's largest |x| is positive
  model = Net()
  qmodel = jq.quantize_model(model, [rule])
  variables = qmodel.init(jax.random.key(0), x)
  variables["params"]["fc"]["kernel"] = jnp.asarray(_x(4, (48, 24)))
  y_qat = qmodel.apply(variables, x)
  smodel, svars = jq.convert(qmodel, variables)
  stored = svars["params"]["fc"]["kernel"]
  assert stored.packed == (bits == 4)
  np.testing.assert_array_equal(np.asarray(stored.unpacked().values),
                                np.asarray(jq.quantize_weight(
                                    variables["params"]["fc"]["kernel"], w,
                                    jq.make_layout(2, (0,))).values))
  np.testing.assert_allclose(np.asarray(smodel.apply(svars, x)), np.asarray(y_qat),
                             rtol=1e-5, atol=1e-5)
  # The int dot against numpy: per-row activation codes × per-group weight codes.
  kernel = np.asarray(variables["params"]["fc"]["kernel"])
  a = np_quant(np.asarray(x), jq.QuantSpec(bits=8, full_range=True), (1,))
  b = np_quant(kernel, w, (0,))
  np.testing.assert_allclose(np.asarray(y_qat), a @ b + np.asarray(variables["params"]["fc"]["bias"]),
                             rtol=1e-4, atol=1e-4)


def test_gptq_on_the_full_range_grid_beats_round_to_nearest():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(256, 32)) @ rng.normal(size=(32, 32))
  w = rng.normal(size=(32, 16)).astype(np.float32)
  h = jnp.asarray(2 * x.T @ x / len(x), jnp.float32)
  spec = jq.QuantSpec(bits=3, granularity="group", group_size=16, full_range=True)
  res = gptq_lib.gptq(w, h, spec)
  codes = np.asarray(res.qtensor.values)
  assert codes.min() >= -4 and codes.max() <= 3 and codes.min() == -4
  err = lambda w_hat: np.sum((x @ (w - np.asarray(w_hat))) ** 2)
  assert err(res.weight) < err(np_quant(w, spec, (0,)))


def test_full_range_is_validated():
  with pytest.raises(ValueError, match="full_range"):
    jq.QuantSpec(bits=4, symmetric=False, full_range=True)
  with pytest.raises(ValueError, match="full_range"):
    jq.QuantSpec(format="ternary", full_range=True)
