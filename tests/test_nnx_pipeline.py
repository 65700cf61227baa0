"""An NNX model goes through the pipeline's steps as a Linen one does, each step checked
against the same model written in Linen with the same weights (the reference): a CNN
shaped like the flax NNX MNIST example (two nnx.Conv, avg_pool, two nnx.Linear)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.qtensor import QTensor
from tests.test_third_party import NNXCNN, assert_same_forward
from tests.test_transform import qinit


class LinenCNN(nn.Module):
  """NNXCNN in Linen: the same layer names and parameter shapes."""

  @nn.compact
  def __call__(self, x):
    pool = functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2))
    x = pool(nn.relu(nn.Conv(4, (3, 3), name="conv1")(x)))
    x = pool(nn.relu(nn.Conv(8, (3, 3), name="conv2")(x)))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10, name="linear2")(nn.relu(nn.Dense(16, name="linear1")(x)))


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


X = _normal((4, 8, 8, 1), 0)
BATCHES = [_normal((4, 8, 8, 1), s) for s in (1, 2)]
PARAMS = jax.tree.map(lambda p: p + 0.05, LinenCNN().init(jax.random.key(0), X)["params"])

W4 = jq.QuantSpec(bits=4)
A8S = jq.QuantSpec(bits=8, granularity="tensor", symmetric=False, static=True)
STATIC = [jq.Rule("conv1|linear2", weight=jq.QuantSpec(bits=8), act=A8S),
          jq.Rule(".*", weight=W4, act=A8S)]


def nnx_cnn(rules):
  """A quantized NNXCNN holding PARAMS (built abstractly: no PRNG init to compile)."""
  graphdef, st = nnx.split(nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(st, PARAMS)
  return jq.quantize_model(nnx.merge(graphdef, st), rules)


def linen_cnn(rules):
  qmodel = jq.quantize_model(LinenCNN(), rules)
  return qmodel, qinit(qmodel, PARAMS, X)


def _pure(tree):
  return jax.tree.map(np.asarray, tree)


def test_nnx_qat_step_matches_linen():
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=4, ste="lsq"),
                   act=jq.QuantSpec(bits=8, granularity="tensor"))]
  model = nnx_cnn(rules)
  qmodel, lv = linen_cnn(rules)
  for layer in ("conv1", "conv2", "linear1", "linear2"):  # the same starting step sizes
    lv["quant"][layer]["weight_lsq"] = getattr(model, layer).weight_lsq[...]
  target = _normal((4, 10), 5)
  optimizer = nnx.Optimizer(model, __import__("optax").sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss, grads

  loss, grads = step(model, optimizer, X)
  trainable = {k: lv[k] for k in ("params", "quant")}
  lloss, lgrads = jax.jit(jax.value_and_grad(
      lambda t: jnp.mean((qmodel.apply({**lv, **t}, X) - target) ** 2)))(trainable)
  np.testing.assert_allclose(loss, lloss, rtol=1e-6)
  g = nnx.to_pure_dict(grads)
  np.testing.assert_allclose(g["conv2"]["kernel"], lgrads["params"]["conv2"]["kernel"],
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g["linear1"]["weight_lsq"], lgrads["quant"]["linear1"]["weight_lsq"],
                             rtol=1e-4, atol=1e-8)
  # The optimizer moved the kernel by -lr * grad.
  np.testing.assert_allclose(model.conv2.kernel[...],
                             PARAMS["conv2"]["kernel"] - 0.1 * g["conv2"]["kernel"], atol=1e-6)


def test_nnx_calibrate_gives_linen_static_ranges():
  model = nnx_cnn(STATIC)
  with pytest.raises(ValueError, match="static=True but no calibrated range"):
    model(X)
  calibrated = jq.calibrate(model, nnx.state(model), BATCHES)
  assert isinstance(calibrated, nnx.State)
  qmodel, lv = linen_cnn(STATIC)
  lv = jq.calibrate(qmodel, lv, BATCHES)
  stats = nnx.to_pure_dict(calibrated.filter(jq.nnx_transform.QuantStat))
  for layer in ("conv1", "conv2", "linear1", "linear2"):
    for key in ("act_lo", "act_hi"):
      np.testing.assert_array_equal(stats[layer][key], lv["quant_stats"][layer][key])
  # The first layer's range is the batches' input range, up to one step of its grid (the
  # asymmetric grid puts 0.0 on a code): an independent check of the statistic.
  lo, hi = min(float(b.min()) for b in BATCHES), max(float(b.max()) for b in BATCHES)
  step = (hi - lo) / 255
  assert abs(float(stats["conv1"]["act_hi"]) - hi) <= step
  assert abs(float(stats["conv1"]["act_lo"]) - lo) <= step
  nnx.update(model, calibrated)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(model, X),
                                jax.jit(qmodel.apply)(lv, X))


def test_nnx_convert_serves_the_qat_forward_on_linen_codes():
  model = nnx_cnn(STATIC)
  nnx.update(model, jq.calibrate(model, nnx.state(model), BATCHES))
  serving, serving_state = jq.convert(model, nnx.state(model))
  assert isinstance(serving, nnx.Module) and isinstance(serving_state, nnx.State)
  assert not isinstance(model.conv1.kernel.get_value(), QTensor)  # the QAT model is kept
  kernel = serving.linear1.kernel.get_value()
  assert isinstance(kernel, QTensor) and kernel.spec.bits == 4
  forward = nnx.jit(lambda m, x: m(x))
  assert_same_forward(forward(serving, X), forward(model, X))
  qmodel, lv = linen_cnn(STATIC)
  _, lserving = jq.convert(qmodel, jq.calibrate(qmodel, lv, BATCHES))
  for layer in ("conv1", "conv2", "linear1", "linear2"):
    ours, theirs = getattr(serving, layer).kernel.get_value(), lserving["params"][layer]["kernel"]
    np.testing.assert_array_equal(ours.values, theirs.values)
    np.testing.assert_array_equal(ours.scale, theirs.scale)


def test_nnx_size_report_counts_the_serving_state():
  model = nnx_cnn(STATIC)
  nnx.update(model, jq.calibrate(model, nnx.state(model), BATCHES))
  _, serving_state = jq.convert(model, nnx.state(model))
  report = jq.size_report(serving_state)
  n = int(np.prod(PARAMS["linear1"]["kernel"].shape))
  row = report.layer("linear1/kernel")
  assert row.float_bytes == 4 * n
  assert row.quantized_bytes == n // 2 + 4 * 16  # packed int4 + one float scale per column
  assert report.layer("conv1/kernel").quantized_bytes == 9 * 4 + 4 * 4  # int8 + scales
  assert report.total_float_bytes == sum(4 * p.size for p in jax.tree.leaves(PARAMS))
  assert jq.size_report(nnx.state(model)).total_quantized_bytes == report.total_float_bytes


def test_nnx_compute_report_counts_every_layer():
  model = nnx_cnn(STATIC)
  report = jq.compute_report(model, nnx.state(model), X)
  macs = {"conv1": 4 * 8 * 8 * 4 * 9, "conv2": 4 * 4 * 4 * 8 * 36, "linear1": 4 * 32 * 16,
          "linear2": 4 * 16 * 10}  # closed form: outputs x contracted size
  assert {l.path: l.macs for l in report.layers} == macs
  assert (report.layer("conv1").weight_bits, report.layer("conv2").weight_bits) == (8, 4)
  assert all(l.act_bits == 8 for l in report.layers)


@pytest.mark.parametrize("act", [
    jq.QuantSpec(bits=8, granularity="tensor", ste="lsq"),
    jq.QuantSpec(bits=8, granularity="tensor", symmetric=False, ste="pact")])
def test_nnx_learned_activations_match_linen(act):
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=act)]
  model = nnx_cnn(rules)
  y = model(X)  # the first call creates the learned scales from the data, as Linen's init
  qmodel, lv = linen_cnn(rules)
  key = f"act_{act.learned}"
  for layer in ("conv1", "linear2"):
    np.testing.assert_allclose(getattr(model, layer).__dict__[key][...],
                               lv["quant"][layer][key], rtol=1e-6)
  np.testing.assert_allclose(y, qmodel.apply(lv, X), rtol=1e-5, atol=1e-6)
  g = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))(model))
  lg = jax.jit(jax.grad(lambda q: jnp.sum(qmodel.apply({**lv, "quant": q}, X) ** 2)))(
      lv["quant"])
  for layer in ("conv1", "linear2"):
    assert act.ste == "pact" or np.all(g[layer][key] != 0)  # α at the data's max: no clip
    np.testing.assert_allclose(g[layer][key], lg[layer][key], rtol=1e-3, atol=1e-6)


def test_nnx_to_integer_refuses_and_says_what_to_do():
  model = nnx_cnn(STATIC)
  with pytest.raises(ValueError, match="NNXCNN is an nnx.Module.*jq.convert"):
    jq.to_integer(model, nnx.state(model), BATCHES)
