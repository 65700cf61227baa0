"""Tests for jaxquant.quantize_model (Linen): rules over module paths, numerics against
numpy and the float model, gradients, variable collections, jit / remat / shared /
nested layers, rule validation and the integer jaxpr."""
import functools
import warnings
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxquant as jq
from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant import layout, numerics, transform
from jaxquant.einsum import einsum_compiled

W8 = jq.QuantSpec(bits=8)
W4 = jq.QuantSpec(bits=4)
A8 = jq.QuantSpec(bits=8)
A4 = jq.QuantSpec(bits=4)


# ----------------------------------------------------------------------------- models

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = nn.relu(nn.Dense(32, name=f"fc{i}")(x))
    return nn.Dense(10, name="fc4")(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # [N, 8, 8, 3]
    x = nn.relu(nn.Conv(8, (3, 3), name="conv0")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name="fc")(x))
    return nn.Dense(10, name="head")(x)


class Attention(nn.Module):
  heads: int = 2
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.DenseGeneral, (self.heads, self.head_dim))
    # No key bias: softmax is invariant to it, so its true gradient is zero.
    q, k, v = dense(name="query")(x), dense(name="key", use_bias=False)(x), dense(name="value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim).astype(np.float32)
    o = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits), v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
  """embed (Dense) → LN → attention (DenseGeneral ×4 + attention einsums) → LN → up
  (nn.Einsum) → down (Dense) → head (Dense)."""
  dim: int = 16

  @nn.compact
  def __call__(self, x):  # [B, T, F]
    x = nn.Dense(self.dim, name="embed")(x)
    x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x))
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Einsum((self.dim, 2 * self.dim), "btd,df->btf", name="up")(h))
    x = x + nn.Dense(self.dim, name="down")(h)
    return nn.Dense(6, name="head")(x)


class Net(nn.Module):
  """conv → DenseGeneral → nn.Einsum (two contracting axes) → Dense."""

  @nn.compact
  def __call__(self, x):  # [B, 6, 6, 3]
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = nn.DenseGeneral((2, 8), name="proj")(x)  # [B, T, 2, 8]
    x = nn.Einsum((2, 8, 12), "bthd,hdf->btf", name="mix")(x)
    x = jnp.mean(nn.gelu(x), axis=1)
    return nn.Dense(5, name="head")(x)


def _mixed_rules(first_last, act_only, weight_only, rest):
  """First/last layers 8-bit, one activation-only rule, one weight-only rule, rest 4-bit."""
  return [jq.Rule(first_last, weight=W8, act=A8), jq.Rule(act_only, act=A4),
          jq.Rule(weight_only, weight=W4), jq.Rule(rest, weight=W4, act=A4)]


CASES = {
    "mlp": (MLP(), (6, 12), _mixed_rules("fc0|fc4", "fc2", "fc3", "fc.*")),
    "cnn": (CNN(), (4, 8, 8, 3), _mixed_rules("conv0|head", "conv1", "conv2", ".*")),
    "block": (Block(), (2, 5, 12), _mixed_rules("embed|head", "attn/query", "attn/(key|value)",
                                                 "attn/out|up|down")),
}


def _all_rules(bits):
  s = jq.QuantSpec(bits=bits)
  return [jq.Rule(".*", weight=s, act=s)]


