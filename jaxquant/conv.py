"""Quantized `conv_general_dilated` with the same custom-VJP rules as the dots.

Scales: the input (lhs) gets one scale per tensor ('tensor') or per example ('channel':
one per batch index, the only axis a convolution does not mix); the kernel (rhs) one per
tensor or per output feature ('channel'). 'group' granularity is not defined for conv.

mode='int' with both operands quantized runs a real s8×s8→s32 convolution. Zero points
stay integer: with V the set of in-bounds window taps (padding contributes 0.0, not z),
    Σ_V (a − z_a)(b − z_b) = conv(a, b) − z_a·conv(1, b) − z_b·conv(a, 1) + z_a·z_b·conv(1, 1)
where `1` is an all-ones input or kernel of the same geometry.

Backward: cotangents of the float convolution of the dequantized operands (XLA's own
transposed convolutions), then each operand's quantizer rule. With `DotSpec.grad` set both
backward convolutions are quantized, as the dots are: the per-channel scale that runs
along each backward contraction is folded into the incoming gradient g before it is
quantized, so the forward's int8 codes are reused as they are,
    d input  = s_h · convᵀ_input(Q(g · s_b), b − z_b)     s_h per example ('channel')
    d kernel = s_h' · convᵀ_kernel(a − z_a, Q(s_a · g))    s_h' per output feature
(convᵀ: jax's own transposed convolutions, the ones `jax.vjp` of a conv runs). In
mode='int' both are s8×s8→s32 convolutions (the zero-point terms too: z_b·1 and z_a·1
are int8 operands of the same geometry); mode='fake' runs the same formulas in float32 on
the codes (exact while partial sums stay below 2^24).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import _compat
from jaxquant import eager
from jaxquant import fake_quant as fq
from jaxquant import layout
from jaxquant.fake_quant import OperandState
from jaxquant.quantize import quantize_weight
from jaxquant.qtensor import QTensor
from jaxquant.spec import DotSpec


class _ConvArgs(NamedTuple):
  window_strides: tuple
  padding: object
  lhs_dilation: Optional[tuple]
  rhs_dilation: Optional[tuple]
  dimension_numbers: object
  feature_group_count: int
  batch_group_count: int


def _freeze(x):
  """Lists → tuples so the arguments are hashable (namedtuples are kept as they are)."""
  if isinstance(x, list) or type(x) is tuple:
    return tuple(_freeze(v) for v in x)
  return x


def _conv(a, b, args: _ConvArgs, preferred=None):
  return lax.conv_general_dilated(
      a, b, args.window_strides, args.padding, lhs_dilation=args.lhs_dilation,
      rhs_dilation=args.rhs_dilation, dimension_numbers=args.dimension_numbers,
      feature_group_count=args.feature_group_count, batch_group_count=args.batch_group_count,
      precision=lax.Precision.DEFAULT if preferred == jnp.int32 else None,
      preferred_element_type=preferred)


def _axes(spec_dims, qspec, keep_dim):
  """Reduce axes: everything but `keep_dim` for 'channel', everything for 'tensor'."""
  if qspec.granularity == "group":
    raise ValueError("granularity='group' is not defined for convolutions; "
                     "choose 'tensor' or 'channel'")
  n = len(spec_dims)
  if qspec.granularity == "tensor":
    return tuple(range(n))
  return tuple(d for d in range(n) if d != keep_dim)


def kernel_layout(ndim, dn) -> layout.WeightLayout:
  """A conv kernel contracts every axis but its output feature axis."""
  out_dim = dn.rhs_spec[0]
  return layout.make_layout(ndim, tuple(d for d in range(ndim) if d != out_dim))


def _to_out(s, src_dim, out_dim, out_ndim):
  """Moves a per-`src_dim` scale (length-1 elsewhere) onto the output's `out_dim`."""
  v = s.reshape(-1)
  shape = [1] * out_ndim
  shape[out_dim] = v.shape[0]
  return v.reshape(shape)


