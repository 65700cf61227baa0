"""GGUF export of a jaxquant-quantized tiny Llama: Q8_0 and Q4_0 blocks hold the same
codes and (fp16) scales, the file loads back, and unexportable specs are refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from experiments.pretrained import gguf_export, gguf_llama
from tests.experiments.pretrained import gguf_fixtures as fx

Q8 = jq.QuantSpec(bits=8, granularity="group", group_size=32)
Q4 = jq.QuantSpec(bits=4, granularity="group", group_size=32, full_range=True)


def _parse(raw, qtype_name, n, k):
  """(codes [n, k], fp16 scales [n, k/32]) of raw GGML bytes, from ggml-common.h's layout
  (written here, not taken from gguf.quants)."""
  g = k // 32
  size = 34 if qtype_name == "Q8_0" else 18
  b = np.asarray(raw, np.uint8).reshape(n, g, size)
  d = b[:, :, :2].copy().view(np.float16)[..., 0]
  if qtype_name == "Q8_0":
    codes = b[:, :, 2:].view(np.int8).astype(np.int32)
  else:
    lo, hi = b[:, :, 2:] & 0x0F, b[:, :, 2:] >> 4
    codes = np.concatenate([lo, hi], axis=-1).astype(np.int32) - 8
  return codes.reshape(n, k), d


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
  d = tmp_path_factory.mktemp("export")
  src = str(d / "src.gguf")
  fx.write_gguf(src)
  model, params, gg = gguf_llama.load(src)
  # value stays float, to check that float layers are written as F32.
  rules = [jq.Rule(r"block_\d+/mlp/.*", weight=Q4),
           jq.Rule(r"block_\d+/attn/(query|key|out)", weight=Q8),
           jq.Rule("token_embed", weight=Q8)]
  smodel, svars = jq.convert(jq.quantize_model(model, rules), {"params": params},
                             jnp.zeros((1, 4), jnp.int32))
  out = str(d / "out.gguf")
  gguf_export.export(out, gg, svars["params"])
  return gg, smodel, svars, out


def test_exported_blocks_hold_the_same_codes_and_scales(quantized):
  import gguf
  gg, _, svars, out = quantized
  reader = gguf.GGUFReader(out)
  tensors = {t.name: t for t in reader.tensors}
  c = gg.config
  cases = [("blk.0.attn_q.weight", ("block_0", "attn", "query"), c.num_heads, "Q8_0"),
           ("blk.0.attn_k.weight", ("block_0", "attn", "key"), c.num_kv_heads, "Q8_0"),
           ("blk.1.attn_output.weight", ("block_1", "attn", "out"), None, "Q8_0"),
           ("blk.0.ffn_down.weight", ("block_0", "mlp", "down"), None, "Q4_0"),
           ("blk.1.ffn_gate.weight", ("block_1", "mlp", "gate"), None, "Q4_0")]
  for name, path, heads, kind in cases:
    t = tensors[name]
    assert t.tensor_type.name == kind
    q = svars["params"][path[0]][path[1]][path[2]]["kernel"].unpacked()
    want_codes, want_scale = np.asarray(q.values), np.asarray(q.scale)
    if tuple(q.contracting) == (0,):  # stored [K, N]; GGUF rows are [N, K]
      want_codes, want_scale = want_codes.T, want_scale.T
    if heads:
      want_codes = gguf_llama.permute_rope_rows(want_codes, heads)
      want_scale = gguf_llama.permute_rope_rows(want_scale, heads)
    n, k = want_codes.shape
    codes, scale = _parse(t.data, kind, n, k)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scale, want_scale.astype(np.float16))
  emb = tensors["token_embd.weight"]
  q = svars["params"]["token_embed"]["embedding"].unpacked()
  codes, scale = _parse(emb.data, "Q8_0", *q.values.shape)
  np.testing.assert_array_equal(codes, np.asarray(q.values))
  assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
  assert tensors["blk.0.attn_v.weight"].tensor_type.name == "F32"  # float layers stay F32


def test_exported_file_loads_back_as_the_same_model(quantized):
  gg, smodel, svars, out = quantized
  model2, params2, gg2 = gguf_llama.load(out)
  assert gg2.config == gg.config and gg2.metadata["tokenizer.ggml.tokens"] == \
      gg.metadata["tokenizer.ggml.tokens"]
  ids = jnp.asarray(np.random.default_rng(0).integers(0, gg.config.vocab_size, (1, 8)))
  a = jax.jit(smodel.apply)(svars, ids)
  b = jax.jit(model2.apply)({"params": params2}, ids)
  np.testing.assert_allclose(a, b, rtol=5e-3, atol=5e-3)  # the scales went through fp16


def test_unexportable_spec_is_refused(tmp_path):
  src = str(tmp_path / "src.gguf")
  fx.write_gguf(src)
  model, params, gg = gguf_llama.load(src)
  rules = [jq.Rule(r"block_\d+/mlp/up", weight=jq.QuantSpec(bits=8))]  # per channel
  _, svars = jq.convert(jq.quantize_model(model, rules), {"params": params},
                        jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="blk.0.ffn_up.weight: spec .* group_size=32"):
    gguf_export.export(str(tmp_path / "out.gguf"), gg, svars["params"])
  assert not (tmp_path / "out.gguf").exists()