# Tests compile many small programs, each run once: XLA's backend optimizations cost half
# the compile time and buy nothing here (the numerics do not depend on them).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def fill_params(model, *args):
  """Deterministic parameters without compiling a PRNG init (tracing only): kernels
  ~N(0, 1/fan_in), biases ~N(0, 0.1²), norm scales 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]

  def fill(path, sd):
    key = jax.tree_util.keystr(path)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    leaf = path[-1].key
    if leaf == "scale":
      return jnp.ones(sd.shape, sd.dtype)
    std = 0.1 if leaf == "bias" else 1.0 / np.sqrt(np.prod(sd.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, sd.shape), sd.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _setup(name):
  model, shape, _ = CASES[name]
  x = normal(shape, 1)
  return model, x, {"params": fill_params(model, x)}


def qinit(qmodel, params, *args):
  """The variables `qmodel.init` would give with these params: 'quant_stats' as init
  makes them (kernel layouts, observers at zero; a compile that keeps only those
  outputs), 'quant' (LSQ / PACT) initialized from the data."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every rule of these tests matches some layer
    warnings.simplefilter("ignore", jq.FloatLayersWarning)  # some leave layers float
    shapes = jax.eval_shape(qmodel.init, jax.random.key(0), *args)
  qvars = {"params": params}
  if "quant_stats" in shapes:
    qvars["quant_stats"] = jit(lambda *a: qmodel.init(jax.random.key(0), *a)["quant_stats"])(*args)
  if "quant" in shapes:
    qvars["quant"] = jit(lambda v: qmodel.apply(v, *args, mutable=["quant"])[1]["quant"])(qvars)
  return qvars


def _quantized(name, rules):
  model, x, variables = _setup(name)
  qmodel = jq.quantize_model(model, rules)
  return qmodel, qinit(qmodel, variables["params"], x)


def run(module, variables, *args, **kwargs):
  """module.apply under jit (eager dispatch of every quantizer op compiles each one)."""
  return jit(functools.partial(module.apply, **kwargs))(variables, *args)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- numerics

def _np_quant(x, bits, axis):
  """Symmetric absmax fake quant in float64, one scale per slice along the other axes."""
  qmax = 2 ** (bits - 1) - 1
  scale = np.max(np.abs(x), axis=axis, keepdims=True) / qmax
  return np.clip(np.round(x / scale), -qmax, qmax) * scale


def test_mlp_matches_numpy_reference_of_the_rules():
  """Each layer as its rule says: W8A8 / activation-only A4 / weight-only W4 / W4A4
  (per-row activation scales, per-column weight scales), computed in numpy."""
  model, x, variables = _setup("mlp")
  qmodel, qvars = _quantized("mlp", CASES["mlp"][2])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  layer_bits = {"fc0": (8, 8), "fc1": (4, 4), "fc2": (None, 4), "fc3": (4, None), "fc4": (8, 8)}
  h = np.asarray(x, np.float64)
  for i in range(5):
    wb, ab = layer_bits[f"fc{i}"]
    w, b = p[f"fc{i}"]["kernel"], p[f"fc{i}"]["bias"]
    hq = h if ab is None else _np_quant(h, ab, axis=1)
    wq = w if wb is None else _np_quant(w, wb, axis=0)
    h = hq @ wq + b
    if i < 4:
      h = np.maximum(h, 0.0)
  out = np.asarray(run(qmodel, qvars, x))
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
  assert rel_err(out, model.apply(variables, x)) > 1e-3  # and that is not the float model


# The MLP runs by default; the conv net and the attention block (the same property on
# other layer kinds) are breadth, in the slow run.
@pytest.mark.parametrize("name", [
    "mlp", pytest.param("cnn", marks=pytest.mark.slow),
    pytest.param("block", marks=pytest.mark.slow)])
def test_error_vs_float_is_bounded_and_ordered_by_bits(name):
  model, x, variables = _setup(name)
  qmodels = [jq.quantize_model(model, rules)
             for rules in (_all_rules(8), CASES[name][2], _all_rules(4))]
  qvars = [qinit(q, variables["params"], x) for q in qmodels]
  outs = jit(lambda vs: [q.apply(v, x) for q, v in zip(qmodels, vs)] +
                 [model.apply(variables, x)])(qvars)
  err8, err_mixed, err4 = (rel_err(o, outs[-1]) for o in outs[:3])
  assert 0.0 < err8 < 0.03, (err8, err_mixed, err4)
  assert err8 < err_mixed < err4 < 0.5, (err8, err_mixed, err4)


# ----------------------------------------------------------------------------- gradients

