"""Per-layer calibration statistics for PTQ, as pure accumulators over input batches.

For a layer y = x W (W [K, N]) the algorithms in `jaxquant.ptq` need, over the
calibration inputs X [n, K] (every token of every batch, padding excluded):

  xtx      XᵀX [K, K]            GPTQ's Hessian H = 2 XᵀX / n; AWQ's output error
  abs_sum  Σ_rows |X| [K]        AWQ's per-channel activation magnitude mean|x|
  abs_max  max_rows |X| [K]      SmoothQuant's per-channel activation range
  count    n

`update` takes any [..., K] batch and an optional mask over its leading axes (1 = a real
token). Non-finite inputs are an error upstream; they are not filtered here, so a NaN
shows up in every statistic instead of being silently dropped. Also here: the layer error
tr(Eᵀ XᵀX E) that all three methods minimize, from the statistics alone.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Stats(NamedTuple):
  """Running sums over calibration inputs (see the module docstring)."""
  xtx: jax.Array
  abs_sum: jax.Array
  abs_max: jax.Array
  count: jax.Array


def init(k: int) -> Stats:
  """Empty statistics for a layer with `k` input features."""
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be a positive int (the layer's input features)")
  return Stats(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32),
               jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))


def update(state: Stats, x, mask=None) -> Stats:
  """Adds a batch `x` [..., K] (rows where `mask` [...] is 0 are left out)."""
  x = jnp.asarray(x, jnp.float32)
  k = state.xtx.shape[0]
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features, the statistics {k}")
  x_nxK = x.reshape(-1, k)
  if mask is None:
    keep_n = jnp.ones((x_nxK.shape[0],), jnp.float32)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:-1]:
      raise ValueError(f"mask shape {mask.shape} must be x's leading shape {x.shape[:-1]}")
    keep_n = (mask.reshape(-1) > 0).astype(jnp.float32)
  # Masked rows contribute zeros to every statistic (where, not a product: padding rows
  # may hold anything, even NaN).
  x_nxK = jnp.where(keep_n[:, None] > 0, x_nxK, 0.0)
  a_nxK = jnp.abs(x_nxK)
  return Stats(state.xtx + x_nxK.T @ x_nxK,
               state.abs_sum + jnp.sum(a_nxK, axis=0),
               jnp.maximum(state.abs_max, jnp.max(a_nxK, axis=0, initial=0.0)),
               state.count + jnp.sum(keep_n).astype(jnp.int32))


def _check_count(state: Stats):
  if int(state.count) == 0:
    raise ValueError("the statistics saw no input rows (count = 0); run calibration first")


def hessian(state: Stats) -> jax.Array:
  """GPTQ's H = 2 XᵀX / n."""
  _check_count(state)
  return hessian_unchecked(state)


def hessian_unchecked(state: Stats) -> jax.Array:
  """`hessian` without the count check (traceable; the caller checks count > 0)."""
  return 2.0 * state.xtx / state.count.astype(jnp.float32)


def mean_abs(state: Stats) -> jax.Array:
  """Per-input-channel mean |x| [K]."""
  _check_count(state)
  return mean_abs_unchecked(state)


def mean_abs_unchecked(state: Stats) -> jax.Array:
  """`mean_abs` without the count check (traceable; the caller checks count > 0)."""
  return state.abs_sum / state.count.astype(jnp.float32)


def output_error(xtx_KxK, w_KxN, w_hat_KxN) -> jax.Array:
  """||X W − X Ŵ||² = Σ_n e_nᵀ (XᵀX) e_n with E = W − Ŵ (from XᵀX alone, no X needed)."""
  e = jnp.asarray(w_KxN, jnp.float32) - jnp.asarray(w_hat_KxN, jnp.float32)
  return jnp.sum((jnp.asarray(xtx_KxK, jnp.float32) @ e) * e)


def merge(a: Stats, b: Stats) -> Stats:
  """Statistics of the union of two disjoint sets of rows (e.g. from two hosts)."""
  return Stats(a.xtx + b.xtx, a.abs_sum + b.abs_sum, jnp.maximum(a.abs_max, b.abs_max),
               a.count + b.count)


def from_inputs(x, mask: Optional[jax.Array] = None) -> Stats:
  """Statistics of one array of inputs [..., K] (init + update)."""
  return update(init(int(jnp.shape(x)[-1])), x, mask)
