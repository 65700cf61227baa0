"""A Llama-architecture decoder (Touvron et al. 2023) in Flax Linen, with a KV cache.

  h_0 = embed[ids]
  a   = h + o(attn(rope(q(n_1(h))), rope(k(n_1(h))), v(n_1(h))))     n = RMSNorm · scale
  h'  = a + down(silu(gate(n_2(a))) * up(n_2(a)))                   SwiGLU (Shazeer 2020)
  logits = n_f(h_L) · embedᵀ                                        tied embeddings

Attention is grouped-query (Ainslie et al. 2023): `num_heads` query heads share
`num_kv_heads` key/value heads, query head h reading kv head h // (num_heads/num_kv_heads).

RoPE (Su et al. 2021) here rotates the pairs (x[i], x[i + d/2]) of each head by
pos · base^(−2i/d): the "rotate half" layout of HF checkpoints. GGUF llama files hold the
Q and K rows permuted so that llama.cpp's interleaved pairs (x[2i], x[2i+1]) give the same
result; `experiments.pretrained.gguf_llama` undoes that permutation when it loads them.

Every weight is in a standard layer (`nn.Embed`, `nn.Dense` without bias, `nn.RMSNorm`),
so `jq.quantize_model` rules reach them by path:
  token_embed                                 (its `attend` is the tied output head)
  block_{i}/attn_norm, block_{i}/attn/{query,key,value,out}
  block_{i}/mlp_norm,  block_{i}/mlp/{gate,up,down}
  final_norm, [lm_head when the embeddings are not tied]

The cache (`KVCache`) has a fixed size, so a jitted decode step compiles once: keys and
values of T new tokens are written at `cache.length`, and every query attends to the
cached slots at positions ≤ its own.

KV-cache quantization (`kv_bits` 8 or 4): keys (after RoPE) and values are quantized on
write to symmetric integer codes, stored with float32 scales in the cache (int8 codes one
per byte, int4 codes packed two per uint8 along head_dim: `kv_quant.pack_int4`), and
unpacked and dequantized where attention reads them. Values have one scale per token and kv head.
Keys have the same (`kv_key_group=0`), or, with `kv_key_group=G`, one scale per channel
over each group of G consecutive tokens (KIVI), the group still being filled held in
float32 in the cache and read as float (or, with `kv_key_requant`, re-quantized with its
absmax so far at every write and read as codes); `experiments.models.kv_quant` says
exactly what each query reads.
Without a cache (perplexity), the same quantize-dequantize is applied to the keys and
values attention reads, so the numbers are those of a quantized cache. The packed int4
cache reads the same codes as one holding them one per int8 (`init_cache(...,
pack=False)`, kept as the reference layout), so its logits are bit-identical to that.

Online Hadamards (`hadamard=True`, for a QuaRot-rotated checkpoint, see
`experiments.pretrained.rotation`): queries and keys are multiplied per head by the
orthogonal Hadamard H_head_dim after RoPE (so the scores q·kᵀ are unchanged and the
cached keys are the rotated ones), and the input of `down` by H_intermediate_size (the
rotated checkpoint's `down` kernel holds Hᵀ·W, so the product is unchanged). The
Hadamards are `experiments.models.hadamard.apply` (Kronecker factors, no dense matrix).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models import hadamard as hadamard_lib
from experiments.models import kv_quant
from experiments.models.kv_quant import quantize_kv  # noqa: F401  (the per-token codes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Shape of a Llama decoder (GGUF `llama.*` metadata / HF `config.json`).

  Attributes:
    vocab_size, hidden_size, num_layers, intermediate_size: model size.
    num_heads, num_kv_heads: query heads and key/value heads (num_kv_heads divides
      num_heads); head_dim = hidden_size / num_heads.
    rms_norm_eps: epsilon of every RMSNorm. rope_theta: RoPE base frequency.
    max_position: longest context (positions the cache may hold).
    tie_embeddings: the output head is the token embedding (else a separate `lm_head`).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position: int = 2048
  tie_embeddings: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "intermediate_size", "max_position"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig: {name}={value!r} must be a positive int")
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must divide hidden_size="
                       f"{self.hidden_size} into an even head_dim (RoPE rotates pairs)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig: rms_norm_eps={self.rms_norm_eps} and rope_theta="
                       f"{self.rope_theta} must be positive")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_heads


class KVCache(NamedTuple):
  """Keys and values of every block, `[L, B, S, num_kv_heads, head_dim]`, and how many of
  the S slots are written (`length`, int32 scalar; the next token's position). A
  quantized cache holds codes in `k` / `v` (int8 `[L, B, S, Hkv, head_dim]` for 8 bits;
  for 4 bits uint8 `[L, B, S, Hkv, head_dim/2]`, two codes a byte, `kv_quant.pack_int4`)
  and their scales, `[L, B, S, Hkv, 1]`,
  in `k_scale` / `v_scale` (None for a float cache). With per-channel keys in groups of
  G tokens, `k_scale` is `[L, B, ceil(S/G), Hkv, head_dim]` and `k_resid`
  `[L, B, G, Hkv, head_dim]` holds the unfinished group's float keys (else None)."""
  k: jax.Array
  v: jax.Array
  length: jax.Array
  k_scale: Optional[jax.Array] = None
  v_scale: Optional[jax.Array] = None
  k_resid: Optional[jax.Array] = None


KV_BITS = (0, 4, 8)  # 0 = a float cache


def _check_kv(kv_bits, kv_key_group):
  if kv_bits not in KV_BITS:
    raise ValueError(f"kv_bits={kv_bits!r} must be one of {KV_BITS}")
  if not isinstance(kv_key_group, int) or isinstance(kv_key_group, bool) or kv_key_group < 0:
    raise ValueError(f"kv_key_group={kv_key_group!r} must be an int >= 0 (0 = keys per "
                     "token, G = keys per channel in groups of G tokens)")
  if kv_key_group and not kv_bits:
    raise ValueError(f"kv_key_group={kv_key_group} needs a quantized cache (kv_bits 8 or 4)")


def init_cache(config: LlamaConfig, batch: int, size: int, dtype=jnp.float32,
               kv_bits: int = 0, kv_key_group: int = 0, pack: bool = True) -> KVCache:
  """An empty cache of `size` slots (size ≤ config.max_position); codes and float32
  scales when `kv_bits` is 8 or 4, keys per channel in groups of `kv_key_group` tokens
  when that is > 0 (with a float residual of that many slots). 4-bit codes are packed
  two per uint8 along head_dim; `pack=False` keeps them one per int8 (the unpacked
  reference layout: the model reads either, with the same results)."""
  if not 0 < size <= config.max_position:
    raise ValueError(f"cache size={size} must be in 1..max_position={config.max_position}")
  _check_kv(kv_bits, kv_key_group)
  shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
  length = jnp.zeros((), jnp.int32)
  if not kv_bits:
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), length)
  scale_shape = shape[:-1] + (1,)
  k_scale, k_resid = jnp.zeros(scale_shape, jnp.float32), None
  if kv_key_group:
    n = kv_quant.num_key_groups(size, kv_key_group)
    k_scale = jnp.zeros(shape[:2] + (n,) + shape[3:], jnp.float32)
    k_resid = jnp.zeros(shape[:2] + (kv_key_group,) + shape[3:], dtype)
  code_dtype = jnp.int8
  if pack and kv_bits <= kv_quant.PACKED_BITS:  # head_dim is even (LlamaConfig checks)
    shape, code_dtype = shape[:-1] + (config.head_dim // 2,), jnp.uint8
  return KVCache(jnp.zeros(shape, code_dtype), jnp.zeros(shape, code_dtype), length,
                 k_scale, jnp.zeros(scale_shape, jnp.float32), k_resid)


def cache_bytes(cache: KVCache) -> dict:
  """Bytes the cache's arrays hold (their `nbytes`), per sequence of the batch:
  `per_token`, the codes and scales of one slot (k, v, k_scale, v_scale over B·S; with
  per-channel keys the group scales are spread over the slots they cover), and `fixed`,
  the float residual of the unfinished key group (0 without one)."""
  batch, size = cache.k.shape[1], cache.k.shape[2]
  slots = sum(a.nbytes for a in (cache.k, cache.v, cache.k_scale, cache.v_scale)
              if a is not None)
  fixed = 0 if cache.k_resid is None else cache.k_resid.nbytes
  return {"per_token": slots / (batch * size), "fixed": fixed / batch}


def rope(x_BxTxHxK: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[i], x[i + K/2]) by pos · theta^(−2i/K) (rotate-half layout)."""
  half = x_BxTxHxK.shape[-1] // 2
  inv_freq_I = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xI = pos_BxT.astype(jnp.float32)[:, :, None, None] * inv_freq_I[None, None, None, :]
  cos, sin = jnp.cos(angle_BxTx1xI), jnp.sin(angle_BxTx1xI)
  x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE, optionally reading/writing a cache.

  Module paths: `query`, `key`, `value`, `out` (Dense, no bias). `hadamard`: queries and
  keys times H_head_dim after RoPE (see the module docstring).
  """
  config: LlamaConfig
  kv_bits: int = 0
  hadamard: bool = False
  kv_key_group: int = 0
  kv_key_requant: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, kv=None):
    """Returns (output `[B, T, D]`, what to cache). `kv`: this block's cached
    `(k [B, S, Hkv, K], v, length, k_scale, v_scale, k_resid)`, or None to attend within
    x only."""
    c = self.config
    b, t, _ = x_BxTxD.shape
    hk, g, dh = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    bits, group = self.kv_bits, self.kv_key_group
    requant_bits = bits if self.kv_key_requant else 0
    q = nn.Dense(c.num_heads * dh, use_bias=False, name="query")(x_BxTxD)
    k = nn.Dense(hk * dh, use_bias=False, name="key")(x_BxTxD)
    v = nn.Dense(hk * dh, use_bias=False, name="value")(x_BxTxD)
    q_BxTxHxK = rope(q.reshape(b, t, c.num_heads, dh), pos_BxT, c.rope_theta)
    k_BxTxGxK = rope(k.reshape(b, t, hk, dh), pos_BxT, c.rope_theta)
    v_BxTxGxK = v.reshape(b, t, hk, dh)
    if self.hadamard:  # (q H)(k H)ᵀ = q kᵀ: the scores are unchanged
      q_BxTxHxK = hadamard_lib.apply(q_BxTxHxK, dh)
      k_BxTxGxK = hadamard_lib.apply(k_BxTxGxK, dh)
    own_keys = None  # per-channel keys: each query's own unfinished group, as it reads it
    if bits:
      v_codes, v_scale = quantize_kv(v_BxTxGxK, bits)
      if not group:
        k_codes, k_scale = quantize_kv(k_BxTxGxK, bits)
    if kv is None:
      keys, values, key_pos_S = k_BxTxGxK, v_BxTxGxK, jnp.arange(t)
      if bits:  # what a quantized cache would hand back
        values = v_codes.astype(jnp.float32) * v_scale
        if group:
          padded = jnp.pad(k_BxTxGxK, ((0, 0), (0, -t % group), (0, 0), (0, 0)))
          own_keys = kv_quant.own_group_keys(padded, pos_BxT, group, requant_bits)
          keys = kv_quant.fake_quant_key_groups(k_BxTxGxK, bits, group)
        else:
          keys = k_codes.astype(jnp.float32) * k_scale
      written = (keys, values, None, None, None)
    else:
      k_cache, v_cache, length, ks_cache, vs_cache, resid = kv
      put = lambda cache, new: jax.lax.dynamic_update_slice(
          cache, kv_quant.store_codes(new, cache), (0, length, 0, 0))
      read = kv_quant.read_codes  # int8 codes of a (possibly packed) buffer
      if bits and group:
        k_codes, k_scales, resid, (buf, start) = kv_quant.write_key_groups(
            k_cache, ks_cache, resid, length, k_BxTxGxK, bits, self.kv_key_requant)
        own_keys = kv_quant.own_group_keys(buf, pos_BxT - start, group, requant_bits)
        written = (k_codes, put(v_cache, v_codes), k_scales, put(vs_cache, v_scale), resid)
        keys = kv_quant.dequantize_key_groups(k_codes, k_scales, group)
        values = read(written[1]).astype(jnp.float32) * written[3]
      elif bits:
        written = (put(k_cache, k_codes), put(v_cache, v_codes), put(ks_cache, k_scale),
                   put(vs_cache, v_scale), None)
        keys = read(written[0]).astype(jnp.float32) * written[2]
        values = read(written[1]).astype(jnp.float32) * written[3]
      else:
        written = (put(k_cache, k_BxTxGxK), put(v_cache, v_BxTxGxK), None, None, None)
        keys, values = written[0], written[1]
      key_pos_S = jnp.arange(k_cache.shape[1])
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, hk, g, dh) / jnp.sqrt(jnp.float32(dh))
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, keys.astype(q.dtype))
    if own_keys is not None:
      own = jnp.einsum("btgrk,btigk->bgrti", q_BxTxGxRxK, own_keys.astype(q.dtype))
      scores = kv_quant.own_group_scores(scores, own, key_pos_S, pos_BxT, group)
    allowed_BxTxS = key_pos_S[None, None, :] <= pos_BxT[:, :, None]
    scores = jnp.where(allowed_BxTxS[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    ctx = jnp.einsum("bgrts,bsgk->btgrk", probs, values.astype(q.dtype))
    out = nn.Dense(c.hidden_size, use_bias=False, name="out")(ctx.reshape(b, t, -1))
    return out, written


class SwiGLU(nn.Module):
  """`down(silu(gate(x)) * up(x))`. Module paths: `gate`, `up`, `down` (Dense, no bias).
  `hadamard`: `down`'s input is multiplied by H_intermediate_size first."""
  config: LlamaConfig
  hadamard: bool = False

  @nn.compact
  def __call__(self, x_BxTxD):
    """Maps `[B, T, D]` to `[B, T, D]`."""
    c = self.config
    gate = nn.Dense(c.intermediate_size, use_bias=False, name="gate")(x_BxTxD)
    up = nn.Dense(c.intermediate_size, use_bias=False, name="up")(x_BxTxD)
    h = nn.silu(gate) * up
    if self.hadamard:
      h = hadamard_lib.apply(h, c.intermediate_size)
    return nn.Dense(c.hidden_size, use_bias=False, name="down")(h)


class LlamaBlock(nn.Module):
  """`a = x + attn(attn_norm(x)); a + mlp(mlp_norm(a))`.

  Module paths: `attn_norm`, `attn/...`, `mlp_norm`, `mlp/...`.
  """
  config: LlamaConfig
  kv_bits: int = 0
  hadamard: bool = False
  kv_key_group: int = 0
  kv_key_requant: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, kv=None):
    """Returns (new states `[B, T, D]`, (k, v) for the cache)."""
    eps = self.config.rms_norm_eps
    h = nn.RMSNorm(epsilon=eps, name="attn_norm")(x_BxTxD)
    a, written = Attention(self.config, self.kv_bits, self.hadamard, self.kv_key_group,
                           self.kv_key_requant, name="attn")(h, pos_BxT, kv)
    x_BxTxD = x_BxTxD + a
    h = nn.RMSNorm(epsilon=eps, name="mlp_norm")(x_BxTxD)
    return x_BxTxD + SwiGLU(self.config, self.hadamard, name="mlp")(h), written


class Llama(nn.Module):
  """Causal LM: token ids `[B, T]` to next-token logits `[B, T, vocab]`.

  `model.apply(v, ids)` runs a whole sequence (positions 0..T−1, no cache). With
  `cache=` it continues the cached sequence at `cache.length` and returns
  `(logits, updated cache)`; T new tokens must fit in the cache's free slots (the write
  is not checked inside jit: past the end it is clamped and overwrites the last slots).
  `kv_bits` (0, 8 or 4) quantizes the keys and values, `kv_key_group` > 0 the keys per
  channel in groups of that many tokens (see the module docstring); a cache passed in
  must be made with the same `kv_bits` and `kv_key_group` (`init_cache`);
  `kv_key_requant` reads the unfinished key group as codes, not float. `hadamard`
  turns on the online Hadamards a rotated checkpoint needs (module docstring); on
  unrotated weights it changes the function.
  """
  config: LlamaConfig
  kv_bits: int = 0
  hadamard: bool = False
  kv_key_group: int = 0
  kv_key_requant: bool = False

  @nn.compact
  def __call__(self, ids_BxT: jax.Array, cache: Optional[KVCache] = None):
    """Logits `[B, T, vocab]`, or `(logits, cache)` when a cache is passed."""
    c = self.config
    b, t = ids_BxT.shape
    start = jnp.int32(0) if cache is None else cache.length
    pos_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = nn.Embed(c.vocab_size, c.hidden_size, name="token_embed")
    x = embed(ids_BxT)
    _check_kv(self.kv_bits, self.kv_key_group)
    if cache is not None and (cache.k_scale is not None) != bool(self.kv_bits):
      raise ValueError(f"the cache is {'quantized' if cache.k_scale is not None else 'float'}"
                       f" but the model has kv_bits={self.kv_bits}; make it with "
                       "init_cache(..., kv_bits=model.kv_bits)")
    if (cache is not None and cache.k.dtype == jnp.uint8
        and self.kv_bits > kv_quant.PACKED_BITS):
      raise ValueError(f"the cache holds packed 4-bit codes (uint8) but the model has "
                       f"kv_bits={self.kv_bits}; make it with init_cache(..., "
                       "kv_bits=model.kv_bits)")
    if self.kv_key_requant and not self.kv_key_group:
      raise ValueError("kv_key_requant=True needs per-channel keys (kv_key_group > 0)")
    cache_group = 0 if cache is None or cache.k_resid is None else cache.k_resid.shape[2]
    if cache is not None and cache_group != self.kv_key_group:
      raise ValueError(f"the cache has kv_key_group={cache_group} but the model "
                       f"kv_key_group={self.kv_key_group}; make it with "
                       "init_cache(..., kv_key_group=model.kv_key_group)")
    written = []
    for i in range(c.num_layers):
      kv = None
      if cache is not None:
        layer = lambda a: None if a is None else a[i]
        kv = (cache.k[i], cache.v[i], cache.length, layer(cache.k_scale),
              layer(cache.v_scale), layer(cache.k_resid))
      x, w = LlamaBlock(c, self.kv_bits, self.hadamard, self.kv_key_group,
                        self.kv_key_requant, name=f"block_{i}")(x, pos_BxT, kv)
      written.append(w)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)
    if cache is None:
      return logits
    stack = lambda j: None if written[0][j] is None else jnp.stack([w[j] for w in written])
    return logits, KVCache(stack(0), stack(1), cache.length + t, stack(2), stack(3),
                           stack(4))
