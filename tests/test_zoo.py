"""A zoo of Flax layers under one match-all rule: each quantized in QAT (close to float)
and in serving (== the QAT forward), as a model of its own (a top-level layer) and side
by side in one model; ConvTranspose against Flax's own float layer; layers left float
are listed in one warning and counted as float bytes; layers a rule matches that
jaxquant cannot quantize are errors naming them; an Embed under an LSQ act rule."""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.test_transform import jit as _jit  # one-run programs: backend opts off
from tests.test_transform import normal as _normal  # numpy: no jax work at import

W8 = jq.QuantSpec(bits=8)
A8 = jq.QuantSpec(bits=8, granularity="tensor", symmetric=False)
MATCH_ALL = [jq.Rule(".*", weight=W8, act=A8)]


ZOO = {  # name: (layer, input)
    "dense": (nn.Dense(6), _normal((3, 5), 1)),
    "dense_general": (nn.DenseGeneral((2, 3), axis=(-2, -1)), _normal((3, 4, 5), 2)),
    "einsum": (nn.Einsum((5, 2, 3), "bk,knh->bnh"), _normal((3, 5), 3)),
    "conv_grouped": (nn.Conv(8, (3,), feature_group_count=2), _normal((2, 7, 4), 4)),
    "conv_depthwise": (nn.Conv(4, (3, 3), feature_group_count=4), _normal((2, 5, 5, 4), 5)),
    "conv_transpose": (nn.ConvTranspose(4, (3,), strides=(2,)), _normal((2, 5, 3), 6)),
    "attention": (nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8),
                  _normal((2, 3, 8), 7)),
    "embed": (nn.Embed(11, 6), jnp.array([[1, 4, 10], [0, 2, 2]])),
}
KERNELS = {"attention": ("query", "key", "value", "out")}


RBG = jax.random.key(0, impl="unsafe_rbg")  # jitted inits: compiles faster than threefry


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_layer_is_quantized_in_qat_and_serving(name):
  layer, x = ZOO[name]
  qmodel = jq.quantize_model(layer, MATCH_ALL)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every weight matched: no float layer, no unused rule
    variables = _jit(qmodel.init)(RBG, x)
  y_float, y_qat = _jit(lambda v: (layer.apply({"params": v["params"]}, x),
                                   qmodel.apply(v, x)))(variables)
  assert 0 < _rel(y_qat, y_float) < 0.05  # quantized, and close
  calibrated = jq.calibrate(qmodel, variables, [x])
  served_model, served = jq.convert(qmodel, calibrated)
  np.testing.assert_allclose(_jit(served_model.apply)(served, x),
                             _jit(qmodel.apply)(calibrated, x), rtol=1e-5, atol=1e-6)
  report = jq.size_report(served)
  for sub in KERNELS.get(name, ("",)):
    node = served["params"][sub] if sub else served["params"]
    weight = "embedding" if name == "embed" else "kernel"
    assert isinstance(node[weight], jq.QTensor), (name, sub)
    row = report.layer("/".join(p for p in (sub, weight) if p))
    n = int(np.prod(node[weight].shape))
    assert row.float_bytes == 4 * n and n <= row.quantized_bytes < 2 * n  # int8 + scales


@pytest.mark.parametrize("padding, strides, dilation", [
    ("SAME", 2, 1), ("VALID", 3, 1), ("CIRCULAR", 2, 1), (((1, 2),), 2, 1), ("SAME", 1, 2)])
def test_conv_transpose_is_flax_conv_transpose_of_the_quantized_kernel(padding, strides,
                                                                        dilation):
  """Weight-only W8: the QAT forward == Flax's float ConvTranspose run with the
  dequantized kernel (quantize_weight's codes, per output channel)."""
  layer = nn.ConvTranspose(4, (3,), strides=strides, padding=padding,
                           kernel_dilation=dilation)
  x = _normal((2, 5, 3), 8)
  qmodel = jq.quantize_model(layer, [jq.Rule(".*", weight=W8)])
  variables = _jit(qmodel.init)(RBG, x)

  @_jit
  def expected_and_qat(variables):
    kernel = variables["params"]["kernel"]
    deq = jq.dequantize(jq.quantize_weight(kernel, W8, jq.make_layout(3, contracting=(0, 1))))
    return (layer.apply({"params": {**variables["params"], "kernel": deq}}, x),
            qmodel.apply(variables, x))

  expected, y_qat = expected_and_qat(variables)
  np.testing.assert_allclose(y_qat, expected, rtol=1e-5, atol=1e-5)
  _, served = jq.convert(qmodel, variables)
  np.testing.assert_allclose(_jit(qmodel.apply)(served, x), expected, rtol=1e-5, atol=1e-5)


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(11, 4, name="emb")(ids)
    x = nn.Dense(4, name="fc")(x)
    return nn.ConvTranspose(2, (3,), name="up")(x)


def test_unmatched_weight_layers_are_listed_in_one_warning_and_counted_float():
  ids = jnp.array([[1, 4, 10], [0, 2, 2]])
  qmodel = jq.quantize_model(Mixed(), [jq.Rule("fc", weight=W8)])
  with pytest.warns(jq.FloatLayersWarning) as record:
    variables = qmodel.init(jax.random.key(0), ids)
  floats = [r for r in record if issubclass(r.category, jq.FloatLayersWarning)]
  assert len(floats) == 1 and "['emb', 'up']" in str(floats[0].message)
  with pytest.warns(jq.FloatLayersWarning, match=r"\['emb', 'up'\]"):
    _, served = jq.convert(qmodel, variables)
  report = jq.size_report(served)
  assert report.layer("up/kernel").quantized_bytes == report.layer("up/kernel").float_bytes \
      == 3 * 4 * 2 * 4
  assert report.layer("emb/embedding").quantized_bytes == 11 * 4 * 4
  assert report.layer("fc/kernel").quantized_bytes < 4 * 4 * 4


class Local(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.ConvLocal(2, (1,), name="loc")(nn.Dense(3, name="fc")(x))


@pytest.mark.parametrize("model, x, path", [
    (Local(), jnp.ones((2, 4, 3)), "'loc'"),
    (nn.ConvTranspose(2, (3,), transpose_kernel=True), jnp.ones((2, 4, 3)), "''"),
])
def test_a_matched_layer_that_cannot_be_quantized_is_an_error_naming_it(model, x, path):
  qmodel = jq.quantize_model(model, MATCH_ALL)
  with pytest.raises(ValueError, match=f"layer {path}"):
    qmodel.init(jax.random.key(0), x)


class Lookup(nn.Module):
  tied: bool = False

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 6, name="emb")
    x = nn.Dense(6, name="fc")(emb(ids))
    return emb.attend(x) if self.tied else x


def test_embed_lookup_ignores_a_learned_act_spec_and_attend_says_how_to_write_the_rule():
  rules = [jq.Rule(".*", weight=W8, act=jq.QuantSpec(bits=8, granularity="tensor",
                                                      ste="lsq"))]
  ids = jnp.array([[1, 4, 10]])
  qmodel = jq.quantize_model(Lookup(), rules)
  variables = _jit(qmodel.init)(RBG, ids)
  assert "emb" not in variables["quant"] and "fc" in variables["quant"]
  # The lookup is the quantized table's rows: per-row int8 codes (numpy reference).
  table = np.asarray(variables["params"]["emb"]["embedding"])
  scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
  rows = (np.clip(np.round(table / scale), -127, 127) * scale)[np.asarray(ids)]
  _, served = jq.convert(qmodel, variables)
  np.testing.assert_allclose(jq.dequantize(served["params"]["emb"]["embedding"])[np.asarray(ids)],
                             rows, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_jit(qmodel.apply)(served, ids), _jit(qmodel.apply)(variables, ids),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"layer 'emb' .*jq.Rule\('emb'"):
    jq.quantize_model(Lookup(tied=True), rules).init(jax.random.key(0), ids)
