"""Per-channel (KIVI) key quantization of the Llama KV cache: the grouped codes against
numpy, writes in any chunking against token by token, and a tiny model end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import kv_quant, llama
from experiments.pretrained import gguf_llama
from tests.experiments.pretrained import gguf_fixtures as fx
from tests.experiments.pretrained import llama_np_reference as ref


def _np_groups(k_BxTxHxK, bits, group):
  """numpy codes and scales: absmax per (group of tokens, head, channel), float32."""
  qmax = 2 ** (bits - 1) - 1
  b, t, h, d = k_BxTxHxK.shape
  codes, scales = np.zeros(k_BxTxHxK.shape, np.int8), []
  for j in range(0, t, group):
    run = k_BxTxHxK[:, j:j + group]
    s = np.abs(run).max(axis=1).astype(np.float32) / np.float32(qmax)
    s = np.where(s == 0, np.float32(1), s)
    codes[:, j:j + group] = np.clip(np.round(run / s[:, None]), -qmax, qmax)
    scales.append(s)
  return codes, np.stack(scales, axis=1)


def _keys(shape, seed=0):
  """Random keys with one outlier channel (the case per-channel scales are for)."""
  k = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  k[..., 3] *= 30.0
  return k


@pytest.mark.parametrize("bits", [8, 4])
def test_key_groups_match_numpy(bits):
  k = _keys((2, 11, 3, 8))
  codes, scales = kv_quant.quantize_key_groups(jnp.asarray(k), bits, 4)
  want_codes, want_scales = _np_groups(k, bits, 4)
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  np.testing.assert_allclose(np.asarray(scales), want_scales, rtol=1e-6)  # float32 ulps
  deq = kv_quant.dequantize_key_groups(codes, scales, 4)
  np.testing.assert_allclose(deq, want_codes * np.repeat(want_scales, 4, axis=1)[:, :11],
                             rtol=1e-6)
  # per channel beats per token when one channel is an outlier
  tok_codes, tok_scale = kv_quant.quantize_kv(jnp.asarray(k), bits)
  tok_err = np.abs(np.asarray(tok_codes * tok_scale) - k)[..., :3].mean()
  assert np.abs(np.asarray(deq) - k)[..., :3].mean() < tok_err


MIXED = [5, 1, 1, 7, 3, 4]  # single tokens, a chunk across groups, the unfinished end


# The mixed chunking compiles a write per chunk length: the default run has it with
# requant; without requant (whose writes [21] and [1] * 21 check by default) it is slow.
@pytest.mark.parametrize("chunks, requant", [
    (chunks, requant) if chunks != MIXED or requant else
    pytest.param(chunks, requant, marks=pytest.mark.slow)
    for requant in (False, True) for chunks in ([21], [1] * 21, MIXED)])
def test_writes_in_any_chunking_equal_token_by_token_and_numpy(chunks, requant):
  """Cache of 21 slots, groups of 4 (the last group, slot 20, never completes)."""
  bits, group, size = 4, 4, 21
  k = _keys((1, size, 2, 8), seed=1)
  codes = jnp.zeros((1, size, 2, 8), jnp.int8)
  scales = jnp.zeros((1, kv_quant.num_key_groups(size, group), 2, 8), jnp.float32)
  resid = jnp.zeros((1, group, 2, 8), jnp.float32)
  write = jax.jit(kv_quant.write_key_groups, static_argnums=(5, 6))
  length = 0
  for t in chunks:
    codes, scales, resid, (buf, start) = write(codes, scales, resid, jnp.int32(length),
                                               jnp.asarray(k[:, length:length + t]), bits,
                                               requant)
    assert int(start) == length // group * group  # float keys from the unfinished group on
    np.testing.assert_array_equal(np.asarray(buf)[:, :length + t - int(start)],
                                  k[:, int(start):length + t])
    length += t
  want_codes, want_scales = _np_groups(k[:, :20], bits, group)
  np.testing.assert_array_equal(np.asarray(codes)[:, :20], want_codes)
  np.testing.assert_allclose(np.asarray(scales)[:, :5], want_scales, rtol=1e-6)  # float32 ulps
  np.testing.assert_array_equal(np.asarray(resid)[:, :1], k[:, 20:21])
  if requant:  # the unfinished group's codes: its one key, its own absmax
    last_codes, last_scales = _np_groups(k[:, 20:21], bits, group)
    np.testing.assert_array_equal(np.asarray(codes)[:, 20], last_codes[:, 0])
    np.testing.assert_allclose(np.asarray(scales)[:, 5], last_scales[:, 0], rtol=1e-6)
  else:
    np.testing.assert_array_equal(np.asarray(codes)[:, 20], 0)  # unfinished: not written


def _cfg(c, **kw):
  return dict({"heads": c.num_heads, "kv_heads": c.num_kv_heads, "eps": c.rms_norm_eps,
               "theta": c.rope_theta, "layers": c.num_layers}, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return path, fx.write_gguf(path)


@pytest.mark.parametrize("bits,requant", [pytest.param(8, False, marks=pytest.mark.slow),
                                          pytest.param(4, True, marks=pytest.mark.slow),
                                          (4, False)])
def test_tiny_llama_channel_keys_against_numpy_prefill_and_decode(tiny, bits, requant):
  path, stored = tiny
  model, params, gg = gguf_llama.load(path)
  model = model.clone(kv_bits=bits, kv_key_group=3, kv_key_requant=requant)
  v, group = {"params": params}, 3
  ids = np.random.default_rng(3).integers(0, gg.config.vocab_size, (1, 10))
  full = jax.jit(model.apply)(v, jnp.asarray(ids))
  want = ref.forward(stored, ids[0], _cfg(gg.config, kv_bits=bits, kv_key_group=group,
                                          kv_key_requant=requant))
  np.testing.assert_allclose(full[0], want, rtol=2e-4, atol=2e-4)
  per_token = ref.forward(stored, ids[0], _cfg(gg.config, kv_bits=bits))
  assert np.abs(want - per_token).max() > 1e-4  # the key granularity shows
  # prefill 5 (one finished group, two keys in float), then one token at a time
  cache = llama.init_cache(gg.config, 1, 12, kv_bits=bits, kv_key_group=group)
  logits, cache = jax.jit(model.apply)(v, jnp.asarray(ids[:, :5]), cache)
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-4, atol=1e-4)
  step = jax.jit(lambda c, tok: model.apply(v, tok, c))
  for t in range(5, 10):
    logits, cache = step(cache, jnp.asarray(ids[:, t:t + 1]))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
  assert step._cache_size() == 1
  assert cache.k_scale.shape == (gg.config.num_layers, 1, 4, gg.config.num_kv_heads,
                                 gg.config.head_dim)
  assert int(jnp.abs(kv_quant.read_codes(cache.k)).max()) <= 2 ** (bits - 1) - 1
  # the same cache from one 10-token prefill
  empty = llama.init_cache(gg.config, 1, 12, kv_bits=bits, kv_key_group=group)
  _, whole = jax.jit(model.apply)(v, jnp.asarray(ids), empty)
  deq = lambda c: kv_quant.dequantize_key_groups(c.k[0], c.k_scale[0], group)[:, :9]
  np.testing.assert_allclose(deq(whole), deq(cache), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(whole.k_resid[:, :, :1], cache.k_resid[:, :, :1], rtol=1e-5,
                             atol=1e-5)
  if requant:  # the unfinished group's codes are stored too, and differ from float reads
    last = lambda c: kv_quant.dequantize_key_groups(c.k[0], c.k_scale[0], group)[:, 9]
    np.testing.assert_allclose(last(whole), last(cache), rtol=1e-5, atol=1e-5)
    floats = ref.forward(stored, ids[0], _cfg(gg.config, kv_bits=bits, kv_key_group=group))
    assert np.abs(want - floats).max() > 1e-4
  with pytest.raises(ValueError, match="the cache has kv_key_group=0 but the model"):
    model.apply(v, jnp.asarray(ids[:, :1]), llama.init_cache(gg.config, 1, 4, kv_bits=bits))


def test_bad_key_group_is_refused():
  c = llama.LlamaConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, intermediate_size=8)
  with pytest.raises(ValueError, match="kv_key_group=-1 must be an int >= 0"):
    llama.init_cache(c, 1, 4, kv_bits=8, kv_key_group=-1)
  with pytest.raises(ValueError, match="kv_key_group=4 needs a quantized cache"):
    llama.init_cache(c, 1, 4, kv_key_group=4)
  model = llama.Llama(c, kv_bits=4, kv_key_requant=True)
  with pytest.raises(ValueError, match="kv_key_requant=True needs per-channel keys"):
    model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
