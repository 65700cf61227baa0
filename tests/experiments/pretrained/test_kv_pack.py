"""Int4 KV-cache codes packed two per byte: the packing against numpy on every code, the
cache's buffers and bytes against their closed forms, and the tiny Llama's logits with
the packed cache against the unpacked (one code per int8) cache, exactly."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import kv_quant, llama
from experiments.pretrained import gguf_llama
from tests.experiments.pretrained import gguf_fixtures as fx


def test_pack_round_trips_every_int4_code_pair_against_numpy():
  pairs = np.array(list(itertools.product(range(-8, 8), repeat=2)), np.int8)  # [256, 2]
  codes = pairs.reshape(2, 32, 4, 2)  # last axis D = 8 holds 4 pairs
  packed = np.asarray(kv_quant.pack_int4(jnp.asarray(codes)))
  assert packed.dtype == np.uint8 and packed.shape == (2, 32, 4, 1)
  flat = codes.reshape(-1, 2).astype(np.int64)
  want = (flat[:, 0] % 16) + 16 * (flat[:, 1] % 16)  # low nibble first, two's complement
  np.testing.assert_array_equal(packed.reshape(-1), want)
  assert sorted(packed.reshape(-1).tolist()) == list(range(256))  # every byte once
  back = np.asarray(kv_quant.unpack_int4(jnp.asarray(packed)))
  assert back.dtype == np.int8
  np.testing.assert_array_equal(back, codes)


def test_pack_refuses_odd_width_and_unpack_non_uint8():
  with pytest.raises(ValueError, match="odd length 5"):
    kv_quant.pack_int4(jnp.zeros((2, 5), jnp.int8))
  with pytest.raises(ValueError, match="expected uint8"):
    kv_quant.unpack_int4(jnp.zeros((2, 4), jnp.int8))


CFG = llama.LlamaConfig(vocab_size=8, hidden_size=32, num_layers=3, num_heads=4,
                        num_kv_heads=2, intermediate_size=8)


@pytest.mark.parametrize("bits,group", [(0, 0), (8, 0), (4, 0), (8, 4), (4, 4)])
def test_cache_buffers_and_bytes_per_token_against_closed_form(bits, group):
  batch, size = 2, 12
  cache = llama.init_cache(CFG, batch, size, kv_bits=bits, kv_key_group=group)
  n_layers, heads, d = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
  stored_d = d // 2 if bits == 4 else d
  assert cache.k.shape == cache.v.shape == (n_layers, batch, size, heads, stored_d)
  assert cache.k.dtype == {0: jnp.float32, 8: jnp.int8, 4: jnp.uint8}[bits]
  got = llama.cache_bytes(cache)
  if not bits:
    want = 2 * n_layers * heads * d * 4
  else:  # codes of k and v, then v's scale per token, k's per token or per channel / G
    k_scale = 4 * d / group if group else 4
    want = n_layers * heads * (2 * d * bits / 8 + 4 + k_scale)
  assert got["per_token"] == want
  assert got["fixed"] == (n_layers * group * heads * d * 4 if group else 0)
  if bits == 4:  # half the int8 codes, the same scales
    int8 = llama.cache_bytes(llama.init_cache(CFG, batch, size, kv_bits=8,
                                              kv_key_group=group))["per_token"]
    assert int8 - got["per_token"] == n_layers * heads * d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  fx.write_gguf(path)
  return path


@pytest.mark.parametrize("group,requant", [
    (3, False), pytest.param(0, False, marks=pytest.mark.slow),
    pytest.param(3, True, marks=pytest.mark.slow)])
def test_tiny_llama_packed_cache_equals_unpacked_exactly(tiny, group, requant):
  """Prefill 5 tokens, then decode 5 one at a time: the packed int4 cache and the one
  holding a code per int8 give bit-identical logits and the same codes."""
  model, params, gg = gguf_llama.load(tiny)
  model = model.clone(kv_bits=4, kv_key_group=group, kv_key_requant=requant)
  v = {"params": params}
  ids = jnp.asarray(np.random.default_rng(5).integers(0, gg.config.vocab_size, (2, 10)))
  prefill = jax.jit(model.apply)
  step = jax.jit(lambda c, tok: model.apply(v, tok, c))
  caches, logits = {}, {}
  for pack in (True, False):
    cache = llama.init_cache(gg.config, 2, 12, kv_bits=4, kv_key_group=group, pack=pack)
    out, cache = prefill(v, ids[:, :5], cache)
    outs = [out]
    for t in range(5, 10):
      out, cache = step(cache, ids[:, t:t + 1])
      outs.append(out)
    caches[pack], logits[pack] = cache, np.concatenate([np.asarray(o) for o in outs], 1)
  assert step._cache_size() == 2  # once per cache layout: decode compiles once for each
  np.testing.assert_array_equal(logits[True], logits[False])
  packed, unpacked = caches[True], caches[False]
  assert packed.k.dtype == packed.v.dtype == jnp.uint8
  assert packed.k.shape[-1] * 2 == unpacked.k.shape[-1] == gg.config.head_dim
  for a, b in ((packed.k, unpacked.k), (packed.v, unpacked.v)):
    np.testing.assert_array_equal(np.asarray(kv_quant.unpack_int4(a)), np.asarray(b))
  assert np.abs(np.asarray(unpacked.v)).max() > 0  # codes were written
