"""The matmul of integer codes, shared by the QAT contraction and serving.

For QTensors a [B, M, K] (scale [B|1, M|1, G]) and b [B, K, N] (scale [B|1, G, N|1]),
`int_matmul` computes Σ_k (a − z_a)·s_a·(b − z_b)·s_b per group of K and sums the
groups. In mode='int' the contraction is a real s8×s8→s32 `dot_general`
(`preferred_element_type=int32`) and the zero points are exact integer cross terms,
    Σ_k (a_k − z_a)(b_k − z_b) = Σ a·b − z_a·Σ b − z_b·Σ a + K·z_a·z_b,
then the scales multiply the s32 result. mode='fake' runs the same formula on float32
copies of the codes (exact while partial sums stay below 2^24).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Integer dots name their precision: with precision=None, a global
# `jax_default_matmul_precision='highest'` would reach them too, and XLA:GPU then no
# longer runs them as s8×s8→s32 GEMMs (seen on an H200: the exact int path's results
# changed). Integer products and sums are exact at any precision setting.
INT_PRECISION = lax.Precision.DEFAULT


def contract(a, b, a_c, b_c, a_b, b_b, mode):
  """dot_general of integer codes (contracting axes a_c / b_c, batch axes a_b / b_b):
  s8×s8→s32 in 'int' mode (int32 result), float32 of the codes in 'fake' mode (exact
  while partial sums stay below 2^24)."""
  dims = ((a_c, b_c), (a_b, b_b))
  if mode == "int":
    return lax.dot_general(a.astype(jnp.int8), b.astype(jnp.int8), dims,
                           precision=INT_PRECISION, preferred_element_type=jnp.int32)
  return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                         precision=lax.Precision.HIGHEST)


def _grouped(v_bmk, v_bkn, G):
  """Views lhs [B,M,K] as [B,M,G,g] and rhs [B,K,N] as [B,G,g,N]."""
  b, m, k = v_bmk.shape
  n = v_bkn.shape[2]
  g = k // max(G, 1)  # K = 0: zero groups of a size-zero axis
  return v_bmk.reshape(b, m, G, g), v_bkn.reshape(b, G, g, n)


def _bgmn_dot(l4, r4, mode):
  """[B,M,G,g] · [B,G,g,N] → [B,G,M,N], squeezing size-1 B and G so the common case is a
  plain 2-D [M,K]·[K,N] dot (the layout XLA:CPU runs fastest)."""
  B, M, G, g = l4.shape
  N = r4.shape[3]
  if B == 1 and G == 1:
    return contract(l4.reshape(M, g), r4.reshape(g, N), (1,), (0,), (), (), mode).reshape(1, 1, M, N)
  if G == 1:
    return contract(l4.reshape(B, M, g), r4.reshape(B, g, N), (2,), (1,), (0,), (0,), mode)[:, None]
  return contract(l4, r4, (3,), (2,), (0, 2), (0, 1), mode)


def _group_count(q_l, q_r, k):
  gl = q_l.scale.shape[2]
  gr = q_r.scale.shape[1]
  if k == 0:
    return 1  # an empty contraction (a 'group' operand has 0 groups): the sum is 0
  G = max(gl, gr)
  if gl not in (1, G) or gr not in (1, G):
    raise ValueError(f"lhs has {gl} scale groups along the contraction and rhs {gr}; "
                     "use the same group_size on both (or channel/tensor on one)")
  return G


def int_matmul(q_l, q_r, mode, barriers=False):
  """Σ_k (a−z_a)·s_a·(b−z_b)·s_b for QTensors a [B,M,K] (scale [B|1, M|1, Gl]) and
  b [B,K,N] (scale [B|1, Gr, N|1]): the contraction over integer codes, [B,M,N] float32.
  `barriers` (mode='int' only) puts the s8 dot between optimization barriers
  (`DotOptions.int_dot_barriers`)."""
  B, M, K = q_l.values.shape
  N = q_r.values.shape[2]
  G = _group_count(q_l, q_r, K)
  l4, r4 = _grouped(q_l.values, q_r.values, G)
  barriers = barriers and mode == "int"
  if barriers:
    l4, r4 = lax.optimization_barrier((l4, r4))
  acc = _bgmn_dot(l4, r4, mode)  # [B,G,M,N]
  if barriers:
    acc = lax.optimization_barrier(acc)
  # Scales / zero points to [B|1, G|1, M|1, 1] and [B|1, G|1, 1, N|1].
  lz = None if q_l.zero_point is None else jnp.transpose(q_l.zero_point, (0, 2, 1))[..., None]
  rz = None if q_r.zero_point is None else q_r.zero_point[:, :, None, :]
  # Zero-point cross terms in the accumulator's type (int32 in 'int' mode: exact).
  if lz is not None:
    col = jnp.sum(r4.astype(jnp.int32), axis=2)[:, :, None, :]  # Σ_k b  [B,G,1,N]
    acc = acc - (lz * col).astype(acc.dtype)
  if rz is not None:
    row = jnp.transpose(jnp.sum(l4.astype(jnp.int32), axis=3), (0, 2, 1))[..., None]  # Σ_k a
    acc = acc - (rz * row).astype(acc.dtype)
  if lz is not None and rz is not None:
    acc = acc + ((K // max(G, 1)) * lz * rz).astype(acc.dtype)
  sl = jnp.transpose(q_l.scale, (0, 2, 1))[..., None]
  sr = q_r.scale[:, :, None, :]
  return jnp.sum(acc.astype(jnp.float32) * sl * sr, axis=1)  # [B,M,N]


def keep_nan(out, lhs, rhs):
  """NaN where a float dot would give NaN from a NaN operand: integer codes have no NaN
  (numerics' rule), so rows (lhs [B,M,K]) / columns (rhs [B,K,N]) holding one are put
  back to NaN in the int path's output [B,M,N]. Either operand may be None."""
  # max propagates NaN, so isnan(max) marks a row / column holding one: a reduction
  # straight over the operand (XLA:CPU materializes a [.., K, ..] mask for any(isnan)),
  # the same one as absmax calibration's, which XLA then computes once.
  bad = None
  if lhs is not None and jnp.issubdtype(lhs.dtype, jnp.floating):
    bad = jnp.isnan(jnp.max(lhs.astype(jnp.float32), axis=2, keepdims=True,
                            initial=-jnp.inf))
  if rhs is not None and jnp.issubdtype(rhs.dtype, jnp.floating):
    col = jnp.isnan(jnp.max(rhs.astype(jnp.float32), axis=1, keepdims=True,
                            initial=-jnp.inf))
    bad = col if bad is None else bad | col
  return out if bad is None else jnp.where(bad, jnp.nan, out)
