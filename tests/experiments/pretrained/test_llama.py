"""The llama GGUF loader, the HF-directory round trip and the Flax Llama: a tiny random
model written with `gguf`'s writer against the numpy reference (llama.cpp's convention),
the loader's refusals, the KV cache, and a real SmolLM2 block and tokenizer."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import kv_quant, llama
from experiments.pretrained import gguf_llama, llama_hf
from tests.experiments.pretrained import gguf_fixtures as fx
from tests.experiments.pretrained import llama_np_reference as ref


def _cfg(c):
  return {"heads": c.num_heads, "kv_heads": c.num_kv_heads, "eps": c.rms_norm_eps,
          "theta": c.rope_theta, "layers": c.num_layers}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  stored = fx.write_gguf(path, q8_names=("blk.1.ffn_up.weight",))
  return path, stored


def test_tiny_gguf_matches_numpy_reference(tiny):
  path, stored = tiny
  model, params, gg = gguf_llama.load(path)
  assert gg.config == llama.LlamaConfig(
      vocab_size=len(fx.tiny_vocab()[0]), hidden_size=fx.D, num_layers=fx.L, num_heads=fx.H,
      num_kv_heads=fx.HKV, intermediate_size=fx.F, rms_norm_eps=float(np.float32(1e-5)),
      rope_theta=10000.0, max_position=fx.CTX, tie_embeddings=True)
  assert gg.tensor_type("blk.1.ffn_up.weight") == "Q8_0"
  ids = np.random.default_rng(1).integers(0, gg.config.vocab_size, size=(2, 11))
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
  for b in range(2):
    want = ref.forward(stored, ids[b], _cfg(gg.config))
    np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-4)
    assert ref.perplexity(got[b].astype(np.float64), ids[b]) == pytest.approx(
        ref.perplexity(want, ids[b]), rel=1e-4)


def test_rope_row_permutation_round_trips():
  w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  p = gguf_llama.permute_rope_rows(w, 2)  # per head of 4 rows: HF rows 0,2,1,3 interleave
  np.testing.assert_array_equal(p[:4, 0], w[[0, 2, 1, 3], 0])
  np.testing.assert_array_equal(gguf_llama.unpermute_rope_rows(p, 2), w)


def test_hf_directory_round_trip(tiny, tmp_path):
  path, _ = tiny
  model, params, gg = gguf_llama.load(path)
  llama_hf.save_dir(str(tmp_path), gg.config, params, gg.tokenizer())
  model2, params2, tok2 = llama_hf.load_dir(str(tmp_path))
  assert model2.config == gg.config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  assert tok2.encode("the king and queen").ids == gg.tokenizer().encode("the king and queen").ids
  from safetensors.numpy import load_file
  t = load_file(str(tmp_path / "model.safetensors"))
  # HF q_proj rows are the GGUF rows un-permuted (what llama.cpp's converter permutes).
  np.testing.assert_array_equal(
      gguf_llama.permute_rope_rows(t["model.layers.0.self_attn.q_proj.weight"], fx.H),
      gg.tensor("blk.0.attn_q.weight"))
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1"):
    llama_hf.params_from_tensors({k: v for k, v in t.items() if "layers.1." not in k},
                                 gg.config)


def _patch_tensor_type(path, name, type_id):
  """Overwrites the GGML type id in the tensor-info record of `name`."""
  data = bytearray(open(path, "rb").read())
  key = len(name).to_bytes(8, "little") + name.encode()
  at = data.index(key) + len(key)
  n_dims = int.from_bytes(data[at:at + 4], "little")
  at += 4 + 8 * n_dims
  data[at:at + 4] = type_id.to_bytes(4, "little")
  open(path, "wb").write(bytes(data))


def test_loader_refusals(tmp_path):
  p = str(tmp_path / "arch.gguf")
  fx.write_gguf(p, arch="gpt2")
  with pytest.raises(gguf_llama.GGUFError, match="architecture='gpt2'.*only 'llama'"):
    gguf_llama.LlamaGGUF(p)

  p = str(tmp_path / "missing.gguf")
  t = fx.random_tensors(len(fx.tiny_vocab()[0]))
  del t["blk.1.attn_v.weight"]
  fx.write_gguf(p, t)
  with pytest.raises(gguf_llama.GGUFError, match=r"missing tensor.*blk\.1\.attn_v\.weight"):
    gguf_llama.LlamaGGUF(p)

  # An unknown type id (no GGML type has 200) in a well-formed file.
  p = str(tmp_path / "unknown.gguf")
  fx.write_gguf(p)
  _patch_tensor_type(p, "blk.0.attn_q.weight", 200)
  with pytest.raises(gguf_llama.GGUFError, match="unknown GGML tensor type"):
    gguf_llama.LlamaGGUF(p)

  p = str(tmp_path / "truncated.gguf")
  fx.write_gguf(p)
  size = os.path.getsize(p)
  with open(p, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(gguf_llama.GGUFError, match="truncated"):
    gguf_llama.LlamaGGUF(p)


def test_unsupported_tensor_type_is_refused(tmp_path):
  import gguf
  vocab = len(fx.tiny_vocab()[0])
  t = fx.random_tensors(vocab)
  # A type gguf knows but this loader does not dequantize: TQ2_0, whose blocks hold 256
  # values in 66 bytes.
  t["extra.weight"] = np.zeros((2, 256), np.float32)
  raw = {"extra.weight": (np.zeros((2, 66), np.uint8), gguf.GGMLQuantizationType.TQ2_0)}
  p = str(tmp_path / "tq2.gguf")
  fx.write_gguf(p, t, raw=raw)
  with pytest.raises(gguf_llama.GGUFError, match="'extra.weight' has GGML type TQ2_0.*supported"):
    gguf_llama.LlamaGGUF(p)


def test_bad_shapes_and_config_are_refused(tmp_path):
  t = fx.random_tensors(len(fx.tiny_vocab()[0]))
  t["blk.0.attn_k.weight"] = np.zeros((fx.D, fx.D), np.float32)  # metadata says 2 kv heads
  p = str(tmp_path / "shape.gguf")
  fx.write_gguf(p, t)
  with pytest.raises(gguf_llama.GGUFError, match=r"attn_k.weight' has shape \(32, 32\)"):
    gguf_llama.LlamaGGUF(p)
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
    llama.LlamaConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=4,
                      num_kv_heads=3, intermediate_size=8)
  with pytest.raises(gguf_llama.GGUFError, match="no such file"):
    gguf_llama.LlamaGGUF(str(tmp_path / "nope.gguf"))


def test_kv_cache_decode_matches_full_forward_and_compiles_once(tiny):
  path, _ = tiny
  model, params, gg = gguf_llama.load(path)
  v = {"params": params}
  ids = jnp.asarray(np.random.default_rng(2).integers(0, gg.config.vocab_size, (1, 9)))
  full = jax.jit(model.apply)(v, ids)
  cache = llama.init_cache(gg.config, 1, 16)
  logits, cache = jax.jit(model.apply)(v, ids[:, :4], cache)
  np.testing.assert_allclose(logits, full[:, :4], rtol=1e-5, atol=1e-5)
  step = jax.jit(lambda c, tok: model.apply(v, tok, c))
  for t in range(4, 9):
    logits, cache = step(cache, ids[:, t:t + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
  assert int(cache.length) == 9
  assert step._cache_size() == 1  # one compile for every decode step


# 4-bit codes in the cache (against numpy, prefill then decode, within +-7) are also the
# default case of test_kv_quant.py::test_tiny_llama_channel_keys_against_numpy_prefill_and_decode:
# the 4-bit case here runs with the slow tests.
@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=pytest.mark.slow)])
def test_quantized_kv_cache_against_numpy_and_through_the_cache(tiny, bits):
  path, stored = tiny
  model, params, gg = gguf_llama.load(path)
  model = model.clone(kv_bits=bits)
  v = {"params": params}
  ids = np.random.default_rng(3).integers(0, gg.config.vocab_size, (1, 9))
  full = jax.jit(model.apply)(v, jnp.asarray(ids))
  want = ref.forward(stored, ids[0], dict(_cfg(gg.config), kv_bits=bits))
  np.testing.assert_allclose(full[0], want, rtol=2e-4, atol=2e-4)
  float_logits = ref.forward(stored, ids[0], _cfg(gg.config))
  assert np.abs(want - float_logits).max() > 1e-4  # the quantization shows
  cache = llama.init_cache(gg.config, 1, 12, kv_bits=bits)
  logits, cache = jax.jit(model.apply)(v, jnp.asarray(ids[:, :5]), cache)
  step = jax.jit(lambda c, tok: model.apply(v, tok, c))
  for t in range(5, 9):
    logits, cache = step(cache, jnp.asarray(ids[:, t:t + 1]))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
  codes = kv_quant.read_codes(cache.k)
  assert cache.k.dtype == (jnp.uint8 if bits == 4 else jnp.int8)
  assert cache.k_scale.shape == codes.shape[:-1] + (1,)
  assert int(jnp.abs(codes).max()) <= 2 ** (bits - 1) - 1
  assert step._cache_size() == 1
  with pytest.raises(ValueError, match="the cache is float but the model has kv_bits"):
    model.apply(v, jnp.asarray(ids[:, :1]), llama.init_cache(gg.config, 1, 4))


def test_tokenizer_of_tiny_gguf(tiny):
  tok = gguf_llama.LlamaGGUF(tiny[0]).tokenizer()
  enc = tok.encode("<|im_start|>the king 42")
  assert enc.tokens == ["<|im_start|>", "the", "Ġking", "Ġ", "4", "2"]
  assert tok.decode(enc.ids, skip_special_tokens=True) == "the king 42"


def test_numpy_reference_imports_no_jax():
  code = ("import sys; import tests.experiments.pretrained.llama_np_reference; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')]; "
          "assert not bad, bad")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def real():
  try:
    return gguf_llama.LlamaGGUF()
  except ImportError as e:
    pytest.skip(str(e))


def _tempest_lines(n):
  from experiments.pretrained import shakespeare
  try:
    text = shakespeare.calibration_text()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  lines = [ln for ln in text.splitlines() if len(ln) > 20 and ln.isascii()]
  return lines[:n]


def _reference_bpe(text, merges, vocab):
  """GPT-2 byte-level BPE from its definition, for ASCII text: digits split one by one
  (the 'smollm' pre-tokenizer), GPT-2's split regex, then lowest-rank merges first."""
  chars = fx.byte_chars()
  rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
  pat = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
  ids = []
  for chunk in re.split(r"([0-9])", text):
    for piece in pat.findall(chunk):
      word = [chars[b] for b in piece.encode()]
      while len(word) > 1:
        pairs = [(rank.get((a, b), 1 << 30), j) for j, (a, b) in enumerate(zip(word, word[1:]))]
        best, j = min(pairs)
        if best == 1 << 30:
          break
        word = word[:j] + [word[j] + word[j + 1]] + word[j + 2:]
      ids += [vocab[w] for w in word]
  return ids


