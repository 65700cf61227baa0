"""PTQ through the rules: `Rule(ptq=jq.PTQ(...))` → `jq.calibrate` collects the layer
statistics → `jq.convert` runs the algorithm and stores its codes (plus, for AWQ and
SmoothQuant, the input scale the layer divides by)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.ptq import gptq as gptq_lib
from jaxquant.ptq import stats as ptq_stats


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="fc0")(x))
    h = h.reshape(h.shape[:-1] + (4, 8))
    return nn.DenseGeneral(6, axis=(-2, -1), name="out")(h)  # two contracting axes


def _data(seed=0, n=256, k=16):
  """Correlated inputs with a few outlier channels (where PTQ algorithms matter)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
  z[:, :2] *= 12.0
  return jnp.asarray(z, jnp.float32)


X = _data()
PARAMS = jax.jit(Mlp().init)(jax.random.key(0), X[:2])["params"]  # jit: one compile at import
W4 = jq.QuantSpec(bits=4, granularity="group", group_size=8)


def _serve(rules, batches=None):
  qmodel = jq.quantize_model(Mlp(), rules)
  variables = jq.calibrate(qmodel, {"params": PARAMS}, batches or [X[:128], X[128:]])
  smodel, svars = jq.convert(qmodel, variables, X[:2])
  return smodel, svars, variables


def _err(smodel, svars):
  y = Mlp().apply({"params": PARAMS}, X)
  return float(jnp.mean((smodel.apply(svars, X) - y) ** 2))


@functools.cache
def _rtn_error():
  """The round-to-nearest W4 model's error, the baseline of GPTQ and AWQ (served once)."""
  return _err(*_serve([jq.Rule(".*", weight=W4)])[:2])


def test_gptq_rule_stores_gptq_codes_and_beats_round_to_nearest():
  rtn = _rtn_error()
  smodel, svars, variables = _serve([jq.Rule(".*", weight=W4, ptq=jq.PTQ(method="gptq"))])
  assert _err(smodel, svars) < 0.8 * rtn
  # The stored codes are GPTQ's on the layer's own statistics (same [K, N] view).
  st = variables["quant_stats"]["fc0"]
  stats = ptq_stats.Stats(st["ptq_xtx"], st["ptq_abs_sum"], st["ptq_abs_max"], st["ptq_count"])
  assert int(stats.count) == X.shape[0]
  direct = gptq_lib.gptq(PARAMS["fc0"]["kernel"], ptq_stats.hessian(stats), W4, act_order=True)
  stored = svars["params"]["fc0"]["kernel"]
  assert isinstance(stored, jq.QTensor) and stored.packed and stored.shape == (16, 32)
  np.testing.assert_array_equal(np.asarray(stored.unpacked().values), np.asarray(direct.qtensor.values))
  np.testing.assert_array_equal(np.asarray(stored.scale), np.asarray(direct.qtensor.scale))
  # The DenseGeneral kernel [4, 8, 6] keeps its layout: 32 inputs in groups of 8.
  assert svars["params"]["out"]["kernel"].scale.shape == (4, 1, 6)
  assert not any(k.startswith("ptq_") for k in svars["quant_stats"]["fc0"])  # stats dropped


def test_awq_rule_divides_the_input_and_is_no_worse_than_round_to_nearest():
  rtn = _rtn_error()
  smodel, svars, _ = _serve([jq.Rule(".*", weight=W4, ptq=jq.PTQ(method="awq"))])
  s = np.asarray(svars["quant_stats"]["fc0"]["input_scale"])
  assert s.shape == (16,) and np.all(s > 0)
  assert _err(smodel, svars) <= rtn * (1 + 1e-6)  # α = 0 (s = 1, RTN) is on the grid
  # The serving layer computes (x / s) · deq(Q(diag(s) W)), checked in numpy.
  q = svars["params"]["fc0"]["kernel"]
  h = np.asarray(X) / s @ np.asarray(q.dequantize()) + np.asarray(PARAMS["fc0"]["bias"])
  y_fc0 = nn.Dense(32).apply({"params": {"kernel": q.dequantize() / s[:, None],
                                         "bias": PARAMS["fc0"]["bias"]}}, X)
  np.testing.assert_allclose(np.asarray(y_fc0), h, rtol=1e-4, atol=1e-4)