def _fwd_parts(spec: DotSpec, args: _ConvArgs, lhs, rhs, key, l_learned, r_learned,
               l_range=None):
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, args.dimension_numbers)
  k_l, k_r, k_g = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
  if spec.lhs is None:
    deq_l, q_l, res_l = lhs, None, None
  else:  # one scale per example ('channel') or per tensor, or a static / learned range
    deq_l, q_l, res_l = fq.forward(lhs, spec.lhs, _axes(lhs.shape, spec.lhs, dn.lhs_spec[0]),
                                   k_l, l_learned, l_range)
  if spec.rhs is None:
    deq_r, q_r, res_r = rhs, None, None
  else:  # the kernel, quantized exactly as `jq.quantize_weight` stores it
    _axes(rhs.shape, spec.rhs, dn.rhs_spec[0])  # refuses 'group'
    q = quantize_weight(rhs, spec.rhs, kernel_layout(rhs.ndim, dn), key=k_r,
                        learned=r_learned)
    deq_r, q_r, res_r = fq.from_parts(rhs, (q.values.astype(jnp.float32) if spec.rhs.is_integer
                                            else q.values, q.scale, q.zero_point), r_learned)
  if spec.mode == "int" and q_l is not None and q_r is not None:
    out = _keep_nan(_int_conv(q_l, q_r, args, dn), lhs, rhs, dn)
  else:
    out = _conv(deq_l.astype(jnp.float32), deq_r.astype(jnp.float32), args)
  codes = None
  if spec.grad is not None:  # the codes the quantized backward convolutions reuse
    t = jnp.int8 if spec.mode == "int" else jnp.float32
    codes = tuple(QTensor(q.values.astype(t), q.scale, q.zero_point) for q in (q_l, q_r))
    deq_l = deq_r = None  # not needed: both operands have quantizer rules
  return out, (deq_l, deq_r, res_l, res_r, k_g, codes)


def _keep_nan(out, lhs, rhs, dn):
  """Integer codes have no NaN (numerics' rule): the int conv puts NaN back on every
  output of an example whose input holds a NaN, and of an output feature whose kernel
  holds one (coarser than a float conv, which spoils only the receptive field)."""
  nd = out.ndim
  bad = None
  if lhs is not None:
    n = dn.lhs_spec[0]
    ex = jnp.any(jnp.isnan(lhs), axis=tuple(d for d in range(lhs.ndim) if d != n))
    bad = _to_out(ex, n, dn.out_spec[0], nd)
  if rhs is not None:
    o = dn.rhs_spec[0]
    feat = jnp.any(jnp.isnan(rhs), axis=tuple(d for d in range(rhs.ndim) if d != o))
    f = _to_out(feat, o, dn.out_spec[1], nd)
    bad = f if bad is None else bad | f
  return jnp.where(bad, jnp.nan, out)


def _int_conv(q_l, q_r, args, dn):
  a = q_l.values.astype(jnp.int8)
  b = q_r.values.astype(jnp.int8)
  acc = _conv(a, b, args, jnp.int32)
  nd = acc.ndim
  n_out, c_out = dn.out_spec[0], dn.out_spec[1]
  zl = None if q_l.zero_point is None else _to_out(q_l.zero_point, dn.lhs_spec[0], n_out, nd)
  zr = None if q_r.zero_point is None else _to_out(q_r.zero_point, dn.rhs_spec[0], c_out, nd)
  if zl is not None or zr is not None:
    ones_l = jnp.ones_like(a)
    ones_r = jnp.ones_like(b)
    if zl is not None:
      acc = acc - zl * _conv(ones_l, b, args, jnp.int32)
    if zr is not None:
      acc = acc - zr * _conv(a, ones_r, args, jnp.int32)
    if zl is not None and zr is not None:
      acc = acc + zl * zr * _conv(ones_l, ones_r, args, jnp.int32)
  sl = _to_out(q_l.scale, dn.lhs_spec[0], n_out, nd) if q_l.scale.size > 1 else q_l.scale.reshape(())
  sr = _to_out(q_r.scale, dn.rhs_spec[0], c_out, nd) if q_r.scale.size > 1 else q_r.scale.reshape(())
  return acc.astype(jnp.float32) * sl * sr


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qconv(spec, args, lhs, rhs, key, l_learned, r_learned, l_range):
  return _fwd_parts(spec, args, lhs, rhs, key, l_learned, r_learned, l_range)[0]


def _qconv_fwd(spec, args, lhs, rhs, key, l_learned, r_learned, l_range):
  return _fwd_parts(spec, args, lhs, rhs, key, l_learned, r_learned, l_range)


def _qconv_bwd(spec, args, res, g):
  deq_l, deq_r, res_l, res_r, k_g, codes = res
  g32 = g.astype(jnp.float32)
  if spec.grad is not None:
    d_l, d_r = _quantized_backward(spec, args, codes, g32, k_g)
  else:
    _, vjp = jax.vjp(lambda a, b: _conv(a, b, args), deq_l.astype(jnp.float32),
                     deq_r.astype(jnp.float32))
    d_l, d_r = vjp(g32)
  out = []
  for d, qspec, r, x in ((d_l, spec.lhs, res_l, deq_l), (d_r, spec.rhs, res_r, deq_r)):
    out.append((d.astype(x.dtype), None) if qspec is None else fq.quantizer_vjp(qspec, r, d))
  (dl, dll), (dr, drl) = out
  return dl, dr, None, dll, drl, None