LEARNED_RULES = {
    # (rules, expected {layer path: quant variable names})
    "mlp": ([jq.Rule("fc0", weight=jq.QuantSpec(bits=8, ste="lsq"),
                     act=jq.QuantSpec(bits=8, granularity="tensor", ste="lsq")),
             jq.Rule("fc1", weight=jq.QuantSpec(bits=4, ste="pact"),
                     act=jq.QuantSpec(bits=4, symmetric=False, granularity="tensor", ste="pact")),
             jq.Rule("fc2", act=A4), jq.Rule("fc3", weight=W4), jq.Rule("fc4", weight=W8, act=A8)],
            {"fc0": {"weight_lsq", "act_lsq"}, "fc1": {"weight_pact", "act_pact"}}),
    "cnn": ([jq.Rule("conv0", weight=jq.QuantSpec(bits=8, ste="lsq"),
                     act=jq.QuantSpec(bits=8, granularity="tensor", ste="lsq")),
             jq.Rule("conv1", weight=jq.QuantSpec(bits=4, ste="clipped"),
                     act=jq.QuantSpec(bits=4, symmetric=False, granularity="tensor", ste="pact")),
             jq.Rule("conv2", weight=jq.QuantSpec(bits=4, ste="lsq")),
             jq.Rule(".*", weight=W4, act=A4)],
            {"conv0": {"weight_lsq", "act_lsq"}, "conv1": {"act_pact"}, "conv2": {"weight_lsq"}}),
    "block": ([jq.Rule("embed", weight=W8, act=A8),
               jq.Rule("attn/(query|key|value)", weight=jq.QuantSpec(bits=4, ste="lsq"),
                       act=jq.QuantSpec(bits=4, granularity="tensor", ste="lsq")),
               jq.Rule("up", weight=jq.QuantSpec(bits=4, ste="lsq"),
                       act=jq.QuantSpec(bits=4, granularity="tensor", ste="pact")),
               jq.Rule("attn/out|down|head", weight=W4, act=A4)],
              {"attn/query": {"weight_lsq", "act_lsq"}, "attn/key": {"weight_lsq", "act_lsq"},
               "attn/value": {"weight_lsq", "act_lsq"}, "up": {"weight_lsq", "act_pact"}}),
}


# The attention block (LSQ / PACT on DenseGeneral and nn.Einsum, plain W4A4 / W8A8 layers)
# runs by default; the MLP's and the CNN's learned scales are in the slow run (NNX's
# gradients against Linen's also reach LSQ / PACT of Dense and conv layers by default:
# test_nnx.py, test_nnx_pipeline.py).
@pytest.mark.parametrize("name", [
    pytest.param("mlp", marks=pytest.mark.slow), pytest.param("cnn", marks=pytest.mark.slow),
    "block"])
def test_every_float_param_and_quant_variable_gets_a_gradient(name):
  rules, expected_quant = LEARNED_RULES[name]
  model, x, variables = _setup(name)
  qmodel = jq.quantize_model(model, rules)
  shapes = jax.eval_shape(qmodel.init, jax.random.key(0), x)
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["quant_stats"])
  target = normal(jax.eval_shape(model.apply, variables, x).shape, 7)

  @jit
  def grads(params):
    quant = qmodel.apply({"params": params, "quant_stats": stats}, x,
                         mutable=["quant"])[1]["quant"]  # LSQ / PACT init from the data
    loss = lambda t: jnp.sum((qmodel.apply({**t, "quant_stats": stats}, x) - target) ** 2)
    float_loss = lambda p: jnp.sum((model.apply({"params": p}, x) - target) ** 2)
    return jax.grad(loss)({"params": params, "quant": quant}), jax.grad(float_loss)(params)

  g, float_g = grads(variables["params"])
  flat = traverse_util.flatten_dict(g["params"], sep="/")
  assert set(flat) == set(traverse_util.flatten_dict(variables["params"], sep="/"))
  dead = [k for k, v in flat.items() if not np.any(np.asarray(v) != 0)]
  assert not dead, f"parameters with an all-zero gradient: {dead}"
  assert all(np.all(np.isfinite(v)) for v in flat.values())
  # The quantized gradient points where the float one does (STE through 4–8 bits).
  cos = lambda a, b: float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  flat_float = traverse_util.flatten_dict(float_g, sep="/")
  for k, v in flat.items():
    assert cos(np.ravel(v), np.ravel(flat_float[k])) > 0.5, k
  # LSQ / PACT quantities live in 'quant' and all receive non-zero gradients.
  got = {}
  for k, v in traverse_util.flatten_dict(g["quant"], sep="/").items():
    layer, var = k.rsplit("/", 1)
    got.setdefault(layer, set()).add(var)
    assert np.all(np.isfinite(v)) and np.any(np.asarray(v) != 0), f"zero gradient for {k}"
  assert got == expected_quant


