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
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  the S slots are written (`length`, int32 scalar; the next token's position)."""
  k: jax.Array
  v: jax.Array
  length: jax.Array


def init_cache(config: LlamaConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
  """An empty cache of `size` slots (size ≤ config.max_position)."""
  if not 0 < size <= config.max_position:
    raise ValueError(f"cache size={size} must be in 1..max_position={config.max_position}")
  shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


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

  Module paths: `query`, `key`, `value`, `out` (Dense, no bias).
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, kv=None):
    """Returns (output `[B, T, D]`, (k, v) to cache). `kv`: this block's cached
    `(k [B, S, Hkv, K], v, length)`, or None to attend within x only."""
    c = self.config
    b, t, _ = x_BxTxD.shape
    hk, g, dh = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    q = nn.Dense(c.num_heads * dh, use_bias=False, name="query")(x_BxTxD)
    k = nn.Dense(hk * dh, use_bias=False, name="key")(x_BxTxD)
    v = nn.Dense(hk * dh, use_bias=False, name="value")(x_BxTxD)
    q_BxTxHxK = rope(q.reshape(b, t, c.num_heads, dh), pos_BxT, c.rope_theta)
    k_BxTxGxK = rope(k.reshape(b, t, hk, dh), pos_BxT, c.rope_theta)
    v_BxTxGxK = v.reshape(b, t, hk, dh)
    if kv is None:
      keys, values, key_pos_S = k_BxTxGxK, v_BxTxGxK, jnp.arange(t)
      written = (k_BxTxGxK, v_BxTxGxK)
    else:
      k_cache, v_cache, length = kv
      keys = jax.lax.dynamic_update_slice(k_cache, k_BxTxGxK.astype(k_cache.dtype),
                                          (0, length, 0, 0))
      values = jax.lax.dynamic_update_slice(v_cache, v_BxTxGxK.astype(v_cache.dtype),
                                            (0, length, 0, 0))
      key_pos_S = jnp.arange(k_cache.shape[1])
      written = (keys, values)
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, hk, g, dh) / jnp.sqrt(jnp.float32(dh))
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, keys.astype(q.dtype))
    allowed_BxTxS = key_pos_S[None, None, :] <= pos_BxT[:, :, None]
    scores = jnp.where(allowed_BxTxS[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    ctx = jnp.einsum("bgrts,bsgk->btgrk", probs, values.astype(q.dtype))
    out = nn.Dense(c.hidden_size, use_bias=False, name="out")(ctx.reshape(b, t, -1))
    return out, written


class SwiGLU(nn.Module):
  """`down(silu(gate(x)) * up(x))`. Module paths: `gate`, `up`, `down` (Dense, no bias)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    """Maps `[B, T, D]` to `[B, T, D]`."""
    c = self.config
    gate = nn.Dense(c.intermediate_size, use_bias=False, name="gate")(x_BxTxD)
    up = nn.Dense(c.intermediate_size, use_bias=False, name="up")(x_BxTxD)
    return nn.Dense(c.hidden_size, use_bias=False, name="down")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  """`a = x + attn(attn_norm(x)); a + mlp(mlp_norm(a))`.

  Module paths: `attn_norm`, `attn/...`, `mlp_norm`, `mlp/...`.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, kv=None):
    """Returns (new states `[B, T, D]`, (k, v) for the cache)."""
    eps = self.config.rms_norm_eps
    h = nn.RMSNorm(epsilon=eps, name="attn_norm")(x_BxTxD)
    a, written = Attention(self.config, name="attn")(h, pos_BxT, kv)
    x_BxTxD = x_BxTxD + a
    h = nn.RMSNorm(epsilon=eps, name="mlp_norm")(x_BxTxD)
    return x_BxTxD + SwiGLU(self.config, name="mlp")(h), written


class Llama(nn.Module):
  """Causal LM: token ids `[B, T]` to next-token logits `[B, T, vocab]`.

  `model.apply(v, ids)` runs a whole sequence (positions 0..T−1, no cache). With
  `cache=` it continues the cached sequence at `cache.length` and returns
  `(logits, updated cache)`; T new tokens must fit in the cache's free slots (the write
  is not checked inside jit: past the end it is clamped and overwrites the last slots).
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, ids_BxT: jax.Array, cache: Optional[KVCache] = None):
    """Logits `[B, T, vocab]`, or `(logits, cache)` when a cache is passed."""
    c = self.config
    b, t = ids_BxT.shape
    start = jnp.int32(0) if cache is None else cache.length
    pos_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = nn.Embed(c.vocab_size, c.hidden_size, name="token_embed")
    x = embed(ids_BxT)
    ks, vs = [], []
    for i in range(c.num_layers):
      kv = None if cache is None else (cache.k[i], cache.v[i], cache.length)
      x, (k, v) = LlamaBlock(c, name=f"block_{i}")(x, pos_BxT, kv)
      ks.append(k)
      vs.append(v)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)
    if cache is None:
      return logits
    return logits, KVCache(jnp.stack(ks), jnp.stack(vs), cache.length + t)
