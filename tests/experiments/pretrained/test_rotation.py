"""Hadamard matrices and the QuaRot rotation of a Llama: orthogonality against numpy, the
rotated float model's logits and perplexity against the unrotated model's, and the
online-Hadamard quantized path against a numpy forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from experiments.models import hadamard, llama
from experiments.pretrained import gguf_llama, perplexity, rotation
from tests.experiments.pretrained import gguf_fixtures as fx


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 64, 576, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n):
  h = hadamard.matrix(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)  # ±1/√n


def test_hadamard_factors_and_constructions():
  assert hadamard.factor_orders(576) == (12, 12, 4)
  assert hadamard.factor_orders(1536) == (12, 128)
  p = hadamard.paley(11)
  assert set(np.unique(p)) == {-1.0, 1.0}
  np.testing.assert_array_equal(p @ p.T, 12 * np.eye(12))
  s = hadamard.sylvester(8)
  np.testing.assert_array_equal(s @ s.T, 8 * np.eye(8))
  for bad, call in [(9, hadamard.factor_orders), (6, hadamard.sylvester), (13, hadamard.paley)]:
    with pytest.raises(ValueError, match=str(bad)):
      call(bad)


@pytest.mark.parametrize("n", [48, 64, 96])
def test_hadamard_apply_equals_the_dense_product(n):
  x = np.random.default_rng(n).normal(size=(2, 3, n)).astype(np.float32)
  got = np.asarray(jax.jit(hadamard.apply, static_argnums=1)(jnp.asarray(x), n))
  np.testing.assert_allclose(got, x.astype(np.float64) @ hadamard.matrix(n), atol=1e-5)
  with pytest.raises(ValueError, match="order n=32"):
    hadamard.apply(jnp.asarray(x), 32)


def _nll(logits, ids):
  return float(perplexity.token_nll(np.asarray(logits, np.float64), ids).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny random GGUF llama (tied head, random RMSNorm scales) and its rotation."""
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  fx.write_gguf(path)
  model, params, gg = gguf_llama.load(path)
  rmodel, rparams = rotation.rotate(model, params, seed=3)
  return model, params, rmodel, rparams, gg.config


def test_rotation_keeps_the_float_model(tiny):
  model, params, rmodel, rparams, c = tiny
  assert rmodel.hadamard and not rmodel.config.tie_embeddings
  assert not np.allclose(rparams["token_embed"]["embedding"], params["token_embed"]["embedding"])
  ids = np.random.default_rng(0).integers(0, c.vocab_size, size=(2, 13))
  # Jitted forwards: one compile each instead of one per op (eager is several times slower).
  want = np.asarray(jax.jit(model.apply)({"params": params}, ids))
  got = np.asarray(jax.jit(rmodel.apply)({"params": rparams}, ids))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  assert _nll(got, ids) == pytest.approx(_nll(want, ids), rel=1e-5)  # perplexity too
  # The cached decode path (rotated keys in the cache) continues the same way.
  outs = []
  for m, p in [(model, params), (rmodel, rparams)]:
    cache = llama.init_cache(m.config, 2, 16)
    apply = jax.jit(lambda variables, x, cache, m=m: m.apply(variables, x, cache=cache))
    _, cache = apply({"params": p}, ids[:, :9], cache)
    outs.append(np.asarray(apply({"params": p}, ids[:, 9:], cache)[0]))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-4 * np.abs(outs[0]).max())
  np.testing.assert_allclose(outs[0], want[:, 9:], atol=1e-4 * np.abs(want).max())
  kept = rotation.rotate(model.clone(kv_bits=4, kv_key_group=4), params)[0]
  assert (kept.kv_bits, kept.kv_key_group, kept.hadamard) == (4, 4, True)
  with pytest.raises(ValueError, match="already has hadamard=True"):
    rotation.rotate(rmodel, rparams)


