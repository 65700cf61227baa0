"""An NNX model goes through the pipeline's steps as a Linen one does, each step checked
against the same model written in Linen with the same weights (the reference): a CNN
shaped like the flax NNX MNIST example (two nnx.Conv, avg_pool, two nnx.Linear)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.qtensor import QTensor
from tests.integer_only.int_helpers import numpy_runtime
from tests.test_third_party import NNXCNN, assert_same_forward
from tests.test_transform import jit, qinit  # jit: XLA backend optimizations off


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
# jit: one compile at import (eager, every op of the init compiled on its own)
PARAMS = jax.tree.map(lambda p: p + 0.05,
                      jax.jit(LinenCNN().init)(jax.random.key(0), X)["params"])

W4 = jq.QuantSpec(bits=4)
A8S = jq.QuantSpec(bits=8, granularity="tensor", symmetric=False, static=True)
STATIC = [jq.Rule("conv1|linear2", weight=jq.QuantSpec(bits=8), act=A8S),
          jq.Rule(".*", weight=W4, act=A8S)]


def nnx_cnn(rules, cls=NNXCNN):
  """A quantized `cls` holding PARAMS (built abstractly: no PRNG init to compile)."""
  graphdef, st = nnx.split(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(st, PARAMS)
  return jq.quantize_model(nnx.merge(graphdef, st), rules)


def linen_cnn(rules):
  qmodel = jq.quantize_model(LinenCNN(), rules)
  return qmodel, qinit(qmodel, PARAMS, X)


@pytest.fixture(scope="module")
def calibrated():
  """STATIC calibrated on BATCHES, once for the module: (the NNX model's calibrated
  state, the Linen reference model, its calibrated variables)."""
  model = nnx_cnn(STATIC)
  state = jq.calibrate(model, nnx.state(model), BATCHES)
  qmodel, lv = linen_cnn(STATIC)
  return state, qmodel, jq.calibrate(qmodel, lv, BATCHES)


def calibrated_nnx_cnn(calibrated):
  """A fresh quantized NNX CNN (STATIC) holding the calibrated state."""
  model = nnx_cnn(STATIC)
  nnx.update(model, calibrated[0])
  return model


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
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss, grads

  loss, grads = step(model, optimizer, X)
  trainable = {k: lv[k] for k in ("params", "quant")}
  lloss, lgrads = jit(jax.value_and_grad(
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


def test_nnx_calibrate_gives_linen_static_ranges(calibrated):
  model = nnx_cnn(STATIC)
  with pytest.raises(ValueError, match="static=True but no calibrated range"):
    model(X)
  calibrated, qmodel, lv = calibrated  # jq.calibrate of each model on BATCHES
  assert isinstance(calibrated, nnx.State)
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


def test_nnx_convert_serves_the_qat_forward_on_linen_codes(calibrated):
  model = calibrated_nnx_cnn(calibrated)
  model.train()  # converted in train mode, the serving model is still in eval mode
  serving, serving_state = jq.convert(model, nnx.state(model))
  model.eval()
  assert serving.linear1.use_running_average
  assert isinstance(serving, nnx.Module) and isinstance(serving_state, nnx.State)
  assert not isinstance(model.conv1.kernel.get_value(), QTensor)  # the QAT model is kept
  kernel = serving.linear1.kernel.get_value()
  assert isinstance(kernel, QTensor) and kernel.spec.bits == 4
  forward = nnx.jit(lambda m, x: m(x))
  assert_same_forward(forward(serving, X), forward(model, X))
  _, qmodel, lv = calibrated
  _, lserving = jq.convert(qmodel, lv)
  for layer in ("conv1", "conv2", "linear1", "linear2"):
    ours, theirs = getattr(serving, layer).kernel.get_value(), lserving["params"][layer]["kernel"]
    np.testing.assert_array_equal(ours.values, theirs.values)
    np.testing.assert_array_equal(ours.scale, theirs.scale)


def test_nnx_size_report_counts_the_serving_state(calibrated):
  model = calibrated_nnx_cnn(calibrated)
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


# LSQ by default; PACT (the same NNX variable creation and gradient path, another
# quantizer formula, which Linen serving checks by default: test_serving_learned.py) slow.
@pytest.mark.parametrize("act", [
    jq.QuantSpec(bits=8, granularity="tensor", ste="lsq"),
    pytest.param(jq.QuantSpec(bits=8, granularity="tensor", symmetric=False, ste="pact"),
                 marks=pytest.mark.slow)])
def test_nnx_learned_activations_match_linen(act):
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=act)]
  model = nnx_cnn(rules)
  y = model(X)  # the first call creates the learned scales from the data, as Linen's init
  qmodel, lv = linen_cnn(rules)
  key = f"act_{act.learned}"
  for layer in ("conv1", "linear2"):
    np.testing.assert_allclose(getattr(model, layer).__dict__[key][...],
                               lv["quant"][layer][key], rtol=1e-6)
  np.testing.assert_allclose(y, jax.jit(qmodel.apply)(lv, X), rtol=1e-5, atol=1e-6)
  g = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))(model))
  # nnx.jit's XLA options: a PACT clip at the data's max is a tie that rounding decides.
  lg = jax.jit(jax.grad(lambda q: jnp.sum(qmodel.apply({**lv, "quant": q}, X) ** 2)))(
      lv["quant"])
  for layer in ("conv1", "linear2"):
    assert act.ste == "pact" or np.all(g[layer][key] != 0)  # α at the data's max: no clip
    np.testing.assert_allclose(g[layer][key], lg[layer][key], rtol=1e-3, atol=1e-6)


def test_nnx_train_mode_updates_the_ema_observers_as_linen_does():
  a8 = jq.QuantSpec(bits=8, granularity="tensor", symmetric=False)
  rules = [jq.Rule(".*", weight=W4, act=a8)]
  model = nnx_cnn(rules)
  assert model.conv1.use_running_average  # quantized layers start in eval mode
  model.train()
  y = model(X)  # a plain call updates the observers, as does a jitted gradient step

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

  grads(model, BATCHES[0])
  qmodel, lv = linen_cnn(rules)
  linen_apply = jit(functools.partial(qmodel.apply, mutable=["quant_stats"]))
  ly, upd = linen_apply(lv, X)
  _, upd = linen_apply({**lv, **upd}, BATCHES[0])
  ema = lambda: nnx.to_pure_dict(nnx.state(model, jq.nnx_transform.QuantStat))
  stats = ema()
  for layer in ("conv1", "conv2", "linear1", "linear2"):
    assert int(stats[layer]["ema_count"]) == 2
    for key in ("ema_lo", "ema_hi"):
      np.testing.assert_allclose(stats[layer][key], upd["quant_stats"][layer][key], rtol=1e-5,
                                 atol=1e-6)
  np.testing.assert_allclose(y, ly, rtol=1e-5, atol=1e-5)
  # The first layer's EMA against its closed form: the inputs' ranges, decay 0.99 (each
  # batch range is its grid's, within one step of the data's min / max).
  for key, fn in (("ema_lo", np.min), ("ema_hi", np.max)):
    want = 0.99 * fn(X) + 0.01 * fn(BATCHES[0])
    step = (np.max(X) - np.min(X)) / 255
    assert abs(float(stats["conv1"][key]) - want) <= step
  model.eval()
  model(X)  # eval mode: no update
  np.testing.assert_array_equal(ema()["conv1"]["ema_lo"], stats["conv1"]["ema_lo"])
  assert int(ema()["conv1"]["ema_count"]) == 2


class NNXStridedCNN(nnx.Module):
  """NNXCNN with each avg_pool replaced by a stride-2 convolution: one rounding between
  layers, as in QAT, so the integer program follows QAT to half an output step; the
  same layer names and parameter shapes."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.linear1 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(nnx.relu(self.linear1(x)))


