"""`nanpercentile` without a sort: exact order statistics by radix select or bitwise search.

Percentile calibration (`QuantSpec(calibration='percentile')`) needs one or two order
statistics per scale entry, once per layer per training step. `jnp.nanpercentile` sorts
each row for them; here they are found over the values' order-preserving uint32 keys
instead, by counting passes (see `nanpercentile`). Pure jnp; no gradient flows through.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _order_keys(x):
  """uint32 keys whose unsigned order is the float32 order of `x` (not NaN)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (b >> 31) == 1
  return jnp.where(negative, ~b, b | jnp.uint32(0x80000000))


def _from_order_keys(k):
  b = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


# `nanpercentile` finds order statistics with two 16-bit histogram passes (a
# [rows, 65536] int32 table, zeroed and summed per pass) for up to _RADIX_MAX_ROWS rows
# of at least _RADIX_MIN_SIZE values each; below that the 32-pass bitwise search costs
# less than the tables.
_RADIX_MAX_ROWS = 64
_RADIX_MIN_SIZE = 16384


def _select_by_search(keys, low):
  """The `low`-th smallest key (0-based) per row: a bitwise binary search, 32 passes
  that each count the keys below a threshold."""
  def bit_step(i, t):  # keep bit (31 - i) of t where fewer than low + 1 keys lie below
    c = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    below = jnp.sum(keys < c[..., None], axis=-1, dtype=jnp.int32)
    return jnp.where(below <= low, c, t)
  return jax.lax.fori_loop(0, 32, bit_step, jnp.zeros(low.shape, jnp.uint32))


def _neighbour(keys, t_low, high):
  """The order statistic after `t_low` (the `low`-th key): t_low again if it repeats
  past index `high`, else the smallest key above it. Two passes over the keys."""
  at_most = jnp.sum(keys <= t_low[..., None], axis=-1, dtype=jnp.int32)
  above = jnp.min(jnp.where(keys > t_low[..., None], keys, jnp.uint32(0xFFFFFFFF)), axis=-1)
  return jnp.where(at_most > high, t_low, above)


def _select_by_radix(keys, low, high):
  """(`low`-th, `high`-th smallest key) per row of keys [R, n] (0-based, high = low or
  low + 1): a 65536-bin histogram of the top 16 bits (one scatter-add pass) fixes the
  top half of the low one, a second of the low 16 bits of the keys in that bin the
  rest, and `_neighbour` the high one. The passes run as the two steps of one loop that
  takes the keys as its operand (each step a digit pass and the neighbour of its
  prefix; only the last one's is kept): XLA:CPU otherwise fuses the computation of the
  keys (the activation they come from) into every pass and repeats it per pass."""
  R = keys.shape[0]
  rows = jnp.arange(R, dtype=jnp.int32)[:, None]

  def digit_pass(j, prefix, rank):  # j = 0: top 16 bits of every key; 1: the low 16
    # bits of those in the chosen bin
    shift = (16 - 16 * j).astype(jnp.uint32)
    # keys >> 32 is 0 in XLA: with prefix 0 every key matches in the first pass
    match = (keys >> (shift + 16)) == (prefix >> (shift + 16))[:, None]
    digit = ((keys >> shift) & jnp.uint32(0xFFFF)).astype(jnp.int32)
    idx = jnp.where(match, rows * 65536 + digit, R * 65536)  # out of range: dropped
    h = jnp.zeros((R * 65536,), jnp.int32).at[idx.ravel()].add(1, mode="drop")
    h = h.reshape(R, 65536)
    c = jnp.cumsum(h, axis=1)
    d = jnp.argmax(c > rank[:, None], axis=1)
    below = jnp.take_along_axis(c - h, d[:, None], axis=1)[:, 0]
    return prefix | (d.astype(jnp.uint32) << shift), rank - below

  def step(j, carry):  # a digit pass, then the neighbour of the prefix so far (the
    prefix, rank = digit_pass(j, *carry[:2])  # second step's is t_low's, the answer)
    return prefix, rank, _neighbour(keys, prefix, high)

  zeros = jnp.zeros((R,), jnp.uint32)
  t_low, _, t_high = jax.lax.fori_loop(0, 2, step, (zeros, low, zeros))
  return t_low, t_high


def nanpercentile(x, q):
  """`jnp.nanpercentile(x, q, axis=-1)` (linear interpolation, NaN ignored; NaN for a
  row with no other value), without sorting.

  A sort of the row is the costly part of a percentile: on a 2-core CPU it took ~150 ms
  for 0.5M float32 values, hundreds of times the quantized layer's own dot, and
  percentile activation ranges computed one per layer per training step. The two order
  statistics the interpolation needs are found instead over the values'
  order-preserving uint32 keys: for up to 64 rows of at least 16384 values by two 16-bit
  histogram passes (radix select), else by a bitwise binary search of 32 counting passes
  (`#{key < t}`); then a count and a min over the keys above it give its successor.
  The order statistics are exact and the interpolation is `jnp.nanpercentile`'s float32
  formula, so results agree with it to float32 rounding; no gradient flows to `x`.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  valid = ~jnp.isnan(x)
  keys = jnp.where(valid, _order_keys(x), jnp.uint32(0xFFFFFFFF))  # NaN: above all
  counts = jnp.sum(valid, axis=-1).astype(jnp.float32)
  pos = jnp.asarray(q, jnp.float32) / 100.0 * (counts - 1.0)
  low, high = jnp.floor(pos), jnp.ceil(pos)
  high_weight = pos - low
  low = jnp.clip(low, 0.0, counts - 1.0).astype(jnp.int32)
  high = jnp.clip(high, 0.0, counts - 1.0).astype(jnp.int32)
  lead = keys.shape[:-1]
  n_rows = int(np.prod(lead))
  if 0 < n_rows <= _RADIX_MAX_ROWS and keys.shape[-1] >= max(_RADIX_MIN_SIZE, 1):
    flat = lambda a: jnp.broadcast_to(a, lead).reshape(n_rows)
    t_low, t_high = _select_by_radix(keys.reshape(n_rows, keys.shape[-1]), flat(low),
                                     flat(high))
    t_low, t_high = t_low.reshape(lead), t_high.reshape(lead)
  else:
    t_low = _select_by_search(keys, low)
    t_high = _neighbour(keys, t_low, high)
  low_value, high_value = _from_order_keys(t_low), _from_order_keys(t_high)
  out = low_value * (1.0 - high_weight) + high_value * high_weight
  return jnp.where(counts > 0, out, jnp.nan)
