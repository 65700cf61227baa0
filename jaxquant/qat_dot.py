"""The QAT contraction: one custom VJP for every quantized `dot_general`.

`qat_dot` views the contraction as lhs[B, M, K] · rhs[B, K, N] (`layout.canonicalize`)
and runs `_qmatmul`, whose forward quantizes the operands (the lhs, activations, with one
scale per row (B, M) or per (row, group of K), or a static / learned range; the rhs, the
weight, exactly as `jq.quantize_weight` stores it) and, in mode='int' with both operands
quantized, contracts their int8 codes (`jaxquant.int_matmul`); otherwise the
dequantized operands meet in a float dot.

Backward: cotangents w.r.t. the dequantized operands, then through each operand's
quantizer rule (STE / clipped / LSQ / PACT). With `DotSpec.grad` set both backward dots
are quantized too. The per-channel scale that runs along the backward contraction is
folded into the incoming gradient before it is quantized, so the int8 codes saved from
the forward pass are reused as they are:
    dlhs = Q(g · s_b) · (b − z_b)ᵀ      (contract N: both operands row-major, fast)
    drhs = (a − z_a)ᵀ · Q(s_a · g)      (aᵀ materialized behind an optimization barrier:
                                          given aᵀ as [K, M], XLA:CPU runs the s8 dot;
                                          contracting dim 0 of both, it widens both
                                          operands to s32 and runs 4x slower than f32)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import fake_quant as fq
from jaxquant import int_matmul as im
from jaxquant import layout
from jaxquant.dot_options import DotOptions
from jaxquant.fake_quant import OperandState
from jaxquant.spec import DotSpec


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
    acc = im.contract(h_codes[0, 0], r4[0, 0], (1,), (1,), (), (), mode)[None, None]
  elif G == 1:  # one batch axis, as in the forward (`_bgmn_dot`)
    acc = im.contract(h_codes[:, 0], r4[:, 0], (2,), (2,), (0,), (0,), mode)[:, None]
  else:
    acc = im.contract(h_codes, r4, (3,), (3,), (0, 1), (0, 1), mode)  # [B,G,M,g]
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
    acc = im.contract(l_t[0, 0], h_codes[0, 0], (1,), (0,), (), (), mode)[None, None]
  elif G == 1:  # one batch axis, as in the forward (`_bgmn_dot`)
    acc = im.contract(l_t[:, 0], h_codes[:, 0], (2,), (1,), (0,), (0,), mode)[:, None]
  else:
    acc = im.contract(l_t, h_codes, (3,), (2,), (0, 1), (0, 1), mode)  # [B,G,g,N]
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


def _matmul_fwd_parts(spec: DotSpec, barriers: bool, lhs, rhs, key, l_learned, r_learned,
                      l_range):
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
    out = im.keep_nan(im.int_matmul(q_l, q_r, "int", barriers), lhs, rhs)
  else:
    out = jnp.einsum("bmk,bkn->bmn", deq_l, deq_r, preferred_element_type=jnp.float32)
  # The float backward runs in the operands' dtype (bf16 stays bf16, as in the float
  # model's backward); a zero-size array carries that dtype through the residuals.
  dtype_carrier = jnp.zeros((0,), jnp.result_type(lhs, rhs))
  return out, (q_l, q_r, res_l, res_r, deq_l if q_l is None else None,
               deq_r if q_r is None else None, k_gl, k_gr, dtype_carrier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qmatmul(spec, barriers, lhs, rhs, key, l_learned, r_learned, l_range):
  return _matmul_fwd_parts(spec, barriers, lhs, rhs, key, l_learned, r_learned, l_range)[0]


def _qmatmul_fwd(spec, barriers, lhs, rhs, key, l_learned, r_learned, l_range):
  return _matmul_fwd_parts(spec, barriers, lhs, rhs, key, l_learned, r_learned, l_range)


def _qmatmul_bwd(spec, barriers, res, g):
  del barriers  # forward only: the backward dots run as they are
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


def qat_dot(lhs, rhs, dimension_numbers, spec: DotSpec, key, lhs_state: OperandState,
            rhs_state: OperandState, options: DotOptions):
  """The quantized contraction of float operands (at least one of `spec.lhs` /
  `spec.rhs` set), with the custom VJP; float32 output of lax's shape."""
  if spec.grad is not None and (spec.lhs is None or spec.rhs is None):
    raise ValueError("DotSpec.grad (quantized backward) needs both lhs and rhs specs")
  c = layout.canonicalize(lhs.shape, rhs.shape, dimension_numbers)
  w_layout = layout.rhs_layout(dimension_numbers, rhs.ndim)
  l3 = layout.to_canonical(lhs, c.lhs_perm, c.bmk)
  r3 = layout.canonical(rhs, w_layout)
  ll, lr = layout.lhs_state_to_canonical(lhs_state, c, lhs.ndim, dimension_numbers)
  rl = layout.canonical_scale(rhs_state.learned, w_layout)
  out = _qmatmul(spec, options.barriers(), l3, r3, key, ll, rl, lr)
  return out.reshape(c.out_shape)