def test_real_tokenizer_matches_reference_bpe_on_shakespeare(real):
  lines = _tempest_lines(60) + ["In 1611, 3 ships sailed; it's 42 degrees."]
  tok = real.tokenizer()
  merges = real.metadata["tokenizer.ggml.merges"]
  vocab = {t: i for i, t in enumerate(real.metadata["tokenizer.ggml.tokens"])}
  text = "\n".join(lines)
  assert tok.encode(text).ids == _reference_bpe(text, merges, vocab)
  assert tok.decode(tok.encode(text).ids) == text
  assert tok.encode("<|im_start|>user").ids[0] == vocab["<|im_start|>"]


def test_real_smollm2_block_matches_numpy(real):
  c = real.config
  t = real.tensors(["token_embd.weight"] + [n for n in real.expected_shapes()
                                            if n.startswith("blk.0.")])
  ids = real.tokenizer().encode(" ".join(_tempest_lines(3))).ids[:48]
  x = t["token_embd.weight"][np.asarray(ids)]
  want = ref.block(t, 0, x.astype(np.float64), _cfg(c))
  block = llama.LlamaBlock(c)
  pos = jnp.arange(len(ids))[None]
  got, _ = jax.jit(block.apply)({"params": gguf_llama.block_params(t, c, 0)}, jnp.asarray(x)[None], pos)
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=2e-4)


@pytest.mark.slow
def test_real_smollm2_perplexity_matches_numpy(real):
  """The whole model on one 512-token window of the evaluation split: the target of
  issue 24 is 0.5%; float32 against float64 lands far inside it."""
  from experiments.pretrained import perplexity, shakespeare
  try:
    text = shakespeare.evaluation_text(max_chars=4000)
  except FileNotFoundError as e:
    pytest.skip(str(e))
  ids = np.asarray(real.tokenizer().encode(text).ids[:512])
  t = real.tensors()
  model = llama.Llama(real.config)
  logits = jax.jit(model.apply)({"params": gguf_llama.params_from_gguf(t, real.config)},
                                jnp.asarray(ids)[None])
  got = float(np.exp(perplexity.token_nll(np.asarray(logits), ids[None]).mean()))
  want = ref.perplexity(ref.forward(t, ids, _cfg(real.config)), ids)
  assert 5 < want < 100  # a sensible LM on English text
  assert got == pytest.approx(want, rel=1e-3)