class LinenStridedCNN(nn.Module):
  """NNXStridedCNN in Linen."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10, name="linear2")(nn.relu(nn.Dense(16, name="linear1")(x)))


def assert_same_program(ours, theirs):
  """Two integer programs are the same: ops, grids and every integer array."""
  assert ours.graph.ops == theirs.graph.ops
  assert ours.graph.input == theirs.graph.input and ours.graph.output == theirs.graph.output
  assert sorted(ours.graph.arrays) == sorted(theirs.graph.arrays)
  for name, value in ours.graph.arrays.items():
    np.testing.assert_array_equal(value, theirs.graph.arrays[name], err_msg=name)


def test_nnx_to_integer_is_the_linen_program_and_matches_qat(tmp_path):
  rules = [jq.Rule("conv1|linear2", weight=jq.QuantSpec(bits=8), act=A8S),
           jq.Rule(".*", weight=jq.QuantSpec(bits=4, ste="lsq"), act=A8S)]
  model = nnx_cnn(rules, NNXStridedCNN)
  nnx.update(model, jq.calibrate(model, nnx.state(model), BATCHES))
  lsq_before = model.linear1.weight_lsq[...]
  # One QAT step (SGD on kernels, biases and LSQ steps), then the integer program.
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, labels):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(x), labels).mean())(model)
    optimizer.update(model, grads)

  step(model, optimizer, X, jnp.arange(4))
  assert not np.array_equal(model.linear1.weight_lsq[...], lsq_before)
  program = jq.to_integer(model, nnx.state(model), BATCHES)
  # The Linen model holding the same values (its variables read off the NNX state by
  # variable type) gives the same program.
  st = nnx.state(model)
  lsq = nnx.to_pure_dict(st.filter(jq.nnx_transform.QuantParam))
  params = nnx.to_pure_dict(st.filter(nnx.Param))
  lv = {"params": {k: {n: v for n, v in d.items() if n not in lsq.get(k, {})}
                   for k, d in params.items()},
        "quant": lsq, "quant_stats": nnx.to_pure_dict(st.filter(jq.nnx_transform.QuantStat))}
  assert_same_program(program, jq.to_integer(jq.quantize_model(LinenStridedCNN(), rules), lv,
                                             BATCHES))
  # It agrees with the NNX QAT forward: every activation code is QAT's (the calibrated
  # grids), so only the int32 logits' rounding (half a step) and float32 noise remain.
  x = jnp.concatenate([X] + BATCHES)
  qat = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - qat).max() <= program.output_scale + 1e-5 * np.abs(qat).max()
  np.testing.assert_array_equal(got.argmax(-1), qat.argmax(-1))
  # The numpy runtime runs the saved program bit for bit, saturated inputs included.
  runtime = numpy_runtime()
  edges = np.concatenate([np.asarray(x), 1e3 * np.asarray(x[:2])])
  program.save(str(tmp_path))
  codes = np.asarray(program.quantize_input(edges))
  np.testing.assert_array_equal(runtime.quantize_input(runtime.load(str(tmp_path)), edges),
                                codes)
  np.testing.assert_array_equal(runtime.run(runtime.load(str(tmp_path)), codes),
                                np.asarray(program.run(codes)))
  assert np.any(codes == program.graph.input["qmax"])


def test_nnx_to_integer_lowers_the_flax_example_cnn_with_its_pools(calibrated, tmp_path):
  """The flax example's CNN itself (avg_pool included) lowers: the same program as the
  Linen CNN's, run bit for bit by the numpy runtime. Its pools put one more rounding
  between each conv and the next layer than QAT has (the conv's output gets a grid of
  its own before the window sum), so it follows QAT within a few of those steps only."""
  model = calibrated_nnx_cnn(calibrated)
  program = jq.to_integer(model, nnx.state(model), BATCHES)
  _, qmodel, lv = calibrated
  assert_same_program(program, jq.to_integer(qmodel, lv, BATCHES))
  x = jnp.concatenate([X] + BATCHES)
  qat = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - qat).max() <= 0.02 * np.abs(qat).max()
  np.testing.assert_array_equal(got.argmax(-1), qat.argmax(-1))
  runtime = numpy_runtime()
  program.save(str(tmp_path))
  codes = np.asarray(program.quantize_input(np.asarray(x)))
  np.testing.assert_array_equal(runtime.run(runtime.load(str(tmp_path)), codes),
                                np.asarray(program.run(codes)))


class _GELUBlock(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return nnx.gelu(self.fc(x))


class _NetWithGELU(nnx.Module):
  def __init__(self, rngs):
    self.blk = _GELUBlock(rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.blk(x))


def test_nnx_to_integer_names_the_submodule_of_an_unsupported_op():
  model = _NetWithGELU(nnx.Rngs(0))
  with pytest.raises(jq.IntegerOnlyError, match=r"_NetWithGELU cannot run.*\n  - layer 'blk': "
                     r".*GELU"):
    jq.to_integer(model, nnx.state(model), [np.ones((2, 8), np.float32)])


class NNXConvBN(nnx.Module):
  """tests/integer_only/test_program.ConvBN in NNX (its BatchNorm built in train mode, as
  NNX makes it: jq.to_integer traces the model in eval mode)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 6, (3,), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.minimum(nnx.relu(self.bn(self.conv(x[:, :, None]))), 6.0)
    return self.head(jnp.mean(h, axis=1))