def test_rotation_with_paley_widths_and_an_untied_head():
  """hidden 48 = 12·4, FFN 96 = 12·8, head_dim 12: every Hadamard has a Paley factor."""
  c = llama.LlamaConfig(vocab_size=40, hidden_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=96, max_position=32,
                        tie_embeddings=False)
  model = llama.Llama(c)
  ids = np.random.default_rng(1).integers(0, 40, size=(1, 10))
  params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(  # scales away from 1, so folding matters
      lambda path, x: np.asarray(x) * (1 + 0.5 * rng.normal(size=x.shape))
      if "scale" in jax.tree_util.keystr(path) else np.asarray(x), params)
  rmodel, rparams = rotation.rotate(model, params)
  want = np.asarray(jax.jit(model.apply)({"params": params}, ids))
  got = np.asarray(jax.jit(rmodel.apply)({"params": rparams}, ids))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(rparams["block_0"]["mlp_norm"]["scale"], np.ones(48))


def _fake_quant_rows(x, bits):
  """Symmetric absmax per row (last axis), codes ±(2^(bits−1) − 1), numpy."""
  qmax = 2 ** (bits - 1) - 1
  scale = np.abs(x).max(axis=-1, keepdims=True) / qmax
  return np.clip(np.round(x / scale), -qmax, qmax) * scale


def test_online_hadamard_before_a_quantized_down_matches_numpy():
  c = llama.LlamaConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, intermediate_size=48)
  mlp = llama.SwiGLU(c, hadamard=True)
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  params = mlp.init(jax.random.key(1), x)["params"]
  a4 = jq.QuantSpec(bits=4, granularity="channel", static=False)
  qmlp = jq.quantize_model(mlp, [jq.Rule("down", act=a4)])
  with pytest.warns(jq.FloatLayersWarning, match="gate"):  # only `down` is quantized
    variables = qmlp.init(jax.random.key(1), x) | {"params": params}
  got = np.asarray(qmlp.apply(variables, x))
  w = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  g, u = x @ w["gate"], x @ w["up"]
  h = g / (1 + np.exp(-g)) * u @ hadamard.matrix(48)  # silu(gate) · up, then H_48
  want = _fake_quant_rows(h, 4) @ w["down"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # without the Hadamard, the same quantizer gives a different (unrotated) result
  plain = jq.quantize_model(llama.SwiGLU(c), [jq.Rule("down", act=a4)])
  assert not np.allclose(np.asarray(plain.apply({"params": params}, x)), got, atol=1e-4)


def test_rotated_w4a4kv4_runs_and_quantizes_the_untied_head(tiny):
  _, params, rmodel, rparams, c = tiny
  w4 = jq.QuantSpec(bits=4)
  a4 = jq.QuantSpec(bits=4, granularity="channel", static=False)
  rules = [jq.Rule(r"block_\d+/(attn|mlp)/.*", weight=w4, act=a4),
           jq.Rule("lm_head|token_embed", weight=jq.QuantSpec(bits=8))]
  ids = np.random.default_rng(4).integers(0, c.vocab_size, size=(2, 12))
  qmodel = jq.quantize_model(rmodel.clone(kv_bits=4), rules)
  smodel, svars = jq.convert(qmodel, {"params": rparams}, ids[:1])
  assert isinstance(svars["params"]["lm_head"]["kernel"], jq.QTensor)
  got = np.asarray(jax.jit(smodel.apply)(svars, ids))
  assert np.isfinite(got).all()
  want = np.asarray(jax.jit(rmodel.apply)({"params": rparams}, ids))
  assert not np.allclose(got, want, atol=1e-3)  # quantization did change the logits


def test_rotation_check_amplification_is_one_for_a_constant_norm_scale(tiny):
  from experiments.pretrained import rotation_check
  model, params, _, _, c = tiny
  ids = np.random.default_rng(5).integers(0, c.vocab_size, size=(1, 9))
  flat = {**params, "block_0": {**params["block_0"], "mlp_norm": {"scale": np.full(
      c.hidden_size, 0.5, np.float32)}}}
  shares, g, factor = rotation_check.channel_stats(model, flat, ids, 0)
  assert factor == pytest.approx(1.0, rel=1e-6)  # (Σe)(mean g²) / Σ e g² with g constant
  np.testing.assert_allclose(g, 0.5)
  assert np.all(np.diff(shares) <= 0) and 0 < shares.sum() <= 1
  _, _, factor = rotation_check.channel_stats(model, params, ids, 0)
  assert factor != pytest.approx(1.0, rel=1e-3)  # random scales: not one
