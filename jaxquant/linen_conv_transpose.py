"""One call of a quantized `nn.ConvTranspose`: the transposed convolution as the
convolution it is, through jaxquant's conv.

`nn.ConvTranspose` calls `lax.conv_transpose` directly (it takes no contraction
argument), so `ConvTransposeCall` runs the layer's computation itself with the same
variables: with `transpose_kernel=False` (Flax's default) a transposed convolution of
stride s is the convolution of the input dilated by s (`lhs_dilation`), window stride 1,
with the kernel [spatial..., in, out] as it is, and the padding of `lax.conv_transpose`:
per spatial axis, with k the dilated kernel size,

  'SAME':  total k + s − 2, before k − 1 if s > k − 1 else ⌈total / 2⌉
  'VALID': total k + s − 2 + max(k − s, 0), before k − 1
  explicit pairs: used as they are.

So the kernel's layout is a Conv kernel's (contracted: spatial axes and input channels;
output channels per channel), QAT and serving run the same quantized conv, and a stored
`QTensor` kernel is read as `nn.Conv` reads it. `transpose_kernel=True` (a flipped,
channel-swapped kernel) and a `mask` are refused with an error naming the layer.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from jaxquant.linen_layer import (Contraction, LayerCall, promote_keeping_qtensors,
                                  stored_kernel)


def transpose_padding(k: int, s: int, padding: str):
  """(before, after) padding of the dilated input along one axis (module docstring)."""
  if padding == "SAME":
    total = k + s - 2
    before = k - 1 if s > k - 1 else int(math.ceil(total / 2))
  elif padding == "VALID":
    total = k + s - 2 + max(k - s, 0)
    before = k - 1
  else:
    raise ValueError(f"padding={padding!r} is not 'SAME', 'VALID' or explicit pairs")
  return before, total - before


class ConvTransposeCall(LayerCall):
  """One call of a matched `nn.ConvTranspose` (module docstring)."""

  def run(self, args, kwargs):
    """`nn.ConvTranspose.__call__` with the convolution through jaxquant's conv."""
    return self.conv_transpose(*args, **kwargs)

  def conv_transpose(self, inputs):
    """The layer's forward: Flax's ConvTranspose with `lax.conv_transpose` written as a
    dilated convolution."""
    m = self.module
    if m.transpose_kernel:
      raise ValueError(f"layer {self.path!r}: nn.ConvTranspose(transpose_kernel=True) "
                       "cannot be quantized (its kernel is flipped and its channel axes "
                       "swapped); use transpose_kernel=False, or write the rules so that "
                       "none matches this layer")
    if m.mask is not None:
      raise ValueError(f"layer {self.path!r}: a masked nn.ConvTranspose cannot be "
                       "quantized; write the rules so that none matches this layer")
    size = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    n = len(size)
    per_axis = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int)
                                                     else tuple(v))
    batch_shape = inputs.shape[:inputs.ndim - (n + 1)]
    if len(batch_shape) != 1:  # Flax flattens every batch axis into one
      inputs = jnp.reshape(inputs, (-1,) + inputs.shape[len(batch_shape):])
    strides, dilation = per_axis(m.strides), per_axis(m.kernel_dilation)
    kernel = stored_kernel(m)
    if kernel is None:
      kernel = m.param("kernel", m.kernel_init, size + (inputs.shape[-1], m.features),
                       m.param_dtype)
    bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
    inputs, kernel, bias = promote_keeping_qtensors(m.promote_dtype)(
        inputs, kernel, bias, dtype=m.dtype)
    padding = canonicalize_padding(m.padding, n)
    circular = padding == "CIRCULAR"
    if circular:
      padding = "VALID"
    if isinstance(padding, str):
      padding = tuple(transpose_padding((k - 1) * d + 1, s, padding)
                      for k, d, s in zip(size, dilation, strides))
    spatial = "HWDXYZ"[:n] if n <= 6 else None
    if spatial is None:
      raise ValueError(f"layer {self.path!r}: {n} spatial axes are more than jaxquant's "
                       "conv supports")
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    y = Contraction(self).conv(inputs, kernel, (1,) * n, padding, lhs_dilation=strides,
                               rhs_dilation=dilation, dimension_numbers=dn,
                               precision=m.precision,
                               preferred_element_type=m.preferred_element_type)
    if circular:
      y = _wrap_circular(y, inputs.shape[1:-1], strides)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if len(batch_shape) != 1:
      y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y


def _wrap_circular(y, in_spatial, strides):
  """Flax's 'CIRCULAR' padding of a transposed convolution (transpose_kernel=False):
  each spatial axis is padded to whole periods of length input · stride, the extra
  put before (the larger half), and the periods summed."""
  periods = [d * s for d, s in zip(in_spatial, strides)]
  diffs = [-(yd - p) % (2 * p) for yd, p in zip(y.shape[1:-1], periods)]
  y = jnp.pad(y, [(0, 0)] + [((d + 1) // 2, d // 2) for d in diffs] + [(0, 0)])
  for i, p in enumerate(periods, start=1):
    y = y.reshape(y.shape[:i] + (-1, p) + y.shape[i + 1:]).sum(axis=i)
  return y