class NNXLNMLP(nnx.Module):
  """tests/integer_only/test_program.LNMLP in NNX."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(20, 16, rngs=rngs)
    self.ln = nnx.LayerNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.ln(self.fc(x))))


@pytest.mark.parametrize("cls", [NNXConvBN, NNXLNMLP], ids=["batchnorm", "layernorm"])
def test_nnx_float_model_gives_the_linen_program(cls):
  from tests.integer_only.test_program import ConvBN, LNMLP  # pylint: disable=import-outside-toplevel
  linen = {NNXConvBN: ConvBN, NNXLNMLP: LNMLP}[cls]()
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 20)).astype(np.float32)
  variables = jax.tree.map(np.asarray, dict(jax.jit(linen.init)(
      jax.random.key(1, impl="unsafe_rbg"), x)))  # a fast-compiling PRNG
  for leaves in variables["params"].values():  # non-trivial γ, β, biases
    for name in leaves:
      leaves[name] = leaves[name] + rng.normal(size=leaves[name].shape).astype(np.float32) / 4
  if "batch_stats" in variables:
    variables["batch_stats"]["bn"] = {"mean": rng.normal(size=6).astype(np.float32),
                                      "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}
  graphdef, st = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  pure = variables["params"]
  if "batch_stats" in variables:
    pure = {**pure, "bn": {**pure["bn"], **variables["batch_stats"]["bn"]}}
  nnx.replace_by_pure_dict(st, pure)
  model = nnx.merge(graphdef, st)
  program = jq.to_integer(model, nnx.state(model), [x])  # a float model: W8A8, calibrated
  assert_same_program(program, jq.to_integer(linen, variables, [x]))
  ops = [op["op"] for op in program.graph.ops]
  assert ("norm" in ops) == (cls is NNXLNMLP)  # BatchNorm folds into the conv
  model.eval()
  want = np.asarray(linen.apply(variables, x))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), want, rtol=1e-5, atol=1e-5)
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
