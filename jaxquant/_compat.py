"""The one place jaxquant reaches into jax's private modules (`jax._src`).

Needed with jax 0.10.2 (the version installed and tested): jax has no public API for
the transposes of a convolution with integer operands. `jax.vjp` and
`jax.linear_transpose` refuse integer inputs, and `lax.conv_transpose` (no lhs
dilation, no feature or batch groups, its own padding convention) is not the transpose
of every `conv_general_dilated` a layer runs. The
quantized conv backward (`jaxquant.conv`) therefore calls jax's own transpose rules, the
ones `jax.vjp` of a float conv runs, on int8 operands with an int32 result.

What would replace it: `jax.linear_transpose` accepting integer operands, or a public
export of the conv transpose rules. Until then, a jax upgrade that moves these names
breaks only this module.
"""
from __future__ import annotations

from jax._src import core as _jax_core
from jax._src.interpreters import ad as _jax_ad
from jax._src.lax import convolution as _lax_conv


def _undefined(shape, dtype):
  """The placeholder a transpose rule takes for the operand being solved for."""
  return _jax_ad.UndefinedPrimal(_jax_core.ShapedArray(shape, dtype))


def conv_transpose_lhs(g, lhs_shape, lhs_dtype, rhs, **params):
  """convᵀ w.r.t. the input: the cotangent of `conv_general_dilated(lhs, rhs, **params)`'s
  lhs (shape `lhs_shape`, dtype `lhs_dtype`) for the output cotangent `g`. `params`:
  the conv primitive's own parameters (as a traced conv's equation holds them)."""
  return _lax_conv._conv_general_dilated_transpose_lhs(  # pylint: disable=protected-access
      g, _undefined(lhs_shape, lhs_dtype), rhs, **params)


def conv_transpose_rhs(g, lhs, rhs_shape, rhs_dtype, **params):
  """convᵀ w.r.t. the kernel: the cotangent of the rhs (shape `rhs_shape`, dtype
  `rhs_dtype`) for the output cotangent `g`; `params` as in `conv_transpose_lhs`."""
  return _lax_conv._conv_general_dilated_transpose_rhs(  # pylint: disable=protected-access
      g, lhs, _undefined(rhs_shape, rhs_dtype), **params)
