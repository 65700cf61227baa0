"""A jaxquant-quantized Llama written back as a GGUF file llama.cpp's tools read.

Two GGML block types hold jaxquant codes exactly (ggml-common.h gives their layouts):

  Q8_0  blocks of 32 along K: an fp16 scale d, then 32 int8 codes q; x = d · q.
        From `QuantSpec(bits=8, granularity='group', group_size=32)` (symmetric).
  Q4_0  blocks of 32 along K: an fp16 scale d, then 16 bytes; byte j holds code j + 8 in
        its low nibble and code j + 16 + 8 in its high nibble; x = d · (nibble − 8).
        From a symmetric 4-bit spec in groups of 32 (`full_range=True`, codes −8..7, or
        the restricted ±7 grid).

The codes are copied, not requantized; the float32 group scales become fp16 (GGUF's
scale type), so reading the file back gives the same codes and the fp16 of the same
scales. Dense kernels `[K, N]` become GGUF `[N, K]` rows (blocks along K), Q and K
projections get llama.cpp's interleaved RoPE row order back (`permute_rope_rows`, rows
with their scales), and float tensors (RMSNorm scales, unquantized layers) are F32. A
quantized tensor of any other spec is refused with an error naming it and the specs
that export. The metadata (config, tokenizer, chat template) is that of the source GGUF.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from experiments.models.llama import LlamaConfig
from experiments.pretrained.gguf_llama import LlamaGGUF, permute_rope_rows

BLOCK = 32


def _gguf_type(q, name: str):
  """The GGML type of a QTensor, or a ValueError naming the tensor."""
  from gguf import GGMLQuantizationType as T  # pylint: disable=import-outside-toplevel
  s = q.spec
  ok = (s is not None and s.format == "int" and s.symmetric and s.granularity == "group"
        and s.group_size == BLOCK and q.zero_point is None)
  if ok and s.bits == 8 and not s.full_range:
    return T.Q8_0
  if ok and s.bits == 4:
    return T.Q4_0
  raise ValueError(f"{name}: spec {s} has no GGUF block type here; export needs "
                   "QuantSpec(bits=8, granularity='group', group_size=32) for Q8_0 or "
                   "QuantSpec(bits=4, granularity='group', group_size=32, full_range=True) "
                   "for Q4_0 (symmetric)")


def blocks(codes_NxK: np.ndarray, scale_NxG: np.ndarray, qtype) -> np.ndarray:
  """GGML Q8_0 / Q4_0 bytes `[N, G · block bytes]` of int codes and per-block scales."""
  from gguf import GGMLQuantizationType as T  # pylint: disable=import-outside-toplevel
  n, k = codes_NxK.shape
  g = k // BLOCK
  d = np.ascontiguousarray(scale_NxG, np.float16).view(np.uint8).reshape(n, g, 2)
  c = np.ascontiguousarray(codes_NxK, np.int8).reshape(n, g, BLOCK)
  if qtype == T.Q8_0:
    body = c.view(np.uint8)
  else:
    u = (c.astype(np.int16) + 8).astype(np.uint8)  # 0..15
    body = u[:, :, :BLOCK // 2] | (u[:, :, BLOCK // 2:] << 4)
  return np.concatenate([d, body], axis=-1).reshape(n, -1)


def _codes_and_scales(q, name: str):
  """(int codes `[N, K]`, scales `[N, K / 32]`) of a 2-D QTensor grouped along K, whichever
  way round it is stored (`contracting` names its K axis)."""
  q = q.unpacked()
  v, s = np.asarray(q.values), np.asarray(q.scale, np.float32)
  k_axis = tuple(q.contracting)
  if v.ndim != 2 or k_axis not in ((0,), (1,)):
    raise ValueError(f"{name}: a {v.ndim}-D QTensor contracting over {k_axis}; only 2-D "
                     "weights export")
  return (v.T, s.T) if k_axis == (0,) else (v, s)


def _entry(name, value, *, transpose=False, rope_heads=None):
  """(name, array, raw GGML type or None) of one tensor."""
  if hasattr(value, "spec"):  # a QTensor
    qtype = _gguf_type(value, name)
    codes, scales = _codes_and_scales(value, name)
    if rope_heads:
      codes, scales = permute_rope_rows(codes, rope_heads), permute_rope_rows(scales, rope_heads)
    return name, blocks(codes, scales, qtype), qtype
  w = np.asarray(value, np.float32)
  if transpose:
    w = w.T
  if rope_heads:
    w = permute_rope_rows(w, rope_heads)
  return name, np.ascontiguousarray(w), None


def gguf_entries(params: Dict[str, Any], c: LlamaConfig):
  """Every GGUF tensor of a (serving) `Llama` params tree, in file order."""
  out = [_entry("token_embd.weight", params["token_embed"]["embedding"]),
         _entry("output_norm.weight", params["final_norm"]["scale"])]
  if not c.tie_embeddings:
    out.append(_entry("output.weight", params["lm_head"]["kernel"], transpose=True))
  for i in range(c.num_layers):
    b, p = params[f"block_{i}"], f"blk.{i}."
    out += [
        _entry(p + "attn_norm.weight", b["attn_norm"]["scale"]),
        _entry(p + "attn_q.weight", b["attn"]["query"]["kernel"], transpose=True,
               rope_heads=c.num_heads),
        _entry(p + "attn_k.weight", b["attn"]["key"]["kernel"], transpose=True,
               rope_heads=c.num_kv_heads),
        _entry(p + "attn_v.weight", b["attn"]["value"]["kernel"], transpose=True),
        _entry(p + "attn_output.weight", b["attn"]["out"]["kernel"], transpose=True),
        _entry(p + "ffn_norm.weight", b["mlp_norm"]["scale"]),
        _entry(p + "ffn_gate.weight", b["mlp"]["gate"]["kernel"], transpose=True),
        _entry(p + "ffn_up.weight", b["mlp"]["up"]["kernel"], transpose=True),
        _entry(p + "ffn_down.weight", b["mlp"]["down"]["kernel"], transpose=True),
    ]
  return out


def export(path: str, source: LlamaGGUF, params: Dict[str, Any]) -> None:
  """Writes `params` (float or jaxquant-serving) as a llama GGUF at `path`, with the
  config, tokenizer and chat template of `source`."""
  import gguf  # pylint: disable=import-outside-toplevel
  c, m = source.config, source.metadata
  entries = gguf_entries(params, c)  # refuses before anything is written
  w = gguf.GGUFWriter(path, "llama")
  w.add_name(str(m.get("general.name", "llama")) + " (jaxquant)")
  w.add_block_count(c.num_layers)
  w.add_context_length(c.max_position)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_theta)
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model(m["tokenizer.ggml.model"])
  w.add_tokenizer_pre(m.get("tokenizer.ggml.pre", "default"))
  w.add_token_list(list(m["tokenizer.ggml.tokens"]))
  w.add_token_merges(list(m["tokenizer.ggml.merges"]))
  if "tokenizer.ggml.token_type" in m:
    w.add_token_types([int(t) for t in m["tokenizer.ggml.token_type"]])
  for key, add in (("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                   ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
                   ("tokenizer.ggml.padding_token_id", w.add_pad_token_id)):
    if key in m:
      add(int(m[key]))
  w.add_add_bos_token(source.add_bos)
  if source.chat_template:
    w.add_chat_template(source.chat_template)
  for name, array, qtype in entries:
    if qtype is None:
      w.add_tensor(name, array)
    else:
      w.add_tensor(name, array, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
