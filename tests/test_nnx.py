"""Tests for jaxquant.quantize_model on Flax NNX modules: the same model written in Linen
and NNX with the same weights gives the same quantized outputs, under nnx.jit too;
gradients (weight LSQ included) flow through nnx.grad; unsupported cases fail early.
The pipeline's later steps (calibrate, convert, reports, learned activations) are in
test_nnx_pipeline.py."""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant.einsum import einsum_compiled
from tests.conftest import FULL_OPT
from tests.test_convert import PARAMS, X
from tests.test_transform import Net, int_ops, jit, qinit, rel_err


class NNXNet(nnx.Module):
  """test_transform.Net in NNX: attribute names = Linen layer names, same parameter shapes."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.proj = nnx.LinearGeneral(8, (2, 8), rngs=rngs)
    self.mix = nnx.Einsum("bthd,hdf->btf", (2, 8, 12), (12,), rngs=rngs)
    self.head = nnx.Linear(12, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = self.mix(self.proj(x))
    return self.head(jnp.mean(nnx.gelu(x), axis=1))


def nnx_net(params=PARAMS, cls=NNXNet):
  """A `cls` holding the Linen parameters (built abstractly: no PRNG init to compile)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


A8 = jq.QuantSpec(bits=8)
CASES = {
    "mixed": [jq.Rule("conv|head", weight=jq.QuantSpec(bits=8), act=A8),
              jq.Rule("proj", act=jq.QuantSpec(bits=4)),
              jq.Rule("mix", weight=jq.QuantSpec(bits=4, symmetric=False),
                      act=jq.QuantSpec(bits=6, symmetric=False))],
    "binary_group_weight_only": [jq.Rule("conv", weight=jq.QuantSpec(format="binary"), act=A8),
                                 jq.Rule("proj", weight=jq.QuantSpec(
                                     bits=4, granularity="group", group_size=4), act=A8),
                                 jq.Rule("mix|head", weight=jq.QuantSpec(bits=3))],
    "lsq_pact_weights": [jq.Rule("conv|mix", weight=jq.QuantSpec(bits=4, ste="lsq"), act=A8),
                         jq.Rule("proj|head", weight=jq.QuantSpec(bits=4, ste="pact"))],
}


@nnx.jit
def _nnx_forward(model, x):
  return model(x)


_linen_float = jax.jit(Net().apply)


def test_nnx_net_is_the_linen_net():
  y_linen = _linen_float({"params": PARAMS}, X)
  np.testing.assert_array_equal(_nnx_forward(nnx_net(), X), y_linen)


# Binary, grouped and weight-only layers are format breadth on the same NNX path (Linen
# serves each of them in the default run: test_convert.py); they run in the slow run.
@pytest.mark.parametrize("case", [
    "mixed", pytest.param("binary_group_weight_only", marks=pytest.mark.slow),
    "lsq_pact_weights"])
def test_nnx_and_linen_give_the_same_quantized_outputs(case):
  rules = CASES[case]
  linen_q = jq.quantize_model(Net(), rules)
  linen_vars = qinit(linen_q, PARAMS, X)
  model = nnx_net()
  assert jq.quantize_model(model, rules) is model  # in place
  if case == "lsq_pact_weights":  # learned weight scales: initialized like Linen's
    for layer, var in (("conv", "weight_lsq"), ("mix", "weight_lsq"), ("proj", "weight_pact"),
                       ("head", "weight_pact")):
      learned = getattr(getattr(model, layer), var)[...]
      np.testing.assert_allclose(learned, linen_vars["quant"][layer][var], rtol=1e-6)
      linen_vars["quant"][layer][var] = learned  # (init reductions may differ by an ulp)
  y_nnx = _nnx_forward(model, X)
  y_linen = jax.jit(linen_q.apply)(linen_vars, X)  # the same XLA options as nnx.jit
  np.testing.assert_array_equal(y_nnx, y_linen)
  assert rel_err(y_nnx, _linen_float({"params": PARAMS}, X)) > 1e-4
  # Parameters are untouched.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for layer, leaves in PARAMS.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(params[layer][name], value)


def test_nnx_int_path_is_integer():
  model = jq.quantize_model(nnx_net(), CASES["mixed"])
  graphdef, state = nnx.split(model)
  fn = lambda state, x: nnx.merge(graphdef, state)(x)
  assert int_ops(fn, state, X, prim="conv_general_dilated") == (1, 1)
  assert int_ops(fn, state, X, prim="dot_general") == (2, 3)  # proj is activation-only


def test_nnx_eager_call_runs_compiled_contractions_equal_to_the_jitted_model():
  """An NNX model called outside nnx.jit runs each quantized contraction as one cached
  compiled call (not op by op), with the jitted model's outputs exactly."""
  model = jq.quantize_model(nnx_net(), CASES["lsq_pact_weights"])
  compiled = (qdot.dot_general_compiled, qconv.conv_general_dilated_compiled,
              einsum_compiled)
  # Another test in the same worker may already have compiled these signatures, so
  # start from empty caches: the eager call must fill each of them itself.
  for f in compiled:
    f.jitted.clear_cache()
  y_eager = model(X)
  assert all(f.jitted._cache_size() > 0 for f in compiled)
  if FULL_OPT:  # as a user's program compiles: bit-equal
    np.testing.assert_array_equal(y_eager, _nnx_forward(model, X))
  else:  # XLA backend level 0 (tests/conftest.py): the float epilogue without FMAs
    np.testing.assert_array_max_ulp(y_eager, _nnx_forward(model, X), maxulp=1)


def test_nnx_grad_reaches_every_param_and_the_weight_lsq_scale():
  model = jq.quantize_model(nnx_net(), CASES["lsq_pact_weights"])
  target = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: jnp.sum((m(x) - target) ** 2))(model)

  g = nnx.to_pure_dict(grads(model, X))
  names = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(g)}
  assert len(names) == 8 + 4  # kernel + bias per layer, one learned scale per layer
  for name, v in names.items():
    assert np.all(np.isfinite(v)) and np.any(np.asarray(v) != 0), name
  assert sum("weight_lsq" in n or "weight_pact" in n for n in names) == 4
  # The same gradients as Linen's for params and 'quant'.
  linen_q = jq.quantize_model(Net(), CASES["lsq_pact_weights"])
  lv = qinit(linen_q, PARAMS, X)
  for layer, var in (("conv", "weight_lsq"), ("mix", "weight_lsq"), ("proj", "weight_pact"),
                     ("head", "weight_pact")):
    lv["quant"][layer][var] = getattr(getattr(model, layer), var)[...]  # same start
  trainable = {k: lv[k] for k in ("params", "quant")}
  lg = jit(jax.grad(lambda t: jnp.sum((linen_q.apply({**lv, **t}, X) - target) ** 2)))(
      trainable)
  np.testing.assert_allclose(g["mix"]["kernel"], lg["params"]["mix"]["kernel"],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g["conv"]["weight_lsq"], lg["quant"]["conv"]["weight_lsq"],
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g["head"]["weight_pact"], lg["quant"]["head"]["weight_pact"],
                             rtol=1e-4, atol=1e-7)


class Attn(nnx.Module):
  def __init__(self, rngs):
    self.qkv = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), (2, 4), rngs=rngs)


class LinenAttn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="qkv")(x)


def test_nnx_einsum_with_lsq_weight_matches_linen():
  rules = [jq.Rule("qkv", weight=jq.QuantSpec(bits=4, ste="lsq"), act=A8)]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  params = {"qkv": {"kernel": jnp.asarray(rng.normal(size=(8, 2, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}}
  model = nnx_net(params, Attn)
  jq.quantize_model(model, rules)
  linen_q = jq.quantize_model(LinenAttn(), rules)
  lv = qinit(linen_q, params, x)
  np.testing.assert_allclose(model.qkv.weight_lsq[...], lv["quant"]["qkv"]["weight_lsq"],
                             rtol=1e-6)
  lv["quant"]["qkv"]["weight_lsq"] = model.qkv.weight_lsq[...]
  y_linen = jax.jit(linen_q.apply)(lv, x)  # same XLA options as nnx.jit
  np.testing.assert_array_equal(_nnx_forward(model.qkv, x), y_linen)
  np.testing.assert_array_equal(model.qkv(x), y_linen)  # eager too


@pytest.mark.parametrize("rule", [
    jq.Rule("proj", weight=jq.QuantSpec(bits=8, rounding="stochastic")),
    jq.Rule("head", act=jq.QuantSpec(bits=8, rounding="stochastic")),
])
def test_nnx_stochastic_rounding_without_rngs_raises_naming_the_way_out(rule):
  with pytest.raises(ValueError, match=r"stochastic.*rngs=nnx.Rngs\(quant=seed\)"):
    jq.quantize_model(nnx_net(), [rule])


def test_nnx_stochastic_rounding_draws_a_fresh_key_per_call_from_the_quant_stream():
  rule = jq.Rule("head", weight=jq.QuantSpec(bits=4, rounding="stochastic"),
                 act=jq.QuantSpec(bits=4, granularity="tensor", rounding="stochastic"))
  model = jq.quantize_model(nnx_net(), [rule], rngs=nnx.Rngs(quant=7))
  ys = [_nnx_forward(model, X) for _ in range(2)]
  assert int(model.head.jq_rng.count[...]) == 2  # the stream advanced as NNX state
  assert not np.array_equal(ys[0], ys[1])
  # Each call is the Linen model's apply with that call's key: the stream's next draw.
  linen_q = jq.quantize_model(Net(), [rule])
  key = jax.random.key(0, impl="unsafe_rbg")  # init's draws are dropped: a fast PRNG
  with pytest.warns(jq.FloatLayersWarning):  # conv, proj and mix stay float
    lv = {**jax.jit(linen_q.init)({"params": key, "quant": key}, X), "params": PARAMS}
  stream = nnx.Rngs(quant=7)
  for y in ys:
    np.testing.assert_array_equal(
        y, jax.jit(linen_q.apply)(lv, X, rngs={"quant": stream.quant()}))
  with pytest.raises(ValueError, match="rngs is for nnx models"):
    jq.quantize_model(Net(), [rule], rngs=nnx.Rngs(quant=7))


def test_nnx_unused_rules_warn_and_bad_rules_raise():
  with pytest.warns(UserWarning, match=r"rules matched no layer: \['encoder/.\*'\]"):
    jq.quantize_model(nnx_net(), [jq.Rule("conv", weight=jq.QuantSpec(bits=8)),
                                  jq.Rule("encoder/.*", weight=jq.QuantSpec(bits=8))])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jq.quantize_model(nnx_net(), [jq.Rule("conv|proj|mix|head", weight=jq.QuantSpec(bits=8))])
  with pytest.raises(ValueError, match="granularity='tensor'"):
    jq.quantize_model(nnx_net(), [jq.Rule(".*", act=jq.QuantSpec(bits=4, ste="lsq"))])
  with pytest.raises(ValueError, match="observers= is for Linen models"):
    jq.quantize_model(nnx_net(), [jq.Rule("conv", weight=jq.QuantSpec(bits=8))], observers=())
