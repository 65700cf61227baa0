"""Small llama GGUF files written with `gguf`'s writer, for the loader and model tests."""
import numpy as np

D, H, HKV, F, L, CTX = 32, 4, 2, 64, 2, 64
WORDS = ["the", "king", "queen", "of", "and", "to", "be", "or", "not", "that", "is"]


def byte_chars():
  """GPT-2's byte -> printable character table (printable latin-1 bytes map to
  themselves, the other 68 to U+0100 onwards)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def tiny_vocab():
  """(tokens, merges, types): 2 control tokens, 256 byte tokens, merged words."""
  chars = byte_chars()
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chars[b] for b in range(256)]
  merges = []
  for w in WORDS:  # the word's merges left to right, then the space joins it
    cur = w[0]
    for ch in w[1:]:
      if cur + ch not in tokens:
        merges.append(f"{cur} {ch}")
        tokens.append(cur + ch)
      cur += ch
    merges.append(f"Ġ {w}")
    tokens.append("Ġ" + w)
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  return tokens, merges, types


def random_tensors(vocab, seed=0, layers=L):
  """GGUF-named float32 tensors of a random tiny llama (numpy `[out, in]` shapes)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (rng.normal(size=s) * 0.3).astype(np.float32)
  dh = D // H
  t = {"token_embd.weight": r(vocab, D), "output_norm.weight": 1 + r(D)}
  for i in range(layers):
    p = f"blk.{i}."
    t.update({p + "attn_norm.weight": 1 + r(D), p + "attn_q.weight": r(D, D),
              p + "attn_k.weight": r(HKV * dh, D), p + "attn_v.weight": r(HKV * dh, D),
              p + "attn_output.weight": r(D, D), p + "ffn_norm.weight": 1 + r(D),
              p + "ffn_gate.weight": r(F, D), p + "ffn_up.weight": r(F, D),
              p + "ffn_down.weight": r(D, F)})
  return t


def write_gguf(path, tensors=None, *, arch="llama", q8_names=(), raw=None, add_bos=False,
               layers=L, chat_template=None):
  """Writes a tiny llama GGUF; returns its float tensors (as stored, after Q8_0 where
  asked). `raw`: {name: (uint8 bytes array, GGMLQuantizationType)} written as is."""
  import gguf
  from gguf import quants
  tokens, merges, types = tiny_vocab()
  if tensors is None:
    tensors = random_tensors(len(tokens), layers=layers)
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(layers)
  w.add_context_length(CTX)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(HKV)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(10000.0)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(add_bos)
  if chat_template is not None:
    w.add_chat_template(chat_template)
  stored = {}
  for name, value in tensors.items():
    if raw and name in raw:
      data, qtype = raw[name]
      w.add_tensor(name, data, raw_dtype=qtype)
    elif name in q8_names:
      q = quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      stored[name] = quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(value.shape)
    else:
      w.add_tensor(name, value)
      stored[name] = value
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored
