"""`jq.calibrate(..., masks=...)`: padding rows count in no calibration statistic."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


class Seq(nn.Module):
  """[B, T, 6] → fc [B, T, 12] → relu → out over (heads, dh) = (3, 4): two layers whose
  input rows are [B, T] (the second contracts two axes)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(12, name="fc")(x)).reshape(x.shape[:2] + (3, 4))
    return nn.DenseGeneral(5, axis=(-2, -1), name="out")(h)


RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 4, 7, 6)).astype(np.float32)        # 2 batches of [4, 7, 6]
MASKS = (np.arange(7)[None, :] < RNG.integers(2, 7, size=(2, 4, 1))).astype(np.int32)
X_PADDED = np.where(MASKS[..., None] > 0, X, 1e3)              # huge values in padding
X_PADDED[0, 0, -1, 0] = np.nan                                 # and a NaN
W8 = jq.QuantSpec(bits=8)
A8 = jq.QuantSpec(bits=8, granularity="tensor", static=True)
G6 = jq.QuantSpec(bits=4, granularity="group", group_size=6)
RULES = [jq.Rule("fc|out", weight=G6, act=A8, ptq=jq.PTQ(method="gptq"))]
PARAMS = jax.jit(Seq().init)(jax.random.key(0), X[0])["params"]  # jit: one compile at import


def test_masked_statistics_equal_those_of_the_real_rows_alone():
  qmodel = jq.quantize_model(Seq(), RULES)
  got = jq.calibrate(qmodel, {"params": PARAMS}, [jnp.asarray(b) for b in X_PADDED],
                     masks=list(MASKS))["quant_stats"]
  keep = MASKS.reshape(-1) > 0
  rows = X.reshape(-1, 6)[keep]  # the real tokens, numpy
  st = got["fc"]
  np.testing.assert_allclose(np.asarray(st["ptq_xtx"]), rows.T @ rows, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(st["ptq_abs_sum"]), np.abs(rows).sum(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(st["ptq_abs_max"]), np.abs(rows).max(0), rtol=1e-6)
  assert int(st["ptq_count"]) == keep.sum()
  np.testing.assert_allclose(float(st["act_hi"]), np.abs(rows).max(), rtol=1e-6)
  # The second layer's input [B, T, 3, 4]: the mask covers its leading [B, T] axes
  # (only 'out' quantized here, so its input is the float fc's output).
  qmodel = jq.quantize_model(Seq(), [jq.Rule("out", weight=G6, act=A8, ptq=jq.PTQ())])
  got = jq.calibrate(qmodel, {"params": PARAMS}, [jnp.asarray(b) for b in X_PADDED],
                     masks=list(MASKS))["quant_stats"]
  h = np.maximum(rows @ np.asarray(PARAMS["fc"]["kernel"]) + np.asarray(PARAMS["fc"]["bias"]), 0)
  np.testing.assert_allclose(np.asarray(got["out"]["ptq_xtx"]), h.T @ h, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(float(got["out"]["act_hi"]), np.abs(h).max(), rtol=1e-5)
  # Without the mask the padding dominates (and its NaN is refused).
  with pytest.raises(ValueError, match="NaN/Inf"):
    jq.calibrate(qmodel, {"params": PARAMS}, [jnp.asarray(b) for b in X_PADDED])


def test_a_mask_that_does_not_fit_a_layer_is_an_error_naming_it():
  qmodel = jq.quantize_model(Seq(), RULES)
  with pytest.raises(ValueError, match="mask of shape \\(4, 6\\) does not match layer 'fc'"):
    jq.calibrate(qmodel, {"params": PARAMS}, [jnp.asarray(X[0])], masks=[np.ones((4, 6))])
  with pytest.raises(ValueError, match="masks has 1 entries but batches has more"):
    jq.calibrate(qmodel, {"params": PARAMS}, list(X), masks=MASKS[:1])
  with pytest.raises(ValueError, match="more entries than the 1 batches"):
    jq.calibrate(qmodel, {"params": PARAMS}, list(X[:1]), masks=list(MASKS))


def test_a_mask_over_the_batch_axis_alone_broadcasts_over_tokens():
  qmodel = jq.quantize_model(Seq(), RULES)
  keep = np.array([1, 0, 1, 0])
  got = jq.calibrate(qmodel, {"params": PARAMS}, [jnp.asarray(X[0])], masks=[keep])
  rows = X[0][keep > 0].reshape(-1, 6)
  assert int(got["quant_stats"]["fc"]["ptq_count"]) == len(rows)
  np.testing.assert_allclose(np.asarray(got["quant_stats"]["fc"]["ptq_xtx"]), rows.T @ rows,
                             rtol=1e-5, atol=1e-4)


def test_forward_float_collects_the_float_models_activations():
  """fc quantized to 4 bits: with forward='float' the 'out' layer's statistics are those
  of the float fc's output; with the default 'quantized' forward they are not."""
  qmodel = jq.quantize_model(Seq(), RULES)
  batches = [jnp.asarray(b) for b in X]
  keep = MASKS.reshape(-1) > 0
  rows = X.reshape(-1, 6)[keep]
  h = np.maximum(rows @ np.asarray(PARAMS["fc"]["kernel"]) + np.asarray(PARAMS["fc"]["bias"]), 0)
  got = jq.calibrate(qmodel, {"params": PARAMS}, batches, masks=list(MASKS), forward="float")
  np.testing.assert_allclose(np.asarray(got["quant_stats"]["out"]["ptq_xtx"]), h.T @ h,
                             rtol=1e-4, atol=1e-3)
  quant = jq.calibrate(qmodel, {"params": PARAMS}, batches, masks=list(MASKS))
  assert not np.allclose(np.asarray(quant["quant_stats"]["out"]["ptq_xtx"]), h.T @ h,
                         rtol=1e-3, atol=1e-2)
  with pytest.raises(ValueError, match="forward='fp32'"):
    jq.calibrate(qmodel, {"params": PARAMS}, batches, forward="fp32")