# ----------------------------------------------------------------------------- variables

@pytest.mark.parametrize("name", list(CASES))
def test_params_tree_equals_float_and_collections_are_separate(name):
  model, x, _ = _setup(name)
  qmodel = jq.quantize_model(model, LEARNED_RULES[name][0])
  float_shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  q_shapes = jax.eval_shape(qmodel.init, jax.random.key(0), x)
  assert float_shapes == {"params": q_shapes["params"]}
  # Learned quantities vs range statistics, each in its own collection.
  assert set(q_shapes) == {"params", "quant", "quant_stats"}
  names = lambda c: {k.rsplit("/", 1)[1] for k in traverse_util.flatten_dict(q_shapes[c], sep="/")}
  assert names("quant") == {"weight_lsq", "act_lsq", "weight_pact", "act_pact"} & set().union(
      *LEARNED_RULES[name][1].values())
  assert names("quant_stats") == {"ema_lo", "ema_hi", "ema_count", "kernel_axes"}


def test_init_gives_the_float_params_and_checkpoints_cross_load():
  model = MLP()
  x = normal((3, 12), 2)
  qmodel = jq.quantize_model(model, LEARNED_RULES["mlp"][0])
  key = jax.random.key(0, impl="unsafe_rbg")  # compiles fast; same bits for both inits
  variables, qvars = jit(lambda k: (model.init(k, x), qmodel.init(k, x)))(key)
  jax.tree.map(np.testing.assert_array_equal, qvars["params"], variables["params"])
  assert set(qvars) == {"params", "quant", "quant_stats"}
  # A float checkpoint (other values) loads into the quantized model and the quantized
  # model's params load back into the float model.
  q8 = jq.quantize_model(model, _all_rules(8))
  new = {"params": jax.tree.map(lambda a: a * 1.5, variables["params"])}
  y_q, y_new, y_back, y_float = jit(lambda q, f: (
      q8.apply({**q, **f}, x), model.apply(f, x), model.apply({"params": q["params"]}, x),
      model.apply(variables, x)))(qvars, new)
  np.testing.assert_allclose(y_back, y_float, rtol=1e-5, atol=1e-6)
  assert 0.0 < rel_err(y_q, y_new) < 0.03


def test_quantize_model_keeps_the_float_model_and_its_fields():
  model = Attention(heads=2, head_dim=4)
  x = normal((2, 3, 8), 6)
  variables = {"params": fill_params(model, x)}
  y0 = run(model, variables, x)
  qmodel = jq.quantize_model(model, _all_rules(4))
  assert isinstance(qmodel, Attention) and (qmodel.heads, qmodel.head_dim) == (2, 4)
  q8 = jq.quantize_model(qmodel, _all_rules(8))  # re-quantizing starts from the float class
  assert type(q8).__mro__[1] is Attention
  y4, y8, y_float = jit(lambda v: (qmodel.apply(v, x), q8.apply(v, x), model.apply(v, x)))(
      qinit(qmodel, variables["params"], x))
  np.testing.assert_array_equal(y_float, y0)  # the float model is untouched
  assert 0.0 < rel_err(y8, y0) < rel_err(y4, y0)


# ----------------------------------------------------------------------------- jit / remat / shared / nested

class Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1], name="fc")(nn.relu(nn.Dense(16, name="up")(x)))


class Stack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Inner) if self.remat else Inner
    for i in range(2):
      x = block(name=f"block_{i}")(x)
    return x


