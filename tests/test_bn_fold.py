"""jq.FoldedConvBN / jq.FoldedDenseBN (BatchNorm folded into the layer for QAT, Jacob et
al. 2018 §3.2): float equivalence with Conv / Dense + BatchNorm, gradients, the eval-mode
closed form in numpy, conversion to an integer program, and a tiny training run."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from tests.integer_only.int_helpers import ema_as_static, numpy_runtime, rules
from tests.np_reference import np_quant_keep

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 10, 3)).astype(np.float32)  # [N, W, C]
W8 = jq.DotSpec(rhs=jq.QuantSpec(bits=8), mode="fake")  # weight-only, per channel


class ConvThenBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(5, (3,), use_bias=False, name="conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(y)


def _folded(**kw):
  return jq.FoldedConvBN(5, (3,), momentum=0.9, **kw)


def _random_stats(variables):
  """Non-trivial γ, β and moving statistics (init has γ=1, β=0, μ=0, σ²=1)."""
  p = dict(variables["params"])
  p["scale"] = RNG.uniform(0.5, 2.0, 5).astype(np.float32) * np.array([1, -1, 1, 1, -1],
                                                                         np.float32)
  p["bias"] = RNG.normal(size=5).astype(np.float32)
  stats = {"mean": RNG.normal(size=5).astype(np.float32),
           "var": RNG.uniform(0.2, 3.0, 5).astype(np.float32)}
  return {"params": p, "batch_stats": stats}


def _as_reference(v):
  return {"params": {"conv": {"kernel": v["params"]["kernel"]},
                     "bn": {"scale": v["params"]["scale"], "bias": v["params"]["bias"]}},
          "batch_stats": {"bn": v["batch_stats"]}}


def test_float_equals_conv_then_batchnorm_train_and_eval():
  layer = _folded()
  v = _random_stats(layer.init(jax.random.key(0), X, use_running_average=False))
  rv = _as_reference(v)
  for train in (True, False):
    got, upd = layer.apply(v, X, use_running_average=not train, mutable=["batch_stats"])
    want, rupd = ConvThenBN().apply(rv, X, train, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for k in ("mean", "var"):  # moving averages updated in training, untouched in eval
      np.testing.assert_allclose(upd["batch_stats"][k], rupd["batch_stats"]["bn"][k],
                                 rtol=1e-5, atol=1e-6)
    if not train:
      np.testing.assert_array_equal(upd["batch_stats"]["mean"], v["batch_stats"]["mean"])


def test_gradients_flow_and_match_batchnorm_in_float():
  layer = _folded()
  v = _random_stats(layer.init(jax.random.key(0), X, use_running_average=False))
  t = RNG.normal(size=(8, 10, 5)).astype(np.float32)

  def loss(params, model, variables, stats):
    out, _ = model.apply({"params": params, "batch_stats": stats}, X, mutable=["batch_stats"],
                         **variables)
    return jnp.sum((out - t) ** 2)

  def grad(model, variables):  # jitted: eager dispatch would compile every op on its own
    return jax.jit(jax.grad(lambda p, s: loss(p, model, variables, s)))

  g = grad(layer, {"use_running_average": False})(v["params"], v["batch_stats"])
  rv = _as_reference(v)
  rg = grad(ConvThenBN(), {"train": True})(rv["params"], rv["batch_stats"])
  np.testing.assert_allclose(g["kernel"], rg["conv"]["kernel"], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(g["scale"], rg["bn"]["scale"], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(g["bias"], rg["bn"]["bias"], rtol=1e-3, atol=1e-3)
  # Quantized (W8A8 per channel, int8 dot): every parameter still gets a gradient.
  qlayer = _folded(conv_general_dilated=jq.make_conv(jq.DotSpec(
      lhs=jq.QuantSpec(bits=8), rhs=jq.QuantSpec(bits=8), mode="int")))
  qg = grad(qlayer, {"use_running_average": False})(v["params"], v["batch_stats"])
  for k in ("kernel", "scale", "bias"):
    assert np.all(np.isfinite(qg[k])) and np.abs(qg[k]).sum() > 0, k
    np.testing.assert_allclose(qg[k], g[k], rtol=0.1, atol=0.1 * np.abs(g[k]).max())


def _np_conv1d_same(x_NWC, w_KIO):
  k = w_KIO.shape[0]
  pad = np.pad(x_NWC, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))
  out = np.zeros(x_NWC.shape[:2] + (w_KIO.shape[2],), np.float64)
  for j in range(k):
    out += np.einsum("nwi,io->nwo", pad[:, j:j + x_NWC.shape[1]], w_KIO[j])
  return out


def test_eval_is_quantized_folded_conv_closed_form():
  # Eval and the late-training freeze are the same call (use_running_average=True).
  layer = _folded(conv_general_dilated=jq.make_conv(W8))
  v = _random_stats(layer.init(jax.random.key(1), X, use_running_average=False))
  got, upd = layer.apply(v, X, use_running_average=True, mutable=["batch_stats"])
  p, s = jax.tree.map(np.asarray, (v["params"], v["batch_stats"]))
  inv = p["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
  w_fold = (p["kernel"] * inv).astype(np.float32)  # [K, I, O]
  w_q = np_quant_keep(w_fold, jq.QuantSpec(bits=8), keep_axis=2)
  want = _np_conv1d_same(X.astype(np.float64), w_q.astype(np.float64)) + (
      p["bias"] - s["mean"] * inv)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(w_q, w_fold)  # the weights really were quantized
  np.testing.assert_array_equal(upd["batch_stats"]["var"], s["var"])  # frozen statistics


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jq.FoldedConvBN(6, (3,), name="conv_0")(x, use_running_average=not train)
    x = nn.relu(x)
    x = jq.FoldedDenseBN(8, name="dense_1")(x.reshape(x.shape[0], -1),
                                            use_running_average=not train)
    return nn.Dense(4, name="head")(nn.relu(x))


def _train(x, y, steps=40, lr=1e-2):
  qm = jq.quantize_model(Net(), rules(bits=8))
  key = jax.random.key(0, impl="unsafe_rbg")  # compiles fast
  v = dict(jax.jit(functools.partial(qm.init, train=True))(key, x[:16]))
  tx = optax.adam(lr)
  params, other = v["params"], {k: v[k] for k in v if k != "params"}
  opt = tx.init(params)

  @jax.jit
  def step(params, other, opt, xb, yb):
    def loss(p):
      out, upd = qm.apply({"params": p, **other}, xb, train=True,
                          mutable=["batch_stats", "quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean(), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), {**other, **upd}, opt, l

  losses = []
  for i in range(steps):
    lo = (i * 16) % (x.shape[0] - 16 + 1)
    params, other, opt, l = step(params, other, opt, x[lo:lo + 16], y[lo:lo + 16])
    losses.append(float(l))
  return qm, jax.tree.map(np.asarray, {"params": params, **other}), losses


def _eval(qm, variables, x):
  """qm.apply(variables, x, train=False) under jit (eager would compile op by op)."""
  return jax.jit(functools.partial(qm.apply, train=False))(variables, x)


@pytest.fixture(scope="module")
def trained():
  x = RNG.normal(size=(128, 12, 2)).astype(np.float32)
  y = (x[:, :6, 0].sum(1) > x[:, 6:, 1].sum(1)).astype(np.int32) + 2 * (x[:, :, 0].mean(1) > 0)
  return (x, y) + _train(x, y)


def test_folded_qat_model_learns(trained):
  x, y, qm, v, losses = trained
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
  assert np.any(v["batch_stats"]["conv_0"]["var"] != 1.0)  # moving averages moved
  acc = np.mean(np.asarray(_eval(qm, v, x)).argmax(-1) == y)
  assert acc > 0.5  # 4 balanced-ish classes: chance is about 0.25


def test_to_integer_and_numpy_runtime(trained, tmp_path):
  x, _, qm, v, _ = trained
  v = ema_as_static(v)
  program = jq.to_integer(qm, v, [x[:64], x[64:]], apply_kwargs={"train": False})
  ops = [op["op"] for op in program.graph.ops]
  assert ops.count("conv") == 1 and ops.count("dot") == 2  # BN folded: no norm op
  qat = np.asarray(_eval(qm, v, x))
  got = np.asarray(program(x)) * program.output_scale
  # Same grids as the static-range QAT model: int32-logit rounding and float noise only.
  assert np.abs(got - qat).max() <= program.output_scale + 1e-4 * np.abs(qat).max()
  program.save(str(tmp_path / "prog"))
  nr = numpy_runtime()
  loaded = nr.load(str(tmp_path / "prog"))
  out = nr.run(loaded, nr.quantize_input(loaded, x))
  np.testing.assert_array_equal(out, np.asarray(program(x)))


def test_serving_qtensor_kernel_is_refused(trained):
  # jq.convert stores the unfolded kernel's codes; running on them would be silently wrong.
  x, _, qm, v, _ = trained
  serving_model, serving_vars = jq.convert(qm, v)
  with pytest.raises(ValueError, match="conv_0.*stored QTensor kernel"):
    serving_model.apply(serving_vars, x[:4], train=False)


def test_dense_eval_closed_form_and_train_equals_batchnorm():
  x = RNG.normal(size=(16, 7)).astype(np.float32)
  layer = jq.FoldedDenseBN(5, dot_general=jq.make_dot_general(W8))
  v = _random_stats(layer.init(jax.random.key(2), x, use_running_average=False))
  got = layer.apply(v, x, use_running_average=True)
  p, s = jax.tree.map(np.asarray, (v["params"], v["batch_stats"]))
  inv = p["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
  w_q = np_quant_keep((p["kernel"] * inv).astype(np.float32), jq.QuantSpec(bits=8), 1)
  want = x.astype(np.float64) @ w_q + (p["bias"] - s["mean"] * inv)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Training, float: Dense then BatchNorm over the batch (biased variance).
  got, _ = jq.FoldedDenseBN(5).apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y = x.astype(np.float64) @ p["kernel"]
  want = p["scale"] * (y - y.mean(0)) / np.sqrt(y.var(0) + 1e-5) + p["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
