"""Quantized KV-cache arithmetic for `experiments.models.llama`: per-token and KIVI keys.

Two granularities for keys (values are always per token):

* per token (`kv_key_group=0` in the model): one symmetric absmax scale per (token,
  kv head), over the head's channels, as for values. Quantized on write, dequantized on
  read.
* per channel in groups of G tokens (`kv_key_group=G`, KIVI: Liu et al. 2024, "KIVI: A
  Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys have a few outlier
  channels, so each channel gets its own scale, the absmax over G consecutive tokens
  (token positions [jG, (j+1)G), one scale per (group, kv head, channel)). A channel
  scale needs the whole group, so in a streaming cache **the group still being filled
  is kept in float32** (KIVI's full-precision residual): the cache holds int8 codes and
  scales of every complete group plus a float buffer of G slots for the current group's
  keys. When a write completes a group, that group is quantized from its float keys
  (never re-quantized from codes), so writing T tokens at once or one at a time gives
  the same codes, scales and residual. At most G − 1 keys per kv head are held in float.
  With `requant` (`kv_key_requant` in the model) the unfinished group is also stored and
  read as codes: at every write it is re-quantized from the float residual with the
  absmax of its keys so far, so no key is ever read as float (the residual stays, as
  the exact source for the next re-quantization).

What a query reads under per-channel keys: the key at position s seen by a query at
position p is the dequantized code when s's group was complete after p was written,
`s // G < (p + 1) // G`; otherwise s is in p's own unfinished group and is read as
float, or with `requant` as its code under that group's absmax over positions ≤ p.
That is what a cache filled token by token hands each query; a prefill of T tokens and
the cache-free forward (perplexity) apply the same rule per (query, key) pair
(`own_group_keys`), so all three give the same attention inputs.

Storage: 8-bit codes one per byte (int8); 4-bit codes packed two per uint8 along the head-dim
axis (`pack_int4`: element 2i in the low nibble, 2i+1 in the high one, so a cache row
`[..., D]` is `[..., D/2]` bytes and every write stores whole rows), unpacked on read
into the same int8 codes (`unpack_int4`, exact for every code in [-8, 7]). The head dim
must be even (llama's RoPE already requires it); an odd one is refused. Scales are
float32. (Not `jaxquant.qtensor.pack`, which serves stored weights: its bit planes span
the whole flattened array, while a cache write must store one token's rows on their own.)
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

import jaxquant as jq


PACKED_BITS = 4  # code widths up to this are stored two per byte


def pack_int4(codes_BxSxHxK: jax.Array) -> jax.Array:
  """uint8 `[..., D/2]`: int4 codes (int8 values in [-8, 7]) two per byte along the last
  axis, code 2i in the low nibble and 2i+1 in the high nibble (two's complement)."""
  d = codes_BxSxHxK.shape[-1]
  if d % 2:
    raise ValueError(f"pack_int4: the last axis has odd length {d}; int4 codes are packed "
                     "two per byte along it, so it must be even")
  nib = codes_BxSxHxK.astype(jnp.uint8) & jnp.uint8(0xF)
  return nib[..., 0::2] | (nib[..., 1::2] << jnp.uint8(4))


def unpack_int4(packed_BxSxHxP: jax.Array) -> jax.Array:
  """int8 `[..., 2P]`: the codes `pack_int4` stored, sign-extended from their nibbles."""
  if packed_BxSxHxP.dtype != jnp.uint8:
    raise ValueError(f"unpack_int4: expected uint8 packed codes, got {packed_BxSxHxP.dtype}")
  byte = jax.lax.bitcast_convert_type(packed_BxSxHxP, jnp.int8)
  lo = jnp.left_shift(byte, jnp.int8(4)) >> jnp.int8(4)   # arithmetic shift: sign
  hi = byte >> jnp.int8(4)
  return jnp.stack([lo, hi], axis=-1).reshape(*byte.shape[:-1], 2 * byte.shape[-1])


def store_codes(codes: jax.Array, like: jax.Array) -> jax.Array:
  """`codes` in the storage of the cache buffer `like`: packed when it is uint8."""
  return pack_int4(codes) if like.dtype == jnp.uint8 else codes.astype(like.dtype)


def read_codes(stored: jax.Array) -> jax.Array:
  """int8 codes of a cache buffer: unpacked when it is packed (uint8), else as is."""
  return unpack_int4(stored) if stored.dtype == jnp.uint8 else stored


def quantize_kv(x_BxTxGxK: jax.Array, bits: int) -> Tuple[jax.Array, jax.Array]:
  """(int8 codes, float32 scales `[..., 1]`) of keys or values, absmax per token and head."""
  q = jq.quantize(x_BxTxGxK, jq.QuantSpec(bits=bits), reduce_axes=(-1,))
  return q.values, q.scale.astype(jnp.float32)


def num_key_groups(size: int, group: int) -> int:
  """Scale rows a cache of `size` slots needs for keys grouped by `group` tokens."""
  return -(-size // group)


def quantize_key_groups(k_BxTxHxK: jax.Array, bits: int, group: int):
  """Per-channel codes of keys whose first token starts a group.

  Returns (int8 codes `[B, T, H, K]`, float32 scales `[B, ceil(T/G), H, K]`): group j is
  tokens [jG, (j+1)G), its scale absmax over those tokens / (2^(bits−1) − 1) per
  (kv head, channel). A last group shorter than G is quantized over the tokens it has
  (callers treat it as unfinished and never read its codes).
  """
  b, t, h, k = k_BxTxHxK.shape
  n = num_key_groups(t, group)
  padded = jnp.pad(k_BxTxHxK, ((0, 0), (0, n * group - t), (0, 0), (0, 0)))
  q = jq.quantize(padded.reshape(b, n, group, h, k), jq.QuantSpec(bits=bits),
                  reduce_axes=(2,))
  codes = q.values.reshape(b, n * group, h, k)[:, :t]
  return codes, q.scale.reshape(b, n, h, k).astype(jnp.float32)


def dequantize_key_groups(codes_BxSxHxK: jax.Array, scale_BxNxHxK: jax.Array,
                          group: int) -> jax.Array:
  """float32 keys `[B, S, H, K]` from grouped per-channel codes (int8, or packed uint8)
  and scales."""
  codes_BxSxHxK = read_codes(codes_BxSxHxK)
  s = codes_BxSxHxK.shape[1]
  scale = jnp.repeat(scale_BxNxHxK, group, axis=1)[:, :s]
  return codes_BxSxHxK.astype(jnp.float32) * scale


def read_quantized(key_pos_S: jax.Array, pos_BxT: jax.Array, group: int) -> jax.Array:
  """`[B, T, S]` bool: True where the query at pos_BxT reads the key at key_pos_S from
  its complete group's codes, False where from its own unfinished group."""
  return (key_pos_S // group)[None, None, :] < ((pos_BxT + 1) // group)[:, :, None]


def fake_quant_key_groups(k_BxTxHxK: jax.Array, bits: int, group: int) -> jax.Array:
  """Keys at positions 0..T−1 as a cache would dequantize them once their group is
  complete (the cache-free forward reads these where `read_quantized` says so)."""
  codes, scale = quantize_key_groups(k_BxTxHxK, bits, group)
  return dequantize_key_groups(codes, scale, group).astype(k_BxTxHxK.dtype)


def own_group_keys(buf_BxNxHxK: jax.Array, rel_BxT: jax.Array, group: int,
                   requant_bits: int = 0) -> jax.Array:
  """`[B, T, G, H, K]`: for each query, the keys of its own (unfinished) group as it reads
  them. `buf` holds keys from a group boundary on (length a multiple of G) and
  `rel_BxT` is each query's position in it. Slot i of the result is the key at the
  group's i-th position; slots after the query are zero. With `requant_bits` the keys
  up to the query are quantized per channel with the group's absmax over those keys
  (what the cache held when the query was written); with 0 they are the float keys."""
  b, n, h, d = buf_BxNxHxK.shape
  groups = buf_BxNxHxK.reshape(b, n // group, group, h, d)
  own = jax.vmap(lambda g, i: g[i])(groups, rel_BxT // group)   # [B, T, G, H, K]
  seen = jnp.arange(group)[None, None, :] <= (rel_BxT % group)[:, :, None]
  own = jnp.where(seen[..., None, None], own, 0)
  if requant_bits:
    q = jq.quantize(own, jq.QuantSpec(bits=requant_bits), reduce_axes=(2,))
    own = q.values.astype(jnp.float32) * q.scale.astype(jnp.float32)
  return own


def own_group_scores(scores_BxHxRxTxS: jax.Array, own_BxHxRxTxG: jax.Array,
                     key_pos_S: jax.Array, pos_BxT: jax.Array, group: int) -> jax.Array:
  """Attention scores with every key in a query's own unfinished group taken from
  `own` (the query against `own_group_keys`), the rest from `scores`."""
  rel_BxTxS = key_pos_S[None, None, :] - ((pos_BxT // group) * group)[:, :, None]
  own_BxTxS = ~read_quantized(key_pos_S, pos_BxT, group) & (rel_BxTxS >= 0)
  idx = jnp.clip(rel_BxTxS, 0, group - 1)[:, None, None]
  idx = jnp.broadcast_to(idx, scores_BxHxRxTxS.shape)
  placed = jnp.take_along_axis(own_BxHxRxTxG, idx, axis=-1)
  return jnp.where(own_BxTxS[:, None, None], placed, scores_BxHxRxTxS)


def write_key_groups(codes_BxSxHxK: jax.Array, scale_BxNxHxK: jax.Array,
                     resid_BxGxHxK: jax.Array, length: jax.Array, k_BxTxHxK: jax.Array,
                     bits: int, requant: bool = False):
  """Writes T new keys at slot `length` of one layer's per-channel key cache.

  Args:
    codes_BxSxHxK: int8 codes of the complete groups (other slots unused), or uint8
      int4 codes packed two per byte (`pack_int4`, `[B, S, H, K/2]`): written packed.
    scale_BxNxHxK: float32 scales, one row per group of G slots.
    resid_BxGxHxK: float keys of the unfinished group: slot s at row s − G·(length // G).
    length: slots written so far (int32 scalar, traced).
    k_BxTxHxK: the new keys (positions length .. length+T−1).
    bits: code width.
    requant: also store the unfinished group's codes and scales (its absmax over the
      keys written so far, recomputed from the float residual at every write); without
      it only complete groups have codes.

  Returns:
    (codes, scales, residual) after the write, and `(buf, start)`: the float keys from
    slot `start` = G·(length // G) on (`[B, n·G, H, K]`, valid up to length + T), for
    `own_group_keys`. Groups that the write completes are quantized from their float
    keys; slots or groups past the cache's end are dropped, never clamped onto earlier
    slots.
  """
  b, t, h, d = k_BxTxHxK.shape
  size, group = codes_BxSxHxK.shape[1], resid_BxGxHxK.shape[1]
  n_groups = scale_BxNxHxK.shape[1]
  start = (length // group) * group     # first slot of the unfinished group
  held = length - start                 # its keys already in the residual
  nb = (t - 1) // group + 2             # groups the buffer spans (held + t < nb·G)
  buf = jnp.zeros((b, nb * group, h, d), resid_BxGxHxK.dtype)
  buf = buf.at[:, :group].set(resid_BxGxHxK)
  buf = jax.lax.dynamic_update_slice(buf, k_BxTxHxK.astype(buf.dtype), (0, held, 0, 0))
  codes_new, scale_new = quantize_key_groups(buf, bits, group)
  first = jnp.arange(nb) * group
  done = (first < held + t) if requant else (first + group <= held + t)
  group_idx = jnp.where(done, start // group + jnp.arange(nb), n_groups)
  slot_idx = jnp.where(jnp.repeat(done, group), start + jnp.arange(nb * group), size)
  codes = codes_BxSxHxK.at[:, slot_idx].set(store_codes(codes_new, codes_BxSxHxK),
                                            mode="drop")
  scales = scale_BxNxHxK.at[:, group_idx].set(scale_new, mode="drop")
  resid = jax.lax.dynamic_slice_in_dim(buf, ((held + t) // group) * group, group, axis=1)
  return codes, scales, resid, (buf, start)