def test_smoothquant_w8a8_static_ranges_beat_plain_static_w8a8():
  a8 = jq.QuantSpec(bits=8, granularity="tensor")
  w8 = jq.QuantSpec(bits=8)
  plain = _err(*_serve([jq.Rule("fc0", weight=w8, act=a8)])[:2])
  smodel, svars, variables = _serve([jq.Rule("fc0", weight=w8, act=a8,
                                             ptq=jq.PTQ(method="smoothquant", alpha=0.5))])
  stats = svars["quant_stats"]["fc0"]
  assert "input_scale" in stats and "act_hi" in stats  # static range, of x / s
  s = np.asarray(stats["input_scale"])
  np.testing.assert_allclose(float(stats["act_hi"]), np.max(np.abs(np.asarray(X)) / s), rtol=1e-6)
  assert _err(smodel, svars) < plain


@pytest.mark.parametrize("case", ["no_calibration", "nan", "group"])
def test_bad_calibration_is_a_clear_error_naming_the_layer(case):
  rules = [jq.Rule("fc0", weight=W4, ptq=jq.PTQ())]
  qmodel = jq.quantize_model(Mlp(), rules)
  if case == "no_calibration":
    variables = jax.jit(qmodel.init)(jax.random.key(0), X[:2])
    with pytest.raises(ValueError, match="'fc0'.*jq.calibrate"):
      jq.convert(qmodel, {**variables, "params": PARAMS})
  elif case == "nan":
    bad = X.at[3, 5].set(jnp.nan)
    with pytest.raises(ValueError, match="'fc0'.*NaN/Inf"):
      jq.calibrate(qmodel, {"params": PARAMS}, [bad])
  else:
    rules = [jq.Rule("fc0", weight=jq.QuantSpec(bits=4, granularity="group", group_size=5),
                     ptq=jq.PTQ())]
    qmodel = jq.quantize_model(Mlp(), rules)
    with pytest.raises(ValueError, match="'fc0'.*group_size=5 does not divide its 16"):
      jq.calibrate(qmodel, {"params": PARAMS}, [X])
  with pytest.raises(ValueError, match="empty"):
    jq.calibrate(qmodel, {"params": PARAMS}, [])


def test_ptq_rule_validation():
  with pytest.raises(ValueError, match="method"):
    jq.PTQ(method="obq")
  with pytest.raises(ValueError, match="int weight"):
    jq.Rule("x", act=jq.QuantSpec(bits=8), ptq=jq.PTQ())
  with pytest.raises(ValueError, match="needs an act"):
    jq.Rule("x", weight=jq.QuantSpec(bits=8), ptq=jq.PTQ(method="smoothquant"))


def test_ptq_refuses_statistics_that_do_not_match_the_contraction():
  """A convolution collects statistics per input channel, not per patch: GPTQ on its
  [window · Cin, Cout] kernel would misread them, so it is refused with the layer named."""
  from jaxquant.ptq import layer as ptq_layer  # pylint: disable=import-outside-toplevel
  st = ptq_stats.update(ptq_stats.init(1), jnp.ones((4, 1), jnp.float32))
  kernel = jnp.ones((5, 1, 8), jnp.float32)  # a 1-D conv: window 5, 1 channel in, 8 out
  with pytest.raises(ValueError, match=r"'conv_0'.*5 contracted input features.*have 1"):
    ptq_layer.quantize_layer("conv_0", kernel, jq.QuantSpec(bits=4), jq.PTQ(method="gptq"),
                             jq.make_layout(3, (0, 1)), st._asdict())


def test_a_ptq_method_without_an_implementation_is_refused(monkeypatch):
  """A method added to PTQ_METHODS but not to ptq/layer.py raises, naming it, instead of
  silently running another algorithm."""
  from jaxquant.ptq import layer as ptq_layer  # pylint: disable=import-outside-toplevel
  from jaxquant import spec as spec_module  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(spec_module, "PTQ_METHODS", (*spec_module.PTQ_METHODS, "newmethod"))
  x = jax.random.normal(jax.random.key(0), (16, 8))
  st = ptq_stats.update(ptq_stats.init(8), x)
  kernel = jax.random.normal(jax.random.key(1), (8, 4))
  with pytest.raises(ValueError, match=r"'dense'.*'newmethod' has no implementation"):
    ptq_layer.quantize_layer("dense", kernel, jq.QuantSpec(bits=4),
                             jq.PTQ(method="newmethod"), jq.make_layout(2, (0,)),
                             st._asdict())