def _conv_params(args: _ConvArgs, lhs_shape, rhs_shape):
  """The conv primitive's normalized parameters (explicit padding pairs, dimension
  numbers object, ...) for these operand shapes, as the transpose rules take them."""
  f = lambda a, b: _conv(a, b, args)
  jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                            jax.ShapeDtypeStruct(rhs_shape, jnp.float32)).jaxpr
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  return dict(eqn.params)


def _transposed_convs(g_lhs, g_rhs, a, b, args, lhs_shape, rhs_shape, mode):
  """(convᵀ_input(g_lhs, b), convᵀ_kernel(a, g_rhs)): jax's own conv transpose rules,
  on int8 operands with an int32 result in 'int' mode (jax.vjp would refuse integer
  operands), on float32 values in 'fake' mode."""
  params = _conv_params(args, lhs_shape, rhs_shape)
  t = jnp.int32 if mode == "int" else jnp.float32
  cast = (lambda x: x.astype(jnp.int8)) if mode == "int" else (lambda x: x.astype(jnp.float32))
  params["preferred_element_type"] = t
  params["precision"] = lax.Precision.HIGHEST if mode == "fake" else lax.Precision.DEFAULT
  d_l = None if g_lhs is None else _compat.conv_transpose_lhs(
      cast(g_lhs), lhs_shape, t, cast(b), **params)
  d_r = None if g_rhs is None else _compat.conv_transpose_rhs(
      cast(g_rhs), cast(a), rhs_shape, t, **params)
  return d_l, d_r


def _quantized_backward(spec, args, codes, g32, key):
  """d(deq input), d(deq kernel) with both backward convolutions on integer codes (see
  the module docstring)."""
  q_l, q_r = codes
  mode = spec.mode
  lhs_shape, rhs_shape = q_l.values.shape, q_r.values.shape
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, args.dimension_numbers)
  nd = g32.ndim
  k_l, k_r = (None, None) if key is None else tuple(jax.random.split(key, 2))
  scalar = lambda s: s.reshape(())
  # d input: fold s_b (per output feature) into g; quantize per example (or tensor).
  s_b = _to_out(q_r.scale, dn.rhs_spec[0], dn.out_spec[1], nd) if q_r.scale.size > 1 \
      else scalar(q_r.scale)
  h_codes, h_scale, _ = fq.quantize_parts(g32 * s_b, spec.grad,
                                          _axes(g32.shape, spec.grad, dn.out_spec[0]), k_l, None)
  # d kernel: fold s_a (per example) into g; quantize per output feature (or tensor).
  s_a = _to_out(q_l.scale, dn.lhs_spec[0], dn.out_spec[0], nd) if q_l.scale.size > 1 \
      else scalar(q_l.scale)
  h2_codes, h2_scale, _ = fq.quantize_parts(s_a * g32, spec.grad,
                                            _axes(g32.shape, spec.grad, dn.out_spec[1]), k_r, None)
  d_l, d_r = _transposed_convs(h_codes, h2_codes, q_l.values, q_r.values, args,
                               lhs_shape, rhs_shape, mode)
  # Zero points: (b − z_b) and (a − z_a) over in-bounds taps; z·1 is an int8 operand.
  if q_r.zero_point is not None:
    zb = jnp.broadcast_to(_to_out(q_r.zero_point, dn.rhs_spec[0], dn.rhs_spec[0], len(rhs_shape))
                          if q_r.zero_point.size > 1 else scalar(q_r.zero_point), rhs_shape)
    d_l = d_l - _transposed_convs(h_codes, None, None, zb, args, lhs_shape, rhs_shape, mode)[0]
  if q_l.zero_point is not None:
    za = jnp.broadcast_to(_to_out(q_l.zero_point, dn.lhs_spec[0], dn.lhs_spec[0], len(lhs_shape))
                          if q_l.zero_point.size > 1 else scalar(q_l.zero_point), lhs_shape)
    d_r = d_r - _transposed_convs(None, h2_codes, za, None, args, lhs_shape, rhs_shape, mode)[1]
  to_l = (_to_out(h_scale, dn.out_spec[0], dn.lhs_spec[0], len(lhs_shape))
          if h_scale.size > 1 else scalar(h_scale))
  to_r = (_to_out(h2_scale, dn.out_spec[1], dn.rhs_spec[0], len(rhs_shape))
          if h2_scale.size > 1 else scalar(h2_scale))
  return d_l.astype(jnp.float32) * to_l, d_r.astype(jnp.float32) * to_r