def test_remat_gives_the_same_quantized_forward_and_gradients():
  x = normal((4, 8), 3)
  plain, remat = Stack(remat=False), Stack(remat=True)
  params = fill_params(plain, x)
  rules = [jq.Rule("block_1/.*", weight=W4, act=A4)]
  q_plain, q_remat = jq.quantize_model(plain, rules), jq.quantize_model(remat, rules)
  qv = qinit(q_remat, params, x)
  assert jax.eval_shape(remat.init, jax.random.key(0), x)["params"] == jax.eval_shape(
      lambda: params)
  assert quantized_layers(qv) == {"block_1/up", "block_1/fc"}

  @jit
  def both(p):
    outs, grads = [], []
    for m in (q_plain, q_remat):
      f = lambda p: m.apply({**qv, "params": p}, x)
      outs.append(f(p))
      grads.append(jax.grad(lambda p: jnp.sum(f(p) ** 2))(p))
    return outs, grads, plain.apply({"params": p}, x)

  (y_plain, y_remat), (g_plain, g_remat), y_float = both(params)
  np.testing.assert_allclose(y_remat, y_plain, rtol=1e-6, atol=1e-6)
  assert rel_err(y_remat, y_float) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_remat, g_plain)
  assert all(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(g_remat))


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(x.shape[-1], name="shared")
    return layer(nn.tanh(layer(x)))


class Single(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="shared")(x)


def test_layer_called_twice_quantizes_each_call_with_the_shared_weights():
  x = normal((5, 8), 4)
  rules = [jq.Rule("shared", weight=W8, act=A4)]
  qshared, qsingle = jq.quantize_model(Shared(), rules), jq.quantize_model(Single(), rules)
  qv = qinit(qshared, fill_params(Shared(), x), x)
  assert set(traverse_util.flatten_dict(qv["params"], sep="/")) == {"shared/kernel", "shared/bias"}

  @jit
  def f(v):
    ref = qsingle.apply(v, jnp.tanh(qsingle.apply(v, x)))
    y, upd = qshared.apply(v, x, mutable=["quant_stats"])
    g = jax.grad(lambda p: jnp.sum(qshared.apply({**v, "params": p}, x) ** 2))(v["params"])
    return ref, y, upd, g, Shared().apply(v, x)

  ref, y, upd, g, y_float = f(qv)
  np.testing.assert_array_equal(y, ref)
  assert rel_err(y, y_float) > 1e-3
  assert int(upd["quant_stats"]["shared"]["ema_count"]) == 2  # both calls tracked
  assert all(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(g))
  # The serving model runs both calls on the same stored codes.
  smodel, svars = jq.convert(qshared, qv)
  assert isinstance(svars["params"]["shared"]["kernel"], jq.QTensor)
  np.testing.assert_array_equal(run(smodel, svars, x), y)


def quantized_layers(variables):
  """Paths of the layers whose kernel layout the quantized init recorded."""
  stats = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
  return {k.rsplit("/", 1)[0] for k in stats if k.endswith("/kernel_axes")}


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(x.shape[-1], name="query")(x) * nn.Dense(x.shape[-1], name="key")(x)
    x = x + nn.Dense(x.shape[-1], name="out")(h)
    return x + nn.Dense(x.shape[-1], name="mlp")(nn.relu(x))


class AttnLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Layer(name="attn")(x)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = AttnLayer(name=f"layer_{i}")(x)
    return x


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(Encoder(name="encoder")(x))


def test_nested_rule_paths_quantize_exactly_the_matched_layers():
  x = normal((3, 8), 5)
  model = Model()
  params = fill_params(model, x)
  qmodel = jq.quantize_model(model, [jq.Rule("encoder/layer_3/attn/.*", weight=W4, act=A4)])
  qv = qinit(qmodel, params, x)
  expected = {f"encoder/layer_3/attn/{n}" for n in ("query", "key", "out", "mlp")}
  assert quantized_layers(qv) == expected
  stats = traverse_util.flatten_dict(qv["quant_stats"], sep="/")
  assert {k.rsplit("/", 1)[0] for k in stats} == expected
  q_layer = jq.quantize_model(AttnLayer(), [jq.Rule("attn/.*", weight=W4, act=A4)])

  @jit
  def f(p):
    # Reference: layers 0-2 float, layer 3 quantized on its own, float head.
    h = x
    for i in range(3):
      h = AttnLayer().apply({"params": p["encoder"][f"layer_{i}"]}, h)
    h = q_layer.apply({"params": p["encoder"]["layer_3"]}, h)
    ref = nn.Dense(4).apply({"params": p["head"]}, h)
    return qmodel.apply({**qv, "params": p}, x), ref, model.apply({"params": p}, x)

  y, ref, y_float = f(params)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  assert rel_err(y, y_float) > 1e-3


