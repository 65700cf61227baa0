"""Quantized dot_general and einsum: one custom-VJP path for every contraction.

Every `dot_general` is viewed as a batched matmul lhs[B, M, K] · rhs[B, K, N] (a reshape,
and no transpose at all for the usual Dense layout [..., K] · [K, N]). The lhs gets one
scale per row (B, M) or per (row, group of K); the rhs one per column (B, N) or per
(group of K, column), or one per tensor, as the contraction dictates.

mode='int', both operands quantized: the contraction runs as a real s8×s8→s32
`dot_general` with `preferred_element_type=int32`, zero points handled by exact integer
cross terms,
    Σ_k (a_k − z_a)(b_k − z_b) = Σ a·b − z_a·Σ b − z_b·Σ a + K·z_a·z_b,
then the scales multiply the s32 result (per group, summed over groups).

Backward (the custom VJP): cotangents w.r.t. the dequantized operands, then through each
operand's quantizer rule (STE / clipped / LSQ / PACT). With `DotSpec.grad` set both
backward dots are quantized too. The per-channel scale that runs along the backward
contraction is folded into the incoming gradient before it is quantized, so the int8
codes saved from the forward pass are reused as they are:
    dlhs = Q(g · s_b) · (b − z_b)ᵀ      (contract N: both operands row-major, fast)
    drhs = (a − z_a)ᵀ · Q(s_a · g)      (aᵀ materialized behind an optimization barrier:
                                          given aᵀ as [K, M], XLA:CPU runs the s8 dot;
                                          contracting dim 0 of both, it widens both
                                          operands to s32 and runs 4x slower than f32)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import eager
from jaxquant import fake_quant as fq
from jaxquant import layout
from jaxquant.fake_quant import OperandState
from jaxquant.qtensor import QTensor, plane
from jaxquant.spec import DotSpec


class _Canon(NamedTuple):
  lhs_perm: tuple
  rhs_perm: tuple
  bmk: tuple
  bkn: tuple
  out_shape: tuple


def _canonicalize(lhs_shape, rhs_shape, dimension_numbers) -> _Canon:
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers={dimension_numbers} pair unequal numbers of dims")
  for a, b in zip(lc + lb, rc + rb):
    if lhs_shape[a] != rhs_shape[b]:
      raise ValueError(f"dimension_numbers={dimension_numbers}: lhs dim {a} ({lhs_shape[a]}) "
                       f"!= rhs dim {b} ({rhs_shape[b]})")
  lf = tuple(i for i in range(len(lhs_shape)) if i not in lc and i not in lb)
  rf = tuple(i for i in range(len(rhs_shape)) if i not in rc and i not in rb)
  size = lambda shape, dims: layout.prod(shape[d] for d in dims)  # symbolic batch: no int()
  b, m, k, n = size(lhs_shape, lb), size(lhs_shape, lf), size(lhs_shape, lc), size(rhs_shape, rf)
  out_shape = tuple(lhs_shape[d] for d in lb + lf) + tuple(rhs_shape[d] for d in rf)
  return _Canon(lb + lf + lc, rb + rc + rf, (b, m, k), (b, k, n), out_shape)


def _to_canon(x, perm, shape3):
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  return x.reshape(shape3)


def _learned_to_canon(learned, perm, ndim, n_lead, n_mid):
  """Reshapes a learned scale (operand rank, scale-shaped) like its operand."""
  if learned is None:
    return None
  learned = jnp.asarray(learned)
  if learned.ndim == 0:
    return learned.reshape(1, 1, 1)
  if learned.ndim != ndim:
    raise ValueError(f"learned scale of shape {learned.shape} must have the operand's rank {ndim}")
  t = jnp.transpose(learned, perm)
  s = t.shape
  p = layout.prod
  return t.reshape(p(s[:n_lead]), p(s[n_lead:n_lead + n_mid]), p(s[n_lead + n_mid:]))


# ----------------------------------------------------------------------------- int kernels

# Integer dots name their precision: with precision=None, a global
# `jax_default_matmul_precision='highest'` would reach them too, and XLA:GPU then no
# longer runs them as s8×s8→s32 GEMMs (seen on an H200: the exact int path's results
# changed). Integer products and sums are exact at any precision setting.
INT_PRECISION = lax.Precision.DEFAULT


def _int_dot_barriers() -> bool:
  """Whether the int8 dots sit between optimization barriers (off the CPU). On XLA:GPU
  the quantize before an s8 dot and the int32→float convert after it are otherwise
  pulled into a Triton GEMM fusion, which the autotuner may then swap for cuBLAS,
  leaving the convert as an extra pass over the int32 result. Measured on an H200
  (jax 0.11.2), W8A8 serving of a bf16 [8192, 8192]² product: 1.57 ms with no barrier,
  1.44 ms with one after the dot, 1.05 ms with both (the bf16 dot: 1.41 ms). XLA:CPU
  has no such fusion; it runs without them, as measured there."""
  return jax.default_backend() != "cpu"


def _contract(a, b, a_c, b_c, a_b, b_b, mode):
  """dot_general of integer codes: s8×s8→s32 in 'int' mode (int32 result), float32 of
  the codes in 'fake' mode (exact while partial sums stay below 2^24)."""
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
    return _contract(l4.reshape(M, g), r4.reshape(g, N), (1,), (0,), (), (), mode).reshape(1, 1, M, N)
  if G == 1:
    return _contract(l4.reshape(B, M, g), r4.reshape(B, g, N), (2,), (1,), (0,), (0,), mode)[:, None]
  return _contract(l4, r4, (3,), (2,), (0, 2), (0, 1), mode)


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


def _int_matmul(q_l, q_r, mode):
  """Σ_k (a−z_a)·s_a·(b−z_b)·s_b for QTensors a [B,M,K] (scale [B|1, M|1, Gl]) and
  b [B,K,N] (scale [B|1, Gr, N|1]); the contraction over integer codes."""
  B, M, K = q_l.values.shape
  N = q_r.values.shape[2]
  G = _group_count(q_l, q_r, K)
  l4, r4 = _grouped(q_l.values, q_r.values, G)
  barriers = mode == "int" and _int_dot_barriers()
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


def _keep_nan(out, lhs, rhs):
  """NaN where a float dot would give NaN from a NaN operand: integer codes have no NaN
  (numerics' rule), so rows (lhs [B,M,K]) / columns (rhs [B,K,N]) holding one are put
  back to NaN in the int path's output [B,M,N]."""
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


def _quantize_grad(h, gspec, axis, key):
  """Quantizes a (scale-folded) gradient: codes (float32 ints) and a broadcastable scale."""
  axes = tuple(range(h.ndim)) if gspec.granularity == "tensor" else (axis,)
  codes, scale, _ = fq.quantize_parts(h, gspec, axes, key, None)
  return codes, scale


def _dlhs_quantized(g, q_r, gspec, key, mode):
  """d(deq lhs) [B,M,K] = Q(g·s_b)·(b − z_b)ᵀ, per rhs group."""
  B, K, N = q_r.values.shape
  G = q_r.scale.shape[1]
  h = g.astype(jnp.float32)[:, None] * q_r.scale[:, :, None, :]  # [B,G,M,N]
  h_codes, h_scale = _quantize_grad(h, gspec, 3, key)  # one scale per (B,G,M) row
  r4 = q_r.values.reshape(B, G, K // max(G, 1), N)
  if G == 1 and B == 1:
    acc = _contract(h_codes[0, 0], r4[0, 0], (1,), (1,), (), (), mode)[None, None]
  elif G == 1:  # one batch axis, as in the forward (`_bgmn_dot`)
    acc = _contract(h_codes[:, 0], r4[:, 0], (2,), (2,), (0,), (0,), mode)[:, None]
  else:
    acc = _contract(h_codes, r4, (3,), (3,), (0, 1), (0, 1), mode)  # [B,G,M,g]
  if q_r.zero_point is not None:
    hz = jnp.sum(h_codes.astype(jnp.int32 if mode == "int" else jnp.float32)
                 * q_r.zero_point[:, :, None, :].astype(jnp.int32 if mode == "int" else jnp.float32),
                 axis=3, keepdims=True)
    acc = acc - hz.astype(acc.dtype)
  d = acc.astype(jnp.float32) * h_scale  # [B,G,M,g]
  return jnp.transpose(d, (0, 2, 1, 3)).reshape(d.shape[0], d.shape[2], K)


def _drhs_quantized(g, q_l, gspec, key, mode):
  """d(deq rhs) [B,K,N] = (a − z_a)ᵀ·Q(s_a·g), per lhs group."""
  B, M, K = q_l.values.shape
  G = q_l.scale.shape[2]
  s_l = jnp.transpose(q_l.scale, (0, 2, 1))[..., None]  # [B,G,M,1]
  h = s_l * g.astype(jnp.float32)[:, None]  # [B,G,M,N]
  h_codes, h_scale = _quantize_grad(h, gspec, 2, key)  # one scale per (B,G,N) column
  # Materialize aᵀ as its own buffer: XLA:CPU then runs the s8 dot on [K,M]·[M,N]
  # instead of converting both operands to s32 (about 6x slower on XLA:CPU).
  l_t = lax.optimization_barrier(
      jnp.transpose(q_l.values.reshape(B, M, G, K // max(G, 1)), (0, 2, 3, 1)))  # [B,G,g,M]
  if G == 1 and B == 1:
    acc = _contract(l_t[0, 0], h_codes[0, 0], (1,), (0,), (), (), mode)[None, None]
  elif G == 1:  # one batch axis, as in the forward (`_bgmn_dot`)
    acc = _contract(l_t[:, 0], h_codes[:, 0], (2,), (1,), (0,), (0,), mode)[:, None]
  else:
    acc = _contract(l_t, h_codes, (3,), (2,), (0, 1), (0, 1), mode)  # [B,G,g,N]
  if q_l.zero_point is not None:
    t = jnp.int32 if mode == "int" else jnp.float32
    zl = jnp.transpose(q_l.zero_point, (0, 2, 1))[..., None].astype(t)  # [B,G,M,1]
    acc = acc - jnp.sum(zl * h_codes.astype(t), axis=2, keepdims=True).astype(acc.dtype)
  d = acc.astype(jnp.float32) * h_scale  # [B,G,g,N]
  return d.reshape(B, K, d.shape[3])


def _as_int8(q):
  return type(q)(q.values.astype(jnp.int8), q.scale, q.zero_point)


def _float_backward(g, a, b):
  """(g·bᵀ, aᵀ·g) for a [B,M,K], b [B,K,N], g [B,M,N] in their dtype, accumulated and
  returned in float32; plain 2-D dots when B == 1 (the same dots, in the same layouts,
  as the float model's own backward pass)."""
  f32 = jnp.float32
  if g.shape[0] == 1:
    return (lax.dot_general(g[0], b[0], (((1,), (1,)), ((), ())), preferred_element_type=f32)[None],
            lax.dot_general(a[0], g[0], (((0,), (0,)), ((), ())), preferred_element_type=f32)[None])
  return (jnp.einsum("bmn,bkn->bmk", g, b, preferred_element_type=f32),
          jnp.einsum("bmk,bmn->bkn", a, g, preferred_element_type=f32))


def _split_key(key, n):
  if key is None:
    return (None,) * n
  return tuple(jax.random.split(key, n))


def _matmul_fwd_parts(spec: DotSpec, lhs, rhs, key, l_learned, r_learned, l_range):
  k_l, k_r, k_gl, k_gr = _split_key(key, 4)
  if spec.lhs is None:
    deq_l, q_l, res_l = lhs, None, None
  else:  # activations: one scale per row [B, M], or a static / learned range
    deq_l, q_l, res_l = fq.forward(lhs, spec.lhs, (2,), k_l, l_learned, l_range)
  if spec.rhs is None:
    deq_r, q_r, res_r = rhs, None, None
  else:  # the weight, quantized exactly as `jq.quantize_weight` stores it
    parts = layout.quantize_canonical(rhs, spec.rhs, k_r, r_learned)
    deq_r, q_r, res_r = fq.from_parts(rhs, parts, r_learned)
  if spec.mode == "int":  # keep int8 codes as residuals: 4x less memory, s8 backward dots
    q_l, q_r = (q if q is None else _as_int8(q) for q in (q_l, q_r))
  if spec.mode == "int" and q_l is not None and q_r is not None:
    out = _keep_nan(_int_matmul(q_l, q_r, "int"), lhs, rhs)
  else:
    out = jnp.einsum("bmk,bkn->bmn", deq_l, deq_r, preferred_element_type=jnp.float32)
  # The float backward runs in the operands' dtype (bf16 stays bf16, as in the float
  # model's backward); a zero-size array carries that dtype through the residuals.
  dtype_carrier = jnp.zeros((0,), jnp.result_type(lhs, rhs))
  return out, (q_l, q_r, res_l, res_r, deq_l if q_l is None else None,
               deq_r if q_r is None else None, k_gl, k_gr, dtype_carrier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(spec, lhs, rhs, key, l_learned, r_learned, l_range):
  return _matmul_fwd_parts(spec, lhs, rhs, key, l_learned, r_learned, l_range)[0]


def _qmatmul_fwd(spec, lhs, rhs, key, l_learned, r_learned, l_range):
  return _matmul_fwd_parts(spec, lhs, rhs, key, l_learned, r_learned, l_range)


def _qmatmul_bwd(spec, res, g):
  q_l, q_r, res_l, res_r, float_l, float_r, k_gl, k_gr, dtype_carrier = res
  if spec.grad is not None:
    mode = spec.mode
    d_l = _dlhs_quantized(g, q_r, spec.grad, k_gl, mode)
    d_r = _drhs_quantized(g, q_l, spec.grad, k_gr, mode)
  else:
    ct = dtype_carrier.dtype
    a = float_l if q_l is None else q_l.dequantize(jnp.float32)
    b = float_r if q_r is None else q_r.dequantize(jnp.float32)
    d_l, d_r = _float_backward(g.astype(ct), a.astype(ct), b.astype(ct))
  out = []
  for d, qspec, r, x_float in ((d_l, spec.lhs, res_l, float_l), (d_r, spec.rhs, res_r, float_r)):
    if qspec is None:
      out.append((d.astype(x_float.dtype), None))
    else:
      out.append(fq.quantizer_vjp(qspec, r, d))
  (dl, dll), (dr, drl) = out
  return dl, dr, None, dll, drl, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, spec: Optional[DotSpec] = None, *,
                key=None, preferred_element_type=None, precision=None,
                lhs_state: Optional[OperandState] = None,
                rhs_state: Optional[OperandState] = None):
  """`lax.dot_general` with quantized operands (see the module docstring).

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type: as in lax. The
      output dtype is `preferred_element_type` or the operands' result type. `rhs` may be
      a weight `QTensor` from `jq.quantize_weight` (serving): the forward then runs on
      its codes. Its recorded layout must be the contraction's, except that a 2-D
      weight recorded [N, K] (contracting axis 1, as `jq.convert` stores weight-only
      Dense kernels) serves a contraction of axis 0 of a [K, N] weight, as that
      transpose.
    spec: a `DotSpec`; None (or no quantized operand) runs the plain float dot.
    key: PRNG key, required when any spec uses stochastic rounding.
    lhs_state, rhs_state: `OperandState`s: `learned` is the LSQ step size / PACT α,
      shaped like the operand with the contracting axes of length 1 (or the number of
      groups), or a scalar; `range` (lhs only) a static (lo, hi) activation range, shaped
      the same way, used instead of the batch's own range.
  """
  if spec is not None and not isinstance(spec, DotSpec):  # before reading spec.lhs
    raise ValueError(f"spec={spec!r} must be a jaxquant.DotSpec")
  lhs_state, rhs_state = fq.operand_states(lhs_state, rhs_state)
  if isinstance(rhs, QTensor):
    return _serving_dot(lhs, rhs, dimension_numbers, spec, key, preferred_element_type,
                        lhs_state)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if spec is None or (spec.lhs is None and spec.rhs is None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  if spec.grad is not None and (spec.lhs is None or spec.rhs is None):
    raise ValueError("DotSpec.grad (quantized backward) needs both lhs and rhs specs")
  c = _canonicalize(lhs.shape, rhs.shape, dimension_numbers)
  w_layout = _rhs_layout(dimension_numbers, rhs.ndim)
  l3 = _to_canon(lhs, c.lhs_perm, c.bmk)
  r3 = layout.canonical(rhs, w_layout)
  ll, lr = _lhs_state_to_canon(lhs_state, c, lhs.ndim, dimension_numbers)
  rl = layout.canonical_scale(rhs_state.learned, w_layout)
  out = _qmatmul(spec, l3, r3, key, ll, rl, lr)
  return out.reshape(c.out_shape).astype(out_dtype)


def _rhs_layout(dimension_numbers, rhs_ndim) -> layout.WeightLayout:
  (_, rc), (_, rb) = dimension_numbers
  return layout.make_layout(rhs_ndim, rc, rb)


def _lhs_state_to_canon(state: OperandState, c: _Canon, ndim, dimension_numbers):
  (lc, _), (lb, _) = dimension_numbers
  n_lf = ndim - len(lb) - len(lc)
  canon = lambda a: _learned_to_canon(a, c.lhs_perm, ndim, len(lb), n_lf)
  lr = None if state.range is None else tuple(canon(r) for r in state.range)
  return canon(state.learned), lr


def _stored_dimension_numbers(dimension_numbers, q: QTensor):
  """The contraction's dimension numbers, with the rhs contracting axis of a 2-D weight
  stored transposed taken from the weight: a weight recorded as contracting its axis 1
  (stored [N, K], as `jq.convert` stores weight-only Dense kernels) where the call
  contracts axis 0 of a [K, N] weight (a Dense layer's) is used as that transpose."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (len(q.shape) == 2 and tuple(q.contracting or ()) == (1,) and not q.batch
      and tuple(rc) == (0,) and not tuple(rb)):
    return (lc, (1,)), (lb, rb)
  return dimension_numbers


def _serving_dot(lhs, q_rhs: QTensor, dimension_numbers, spec, key, preferred_element_type,
                 lhs_state: OperandState):
  """Forward-only dot with a stored weight QTensor (serving).

  The weight is unpacked and viewed as [B, K, N] by its recorded layout (which must be
  this contraction's, or a 2-D weight's transpose: see `_stored_dimension_numbers`).
  The lhs is quantized with `spec.lhs` and the s8 dot runs as in the QAT forward, or,
  weight-only, the dequantized weight meets the float activation.
  """
  dimension_numbers = _stored_dimension_numbers(dimension_numbers, q_rhs)
  w_layout = _rhs_layout(dimension_numbers, len(q_rhs.shape))
  c = _canonicalize(lhs.shape, q_rhs.shape, dimension_numbers)
  out_dtype = preferred_element_type or lhs.dtype
  l3 = _to_canon(lhs, c.lhs_perm, c.bmk)
  lhs_spec = None if spec is None else spec.lhs
  int_codes = q_rhs.int8_codes
  if lhs_spec is None and c.bmk[0] == 1 and int_codes and l3.dtype == jnp.float32:
    out = _weight_only_dot(l3, q_rhs, w_layout)
    return out.reshape(c.out_shape).astype(out_dtype)
  q_r = layout.canonical_qtensor(q_rhs, w_layout)
  ll, lr = _lhs_state_to_canon(lhs_state, c, lhs.ndim, dimension_numbers)
  if lhs_spec is not None and q_r.values.dtype == jnp.int8 and (spec.mode == "int"):
    codes, scale, zp = fq.quantize_parts(l3, lhs_spec, (2,), key, ll, lr)
    q_l = QTensor(codes.astype(jnp.int8), scale, zp)
    out = _keep_nan(_int_matmul(q_l, q_r, "int"), l3, None)
  else:
    a = l3 if lhs_spec is None else fq.forward(l3, lhs_spec, (2,), key, ll, lr)[0]
    out = jnp.einsum("bmk,bkn->bmn", a, q_r.dequantize(a.dtype),
                     preferred_element_type=jnp.float32)
  return out.reshape(c.out_shape).astype(out_dtype)




# Weight-only serving at small batch: the float activations are split into int8 slices
# (a block floating point with one exponent per row), so the contraction runs as one
# s8×s8→s32 dot over the stored codes. Ozaki et al. 2012 ("Error-free transformations of
# matrix multiplication by using fast routines of matrix multiplication and its
# applications") split float matrices into slices whose products are exact; Ootomo, Ozaki
# & Yokota 2024 run such slices on int8 matrix units. Three slices of 127 / 254 / 254
# levels leave an error of at most max|x_row| / (127 · 254² · 2) ≈ 2^-24 · max|x_row|
# per element, float32's own rounding at the row's largest value, and the s32 sums are
# exact: the result equals the dequantize-then-dot one to float32 rounding.
_SLICES = 3
# Rows up to which the sliced int8 dot is used (the decode regime, where the weight's
# bytes decide the time). Above it the float dot of the codes runs: there the weight
# conversion is spread over many rows, and three times the rows of an int8 GEMM cost
# 3·r of a float one (r, the s8/f32 GEMM time ratio, is 0.6-0.9 on AVX-512 VNNI CPUs
# without AMX). With AMX int8 tile units r is 0.13-0.17, so 3·r < 1 and the slices win
# at every row count for per-channel scales (see `_sliced_max_rows`).
_SLICED_MAX_ROWS = 32
# |Σ_k slice·code| ≤ K · 127 · 128 must fit int32.
_SLICED_MAX_K = (2 ** 31 - 1) // (127 * 128)


@functools.lru_cache(maxsize=None)
def _cpu_has_amx_int8() -> bool:
  """Whether this Linux host's CPU reports AMX int8 tile units ('amx_int8' in
  /proc/cpuinfo's flags), which XLA:CPU's int8 GEMMs use."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
  except OSError:
    return False


def _sliced_max_rows(groups: int = 1):
  """The most rows that take the sliced int8 dot, for a weight with `groups` groups of
  K: `_SLICED_MAX_ROWS`, except on a CPU with AMX int8 units, where it is every row
  count for per-channel / per-tensor scales and 1024 / groups rows for grouped ones
  (their epilogue makes `groups` float passes over [3·rows, N]). Measured on a 2-core
  Xeon with AMX, weight-only serving of the benchmark MLP (`experiments.decode_layouts`),
  as ratios to the float forward, float dot of the codes / slices: int8 per channel at
  33 rows 0.92 / 0.27, at 512 rows 1.06 / 0.58; int4 in groups of 128 (G = 16) at 64
  rows 2.64 / 0.70, at 512 rows 1.19 / 2.15."""
  if jax.default_backend() == "cpu" and _cpu_has_amx_int8():
    return float("inf") if groups == 1 else max(_SLICED_MAX_ROWS, 1024 // groups)
  return _SLICED_MAX_ROWS


def _activation_slices(x):
  """x [M, K] float32 → codes [S·M, K] int8 (slice-major) and scales [S, M, 1] with
  x ≈ Σ_i scales[i] · codes[i·M:(i+1)·M] (error ≤ 2^-24 · max|x_row|, see above)."""
  amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
  scale = jnp.where(amax > 0, amax, 1.0) / 127.0
  rest, codes, scales = x, [], []
  for _ in range(_SLICES):
    q = jnp.clip(jnp.round(rest / scale), -127.0, 127.0)
    codes.append(q.astype(jnp.int8))
    scales.append(scale)
    rest = rest - q * scale
    scale = scale / 254.0
  return jnp.concatenate(codes, axis=0), jnp.stack(scales)


def _sliced_dot(x, group_codes, scale, zero_point, kn: bool):
  """Σ_k x[m, k] · (codes − z)[k, n] · s, per group of K, as int8 dots of x's slices.

  group_codes: the int8 codes of each of the G groups of K, each [K/G, N] (`kn`) or
  [N, K/G]; scale / zero_point: [G, N|1] (zero_point may be None); x: [M, K] float32
  with every value finite. Returns [M, N] float32.
  """
  M, K = x.shape
  G = scale.shape[0]
  gs = K // G
  q, s_slices = _activation_slices(x)
  rows = _SLICES * M
  pad = (-rows) % 8  # XLA:CPU's int8 GEMM runs fastest on whole 8-row panels
  q = jnp.pad(q, ((0, pad), (0, 0)))
  # One plain 2-D dot per group of K (a single group: the whole weight). A dot batched
  # over the groups ran ~1.5x slower on XLA:CPU (decode of the benchmark MLP with
  # groups of 128, weights read cold: 1.37-1.47 of the f32 forward batched, 0.91-0.93
  # per group).
  dims = (((1,), (0 if kn else 1,)), ((), ()))
  acc = []
  for g, codes_g in enumerate(group_codes):
    acc_g = lax.dot_general(q[:, g * gs:(g + 1) * gs], codes_g, dims,
                            precision=INT_PRECISION, preferred_element_type=jnp.int32)
    acc.append(acc_g[:rows].astype(jnp.float32))  # [rows, N]
  # Sums over the few slices and groups are written out as adds: XLA:CPU fuses them into
  # one elementwise pass, where a reduce over a short axis ran 2-3x slower than the dot.
  x_sums = None if zero_point is None else jnp.sum(x.reshape(M, G, gs), axis=2)  # [M, G]
  out = 0.0
  for g in range(G):
    u = sum(acc[g][i * M:(i + 1) * M] * s_slices[i] for i in range(_SLICES))  # x · codes
    if zero_point is not None:
      u = u - x_sums[:, g:g + 1] * zero_point[g:g + 1].astype(jnp.float32)
    out = out + u * scale[g:g + 1]
  return out


def _weight_only_dot(l3, q_stored: QTensor, w_layout: layout.WeightLayout):
  """Float activations [1, M, K] times a stored integer weight (weight-only serving),
  without materializing a dequantized float weight where that can be avoided:

  * up to `_sliced_max_rows(G)` rows (32, or more on a CPU with AMX int8 units; the
    decode regime), one s8×s8→s32 dot of the activations' int8 slices and the stored
    codes (`_sliced_dot`; a 2-D [N, K] weight is used as stored, with no transpose,
    see `layout.decode_layout`), scales and zero points applied to the s32 sums per
    group: the weight is read once as 1 byte per value, where a float dot first
    writes and reads a 4-byte copy of it. Rows holding NaN or Inf take the float path
    (under `lax.cond`), so they come out as a float dot's would;
  * otherwise per-column (or per-tensor) scales are folded into the output of a plain
    2-D dot of the codes, (x · (c − z)) · s, which skips the dequantizing multiply over
    the [K, N] weight; grouped scales dequantize the weight first.

  Outputs equal the dequantize-then-dot ones up to float32 rounding.
  """
  x = l3[0].astype(jnp.float32)  # [M, K]
  M, K = x.shape

  scale, zero_point = layout.canonical_scales(q_stored, w_layout)  # [1, G, N|1]
  G = scale.shape[1]
  nk = w_layout.ndim == 2 and w_layout.contracting == (1,)

  # Each branch unpacks the stored weight itself, so only the branch taken does.
  def float_path(x, q_stored):
    if G > 1:
      return x @ layout.canonical_qtensor(q_stored, w_layout).dequantize(jnp.float32)[0]
    q = q_stored.unpacked()
    codes = q.values.astype(jnp.float32)  # as stored: [N, K] (nk) or canonical [K, N]
    if nk:  # contract the last axis of the codes: no transpose of them
      if q.zero_point is not None:
        codes = codes - q.zero_point.astype(jnp.float32)  # [N|1, 1]
      return lax.dot_general(x, codes, (((1,), (1,)), ((), ()))) * scale[0]
    codes = layout.canonical(codes, w_layout)[0]
    if zero_point is not None:
      codes = codes - zero_point[0].astype(jnp.float32)  # [1, N|1]
    return (x @ codes) * scale[0]

  def sliced(x, q_stored):
    zp = None if zero_point is None else zero_point[0]
    group_codes, kn = _group_codes(q_stored, w_layout, G)
    return _sliced_dot(x, group_codes, scale[0], zp, kn)

  if not (isinstance(M, int) and M <= _sliced_max_rows(G) and K // G <= _SLICED_MAX_K):
    return float_path(x, q_stored)[None]
  finite = jnp.all(jnp.isfinite(jnp.max(jnp.abs(x), axis=1)))  # max propagates NaN
  return lax.cond(finite, sliced, float_path, x, q_stored)[None]


def _group_codes(q_stored: QTensor, w_layout: layout.WeightLayout, G: int):
  """(the int8 codes of each of the G groups of K, kn) of a stored weight, for
  `_sliced_dot`. A 2-D [N, K] weight is used as stored (kn False: groups are column
  blocks); others as canonical [K, N] (row blocks). A packed 2-D [K, N] weight whose
  groups each lie inside one bit plane (plane i holds rows [i·K/p, (i+1)·K/p), see
  `qtensor.pack`) gives each group straight from its bytes, so the unpacked weight is
  written once, as the groups, instead of unpacked whole and then copied group by
  group (as XLA:CPU did when the groups were slices of it)."""
  if w_layout.ndim == 2 and w_layout.contracting == (1,):  # [N, K] as stored
    codes = q_stored.unpacked().values
    gs = codes.shape[1] // G
    return [codes[:, g * gs:(g + 1) * gs] for g in range(G)], False
  K, N = layout.canonical_shape(q_stored.shape, w_layout)[1:]
  gs = K // G
  if q_stored.packed and G > 1 and w_layout.ndim == 2 and w_layout.contracting == (0,):
    p = 8 // q_stored.spec.storage_bits
    rows = K // p  # rows per plane
    if K % p == 0 and rows % gs == 0:
      planes = q_stored.values.reshape(rows, N)
      return [plane(planes[(g * gs) % rows:(g * gs) % rows + gs], (g * gs) // rows,
                    q_stored.spec.storage_bits) for g in range(G)], True
  codes = layout.canonical_qtensor(q_stored, w_layout).values[0]
  return [codes[g * gs:(g + 1) * gs] for g in range(G)], True


def make_dot_general(spec: Optional[DotSpec], *, key=None,
                     lhs_state: Optional[OperandState] = None,
                     rhs_state: Optional[OperandState] = None, weight=None):
  """A callable with `lax.dot_general`'s signature, for `nn.Dense(dot_general=...)`.

  `weight`, when given (a stored weight `QTensor`), replaces the rhs the layer passes:
  the layer computes on the stored codes instead of its float kernel.
  """
  def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                   **unused):  # out_sharding: the output follows the operands' sharding
    return dot_general_compiled(lhs, rhs if weight is None else weight,
                                dimension_numbers=dimension_numbers, spec=spec, key=key,
                                precision=precision,
                                preferred_element_type=preferred_element_type,
                                lhs_state=lhs_state, rhs_state=rhs_state)
  return _dot_general


# `dot_general`, one compiled call when it runs outside a trace (see `jaxquant.eager`):
# what layers call. Static arguments by keyword.
dot_general_compiled = eager.compiled_when_eager(
    dot_general, ("dimension_numbers", "spec", "preferred_element_type", "precision"))
