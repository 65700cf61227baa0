"""Serving: the forward-only contraction of activations with a stored weight `QTensor`.

The weight is unpacked and viewed as [B, K, N] by its recorded layout (which must be the
contraction's, or a 2-D weight's transpose: `layout.stored_dimension_numbers`). Then:

* W8A8 (`spec.lhs` set, mode='int', int8 codes): the activations are quantized with
  `spec.lhs` and the s8 dot runs as in the QAT forward (`jaxquant.int_matmul`), so
  serving equals the QAT forward;
* weight-only, float32 activations without a batch axis (`weight_only_dot`): the sliced
  int8 dot at small batch, or a float dot of the codes with the scales folded into its
  output, never a dequantized float copy of the weight where that can be avoided;
* otherwise the (fake-)quantized activations meet the dequantized weight in a float dot.

The sliced int8 dot: the float activations are split into int8 slices (a block floating
point with one exponent per row), so the contraction runs as one s8×s8→s32 dot over the
stored codes. Ozaki et al. 2012 ("Error-free transformations of matrix multiplication
by using fast routines of matrix multiplication and its applications") split float
matrices into slices whose products are exact; Ootomo, Ozaki & Yokota 2024 run such
slices on int8 matrix units. Three slices of 127 / 254 / 254 levels leave an error of at
most max|x_row| / (127 · 254² · 2) ≈ 2^-24 · max|x_row| per element, float32's own
rounding at the row's largest value, and the s32 sums are exact: the result equals the
dequantize-then-dot one to float32 rounding. Which rows take it is a `DotOptions` choice.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxquant import fake_quant as fq
from jaxquant import int_matmul as im
from jaxquant import layout
from jaxquant.dot_options import DotOptions
from jaxquant.fake_quant import OperandState
from jaxquant.qtensor import QTensor

SLICES = 3  # the error bound above holds for three slices
# |Σ_k slice·code| ≤ K · 127 · 128 must fit int32.
SLICED_MAX_K = (2 ** 31 - 1) // (127 * 128)


def serving_dot(lhs, q_rhs: QTensor, dimension_numbers, spec, key, preferred_element_type,
                lhs_state: OperandState, options: DotOptions):
  """Forward-only dot with a stored weight QTensor (see the module docstring); the
  output has lax's shape and `preferred_element_type` or the lhs's dtype."""
  dimension_numbers = layout.stored_dimension_numbers(dimension_numbers, q_rhs)
  w_layout = layout.rhs_layout(dimension_numbers, len(q_rhs.shape))
  c = layout.canonicalize(lhs.shape, q_rhs.shape, dimension_numbers)
  out_dtype = preferred_element_type or lhs.dtype
  l3 = layout.to_canonical(lhs, c.lhs_perm, c.bmk)
  lhs_spec = None if spec is None else spec.lhs
  if lhs_spec is None and c.bmk[0] == 1 and q_rhs.int8_codes and l3.dtype == jnp.float32:
    out = weight_only_dot(l3, q_rhs, w_layout, options)
    return out.reshape(c.out_shape).astype(out_dtype)
  q_r = layout.canonical_qtensor(q_rhs, w_layout)
  ll, lr = layout.lhs_state_to_canonical(lhs_state, c, lhs.ndim, dimension_numbers)
  if lhs_spec is not None and q_r.values.dtype == jnp.int8 and (spec.mode == "int"):
    codes, scale, zp = fq.quantize_parts(l3, lhs_spec, (2,), key, ll, lr)
    q_l = QTensor(codes.astype(jnp.int8), scale, zp)
    out = im.keep_nan(im.int_matmul(q_l, q_r, "int", options.barriers()), l3, None)
  else:
    a = l3 if lhs_spec is None else fq.forward(l3, lhs_spec, (2,), key, ll, lr)[0]
    out = jnp.einsum("bmk,bkn->bmn", a, q_r.dequantize(a.dtype),
                     preferred_element_type=jnp.float32)
  return out.reshape(c.out_shape).astype(out_dtype)


def activation_slices(x):
  """x [M, K] float32 → codes [S·M, K] int8 (slice-major) and scales [S, M, 1] with
  x ≈ Σ_i scales[i] · codes[i·M:(i+1)·M] (error ≤ 2^-24 · max|x_row|, see above)."""
  amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
  scale = jnp.where(amax > 0, amax, 1.0) / 127.0
  rest, codes, scales = x, [], []
  for _ in range(SLICES):
    q = jnp.clip(jnp.round(rest / scale), -127.0, 127.0)
    codes.append(q.astype(jnp.int8))
    scales.append(scale)
    rest = rest - q * scale
    scale = scale / 254.0
  return jnp.concatenate(codes, axis=0), jnp.stack(scales)


def sliced_dot(x, group_codes, scale, zero_point, kn: bool):
  """Σ_k x[m, k] · (codes − z)[k, n] · s, per group of K, as int8 dots of x's slices.

  group_codes: the int8 codes of each of the G groups of K, each [K/G, N] (`kn`) or
  [N, K/G] (`layout.group_codes`); scale / zero_point: [G, N|1] (zero_point may be
  None); x: [M, K] float32 with every value finite. Returns [M, N] float32.
  """
  M, K = x.shape
  G = scale.shape[0]
  gs = K // G
  q, s_slices = activation_slices(x)
  rows = SLICES * M
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
                            precision=im.INT_PRECISION, preferred_element_type=jnp.int32)
    acc.append(acc_g[:rows].astype(jnp.float32))  # [rows, N]
  # Sums over the few slices and groups are written out as adds: XLA:CPU fuses them into
  # one elementwise pass, where a reduce over a short axis ran 2-3x slower than the dot.
  x_sums = None if zero_point is None else jnp.sum(x.reshape(M, G, gs), axis=2)  # [M, G]
  out = 0.0
  for g in range(G):
    u = sum(acc[g][i * M:(i + 1) * M] * s_slices[i] for i in range(SLICES))  # x · codes
    if zero_point is not None:
      u = u - x_sums[:, g:g + 1] * zero_point[g:g + 1].astype(jnp.float32)
    out = out + u * scale[g:g + 1]
  return out


def weight_only_dot(l3, q_stored: QTensor, w_layout: layout.WeightLayout,
                    options: DotOptions):
  """Float activations [1, M, K] times a stored integer weight (weight-only serving),
  without materializing a dequantized float weight where that can be avoided:

  * up to `options.max_sliced_rows(G)` rows (by default 32, or more on a CPU with AMX
    int8 units; the decode regime), one s8×s8→s32 dot of the activations' int8 slices
    and the stored codes (`sliced_dot`; a 2-D [N, K] weight is used as stored, with no
    transpose, see `layout.decode_layout`), scales and zero points applied to the s32
    sums per group: the weight is read once as 1 byte per value, where a float dot first
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
    group_codes, kn = layout.group_codes(q_stored, w_layout, G)
    return sliced_dot(x, group_codes, scale[0], zp, kn)

  if not (isinstance(M, int) and M <= options.max_sliced_rows(G) and K // G <= SLICED_MAX_K):
    return float_path(x, q_stored)[None]
  finite = jnp.all(jnp.isfinite(jnp.max(jnp.abs(x), axis=1)))  # max propagates NaN
  return lax.cond(finite, sliced, float_path, x, q_stored)[None]