def test_warning_names_unused_rules_only():
  x = jnp.ones((2, 12))
  init = lambda q: jax.eval_shape(q.init, jax.random.key(0), x)
  qmodel = jq.quantize_model(MLP(), [jq.Rule("fc[0-4]", weight=W8),
                                     jq.Rule("fc9", weight=W4),
                                     jq.Rule("encoder/.*", act=A8)])
  with pytest.warns(UserWarning, match="rules matched no layer") as record:
    init(qmodel)
  msg = " ".join(str(r.message) for r in record)
  assert "'fc9'" in msg and "'encoder/.*'" in msg and "'fc[0-4]'" not in msg
  # A rule shadowed by an earlier one matches no layer either.
  q2 = jq.quantize_model(MLP(), [jq.Rule("fc.*", weight=W8), jq.Rule("fc1", weight=W4)])
  with pytest.warns(UserWarning, match=r"\['fc1'\]"):
    init(q2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    init(jq.quantize_model(MLP(), [jq.Rule("fc.*", weight=W8)]))


# ----------------------------------------------------------------------------- rule validation

@pytest.mark.parametrize("make, match", [
    (lambda: jq.Rule("fc(", weight=W8), "not a valid regex"),
    (lambda: jq.Rule("fc.*", weight=3), "weight=3"),
    (lambda: jq.Rule("fc.*", act="int8"), "act="),
    (lambda: jq.Rule("fc.*", weight=jq.DotSpec(rhs=W8)), "weight=DotSpec"),
    (lambda: jq.Rule("fc.*", weight=W8, mode="float"), "mode"),
    (lambda: jq.Rule("fc.*", weight=jq.QuantSpec(format="fp8_e4m3"), mode="int"), "mode='fake'"),
    (lambda: jq.Rule(3, weight=W8), "pattern"),
    (lambda: jq.quantize_model(MLP(), [jq.Rule(
        "fc.*", act=jq.QuantSpec(bits=4, ste="lsq", granularity="channel"))]), "granularity='tensor'"),
    (lambda: jq.quantize_model(MLP(), [jq.Rule(
        "fc.*", act=jq.QuantSpec(bits=4, ste="pact", symmetric=False))]), "granularity='tensor'"),
    (lambda: jq.quantize_model(MLP(), [jq.Rule("fc.*", grad=A8, weight=W8)]), "grad="),
    (lambda: jq.quantize_model(MLP(), [W8]), r"rules\[0\]"),
    (lambda: jq.quantize_model(MLP(), [jq.DotSpec(lhs=A8, rhs=W8)]), "must be a jaxquant.Rule"),
    (lambda: jq.quantize_model(lambda x: x, [jq.Rule("fc.*", weight=W8)]), "model="),
])
def test_bad_rules_fail_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_stochastic_rounding_needs_a_quant_rng():
  qmodel = jq.quantize_model(MLP(), [jq.Rule("fc1", weight=W8, act=jq.QuantSpec(
      bits=4, rounding="stochastic"))])
  x = jnp.ones((2, 12))
  rngs = {"params": jax.random.key(0), "quant": jax.random.key(1)}
  shapes = jax.eval_shape(qmodel.init, rngs, x)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
    jax.eval_shape(qmodel.apply, variables, x)
  out = jax.eval_shape(lambda v, k: qmodel.apply(v, x, rngs={"quant": k}), variables,
                       jax.random.key(2))
  assert out.shape == (2, 10)


# ----------------------------------------------------------------------------- the int path

def _eqns(jaxpr):
  """Every equation of a jaxpr and of all its sub-jaxprs (pjit, custom_vjp, remat, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def int_ops(fn, *args, prim):
  """(# of `prim` equations with int8 operands and an int32 result, # of all of them)."""
  eqns = [e for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == prim]
  is_int = lambda e: (all(v.aval.dtype == jnp.int8 for v in e.invars[:2])
                      and e.outvars[0].aval.dtype == jnp.int32)
  return sum(map(is_int, eqns)), len(eqns)


class TwoMethods(nn.Module):
  def __call__(self, x):
    return self.encode(x)

  @nn.compact
  def encode(self, x):
    return nn.Dense(4, name="fc")(x)


def test_the_interceptor_covers_call():
  qmodel = jq.quantize_model(TwoMethods(), [jq.Rule("fc", weight=W8, act=A8)])
  x = jnp.ones((2, 8))
  variables = qinit(qmodel, fill_params(TwoMethods(), x), x)
  assert int_ops(qmodel.apply, variables, x, prim="dot_general") == (1, 1)


def test_apply_with_another_method_is_quantized_too():
  qmodel = jq.quantize_model(TwoMethods(), [jq.Rule("fc", weight=W8, act=A8)])
  x = jnp.ones((2, 8))
  variables = qinit(qmodel, fill_params(TwoMethods(), x), x)
  apply_encode = lambda v, x: qmodel.apply(v, x, method="encode")
  assert int_ops(apply_encode, variables, x, prim="dot_general") == (1, 1)


def test_int_mode_dots_are_s8_by_s8_to_s32_in_the_jaxpr():
  _, x, variables = _setup("mlp")
  rules = [jq.Rule("fc0|fc1|fc4", weight=W8, act=A8), jq.Rule("fc2", weight=W4, act=A4),
           jq.Rule("fc3", weight=W8)]  # weight-only: a float dot of dequantized weights
  qmodel, qvars = _quantized("mlp", rules)
  assert int_ops(qmodel.apply, qvars, x, prim="dot_general") == (4, 5)
  # mode='fake' runs float dots only.
  fake = jq.quantize_model(MLP(), [jq.Rule(".*", weight=W8, act=A8, mode="fake")])
  assert int_ops(fake.apply, qvars, x, prim="dot_general") == (0, 5)
  # The float model has no int dot at all (and the walk does find its dots).
  assert int_ops(MLP().apply, variables, x, prim="dot_general") == (0, 5)


def test_int_mode_convs_and_einsums_are_integer_in_the_jaxpr():
  _, x, _ = _setup("cnn")
  rules = [jq.Rule("conv[01]", weight=W8, act=A8),
           jq.Rule("conv2", weight=jq.QuantSpec(bits=4, symmetric=False),
                   act=jq.QuantSpec(bits=8, symmetric=False))]
  qmodel, qvars = _quantized("cnn", rules)
  n_int, n_all = int_ops(qmodel.apply, qvars, x, prim="conv_general_dilated")
  # conv2 is asymmetric on both sides: its zero-point terms are integer convs too.
  assert n_int == n_all and n_int >= 3
  assert int_ops(qmodel.apply, qvars, x, prim="dot_general")[0] == 0  # dense layers float
  _, xb, _ = _setup("block")
  qblock, qbv = _quantized("block", [jq.Rule("up|attn/.*", weight=W8, act=A8)])
  # up (nn.Einsum) and query/key/value/out (DenseGeneral) are int; the two attention
  # einsums and embed/down/head stay float.
  assert int_ops(qblock.apply, qbv, xb, prim="dot_general") == (5, 10)


def test_int_mode_equals_fake_mode_up_to_float_rounding():
  """The integer kernels (with zero-point cross terms) of conv, DenseGeneral, nn.Einsum and
  Dense compute the same numbers as the float contraction of the dequantized operands."""
  x = normal((3, 6, 6, 3), 11)
  specs = dict(weight=jq.QuantSpec(bits=4, symmetric=False),
               act=jq.QuantSpec(bits=8, symmetric=False))
  q_int = jq.quantize_model(Net(), [jq.Rule(".*", **specs)])
  q_fake = jq.quantize_model(Net(), [jq.Rule(".*", mode="fake", **specs)])
  qv = qinit(q_int, fill_params(Net(), x), x)
  y_int, y_fake, y_float = jit(lambda v: (q_int.apply(v, x), q_fake.apply(v, x),
                                          Net().apply(v, x)))(qv)
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-5 * float(jnp.abs(y_fake).max()))
  assert rel_err(y_int, y_float) > 1e-3


def test_eager_calls_run_each_contraction_compiled_and_traces_stay_inline():
  """Outside a trace a matched layer's contraction (dot, conv, einsum) and its learned-scale
  init run as cached compiled calls, with the outputs of the traced model; inside a trace
  they are inlined (no nested call in the jaxpr)."""
  x = normal((3, 6, 6, 3), 5)
  rules = [jq.Rule("conv.*", weight=jq.QuantSpec(bits=4, ste="lsq"), act=A8),
           jq.Rule(".*", weight=W8, act=jq.QuantSpec(bits=8, granularity="tensor", ste="lsq"))]
  qmodel = jq.quantize_model(Net(), rules)
  compiled = (qdot.dot_general_compiled, qconv.conv_general_dilated_compiled,
              einsum_compiled, layout.init_learned_compiled,
              numerics.init_learned_compiled)
  for f in compiled:  # an earlier test in this process may have compiled these shapes
    f.jitted.clear_cache()
  before = [f.jitted._cache_size() for f in compiled]
  qv = qmodel.init(jax.random.key(0, impl="unsafe_rbg"), x)  # eager (a fast PRNG)
  assert all(f.jitted._cache_size() > n for f, n in zip(compiled, before))
  y_eager = qmodel.apply(qv, x)
  np.testing.assert_array_equal(y_eager, jax.jit(qmodel.apply)(qv, x))
  jaxpr = jax.make_jaxpr(qmodel.init)(jax.random.key(0), x).jaxpr
  names = {str(e.params.get("name", "")) for e in _eqns(jaxpr)}
  assert not names & {f.__name__ for f in compiled}, names


@pytest.mark.parametrize("act", [
    jq.QuantSpec(bits=4, granularity="tensor", symmetric=False, calibration="percentile",
                 percentile=99.0, ste="clipped"),
    jq.QuantSpec(bits=4, granularity="tensor", symmetric=False)])
def test_batch_range_computed_once_and_shared_changes_nothing(monkeypatch, act):
  """In training a per-tensor absmax / percentile layer computes its batch range once
  and hands it to the quantizer and the EMA observer. Outputs, gradients and the
  observer's state are bit-identical to each computing its own, for a Dense MLP and a
  conv net, and the percentile runs once per layer (one loop) instead of twice."""
  from jaxquant import linen_layer  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(6, (3,))(x))
      x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
      return nn.Dense(5)(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 12, 3)), jnp.float32)
  qmodel = jq.quantize_model(Net(), [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=act)])
  variables = jit(qmodel.init)(jax.random.key(0, impl="unsafe_rbg"), x)
  params, stats = variables["params"], {"quant_stats": variables["quant_stats"]}

  def make_step():  # a new function each time: jax caches traces by function
    def step(params):
      def loss(p):
        out, upd = qmodel.apply({"params": p, **stats}, x, mutable=["quant_stats"])
        return jnp.sum(out ** 2), (out, upd)
      return jax.grad(loss, has_aux=True)(params)
    return step

  from jaxquant import numerics  # pylint: disable=import-outside-toplevel
  calls = []
  real = numerics.nanpercentile
  monkeypatch.setattr(numerics, "nanpercentile", lambda v, q: (calls.append(q), real(v, q))[1])

  def run():  # (results, percentiles computed while tracing the step)
    calls.clear()
    out = jit(make_step())(params)
    return out, len(calls)

  shared, loops_shared = run()
  monkeypatch.setattr(linen_layer, "shares_batch_range", lambda act: False)
  separate, loops_separate = run()
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(separate)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  per_range = {"absmax": 0, "percentile": 1 if act.symmetric else 2}[act.calibration]
  assert loops_shared == 3 * per_range and loops_separate == 2 * 3 * per_range  # 3 layers

