"""Static vs dynamic activation ranges as an explicit spec choice (`QuantSpec.static`)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

W8 = jq.QuantSpec(bits=8)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="fc")(x)


X = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
BATCHES = [X[:16], X[16:]]


def _setup(act):
  qmodel = jq.quantize_model(Net(), [jq.Rule("fc", weight=W8, act=act)])
  return qmodel, qmodel.init(jax.random.key(0, impl="unsafe_rbg"), X[:2])  # fast compile


def test_static_true_uses_the_calibrated_range_and_matches_the_numpy_grid():
  act = jq.QuantSpec(bits=8, granularity="tensor", static=True)
  qmodel, variables = _setup(act)
  cal = jq.calibrate(qmodel, variables, BATCHES)
  hi = float(cal["quant_stats"]["fc"]["act_hi"])
  np.testing.assert_allclose(hi, np.max(np.abs(np.asarray(X))), rtol=1e-6)
  x = X[:4] * 0.5  # a batch whose own range is half the calibrated one
  y = qmodel.apply(cal, x)
  s = hi / 127.0
  xa = np.clip(np.round(np.asarray(x) / s), -127, 127) * s
  kernel = np.asarray(jq.quantize_weight(variables["params"]["fc"]["kernel"], W8,
                                         jq.make_layout(2, (0,))).dequantize())
  ref = xa @ kernel + np.asarray(variables["params"]["fc"]["bias"])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
  smodel, svars = jq.convert(qmodel, cal)
  np.testing.assert_allclose(np.asarray(smodel.apply(svars, x)), np.asarray(y), rtol=1e-5,
                             atol=1e-5)


def test_static_true_without_calibration_is_a_clear_error_at_convert_and_serving():
  act = jq.QuantSpec(bits=8, granularity="tensor", static=True)
  qmodel, variables = _setup(act)
  with pytest.raises(ValueError, match="'fc'.*static=True.*jq.calibrate"):
    jq.convert(qmodel, variables)
  with pytest.raises(ValueError, match="'fc'.*static=True.*jq.calibrate"):
    qmodel.apply(variables, X)
  qmodel.apply(variables, X, mutable=["quant_stats"])  # training: the batch's own range


def test_static_false_stays_dynamic_after_calibrate():
  act = jq.QuantSpec(bits=8, granularity="tensor", static=False)
  qmodel, variables = _setup(act)
  cal = jq.calibrate(qmodel, variables, BATCHES)
  assert "act_hi" not in cal["quant_stats"]["fc"]
  x = X[:4] * 0.5
  np.testing.assert_array_equal(np.asarray(qmodel.apply(cal, x)),
                                np.asarray(qmodel.apply(variables, x)))
  # The legacy default (None) makes the same per-tensor spec static after calibrate.
  legacy, lvars = _setup(jq.QuantSpec(bits=8, granularity="tensor"))
  lcal = jq.calibrate(legacy, lvars, BATCHES)
  assert "act_hi" in lcal["quant_stats"]["fc"]
  assert not np.array_equal(np.asarray(legacy.apply(lcal, x)), np.asarray(qmodel.apply(cal, x)))


def test_static_per_token_and_static_weights_are_refused():
  with pytest.raises(ValueError, match="static=True needs granularity='tensor'"):
    jq.QuantSpec(bits=8, granularity="channel", static=True)
  with pytest.raises(ValueError, match="static"):
    jq.QuantSpec(bits=8, granularity="tensor", static="yes")
  with pytest.raises(ValueError, match="weight.static"):
    jq.Rule("fc", weight=jq.QuantSpec(bits=8, granularity="tensor", static=True))
  with pytest.raises(ValueError, match="static=True is not allowed with ste='lsq'"):
    jq.QuantSpec(bits=8, granularity="tensor", static=True, ste="lsq")