_qconv.defvjp(_qconv_fwd, _qconv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         spec: Optional[DotSpec] = None, key=None,
                         lhs_state: Optional[OperandState] = None,
                         rhs_state: Optional[OperandState] = None):
  """`lax.conv_general_dilated` with quantized operands (see the module docstring).

  `lhs_state.learned` / `rhs_state.learned` (LSQ step size or PACT α) are shaped like the
  operand with every axis of length 1 except the kept one ('channel');
  `lhs_state.range` is an optional static (lo, hi) input range. `rhs` may be a stored
  kernel `QTensor` (`jq.quantize_weight`): the forward then runs on its codes directly.
  """
  if spec is not None and not isinstance(spec, DotSpec):  # before reading spec.lhs
    raise ValueError(f"spec={spec!r} must be a jaxquant.DotSpec")
  lhs_state, rhs_state = fq.operand_states(lhs_state, rhs_state)
  args = _ConvArgs(_freeze(window_strides), _freeze(padding), _freeze(lhs_dilation),
                   _freeze(rhs_dilation), _freeze(dimension_numbers), int(feature_group_count),
                   int(batch_group_count))
  if isinstance(rhs, QTensor):
    return _serving_conv(spec, args, lhs, rhs, key, lhs_state).astype(
        preferred_element_type or lhs.dtype)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if spec is None or (spec.lhs is None and spec.rhs is None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  if batch_group_count != 1:
    raise ValueError("batch_group_count != 1 is not supported by the quantized conv")
  if spec.grad is not None and (spec.lhs is None or spec.rhs is None):
    raise ValueError("DotSpec.grad (quantized backward) needs both lhs and rhs specs")
  out = _qconv(spec, args, lhs, rhs, key, lhs_state.learned, rhs_state.learned,
               lhs_state.range)
  return out.astype(out_dtype)


def _serving_conv(spec, args, lhs, q_rhs, key, lhs_state: OperandState):
  """Forward-only conv with a stored kernel (same arithmetic as the QAT forward)."""
  dn = lax.conv_dimension_numbers(lhs.shape, q_rhs.shape, args.dimension_numbers)
  expected = kernel_layout(len(q_rhs.shape), dn)
  if q_rhs.contracting is not None and q_rhs.contracting != expected.contracting:
    raise ValueError(f"a kernel quantized for contracting axes {q_rhs.contracting} is used "
                     f"by a conv that contracts {expected.contracting}")
  q_rhs = q_rhs.unpacked()
  lhs_spec = None if spec is None else spec.lhs
  axes = None if lhs_spec is None else _axes(lhs.shape, lhs_spec, dn.lhs_spec[0])
  if lhs_spec is not None and spec.mode == "int" and q_rhs.values.dtype == jnp.int8:
    codes, scale, zp = fq.quantize_parts(lhs, lhs_spec, axes, key, lhs_state.learned,
                                         lhs_state.range)
    out = _int_conv(QTensor(codes.astype(jnp.int8), scale, zp), q_rhs, args, dn)
    return _keep_nan(out, lhs, None, dn)
  a = lhs if lhs_spec is None else fq.forward(lhs, lhs_spec, axes, key, lhs_state.learned,
                                              lhs_state.range)[0]
  return _conv(a.astype(jnp.float32), q_rhs.dequantize(jnp.float32), args)


def make_conv(spec: Optional[DotSpec], *, key=None, lhs_state: Optional[OperandState] = None,
              rhs_state: Optional[OperandState] = None, weight=None):
  """A callable with `lax.conv_general_dilated`'s signature, for
  `nn.Conv(conv_general_dilated=...)`; `weight` (a stored kernel `QTensor`) replaces the
  kernel the layer passes."""
  def _conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None, **unused):
    return conv_general_dilated_compiled(
        lhs, rhs if weight is None else weight, window_strides=window_strides,
        padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, spec=spec, key=key,
        lhs_state=lhs_state, rhs_state=rhs_state)
  return _conv_fn


# `conv_general_dilated`, one compiled call when it runs outside a trace (see
# `jaxquant.eager`): what layers call. Static arguments by keyword.
conv_general_dilated_compiled = eager.compiled_when_eager(conv_general_dilated, (
    "window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
    "feature_group_count", "batch_group_count", "precision", "preferred_element_type",
    "spec"))
