"""Arrays to `QTensor`s and back: `quantize`, `quantize_weight`, `dequantize`.

The one rule of this module: a function here takes a float array and returns a
`QTensor`, or the reverse, and is not differentiable. The quantizer arithmetic they
share with every other path (`quantize_parts`) and its custom VJP (`fake_quant`) live in
`jaxquant.fake_quant`; the weight view they quantize in lives in `jaxquant.layout`.

`quantize_weight` is the only function that turns a float weight into a `QTensor`: the
QAT forward of `jq.dot_general` / `jq.conv_general_dilated`, `jq.convert` and serving all
go through it (or through `layout.quantize_canonical`, its [B, K, N] core), so a stored
weight has the codes and scales the QAT forward computed, by construction. The QTensor
it returns records the layout (`contracting`, `batch`, `shape`), so a contraction can
check that it is used as it was quantized.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats
from jaxquant import layout as layout_lib
from jaxquant import numerics
from jaxquant.fake_quant import quantize_parts
from jaxquant.qtensor import QTensor
from jaxquant.spec import QuantSpec


def quantize(x: jax.Array, spec: QuantSpec, *, reduce_axes: Sequence[int],
             key: Optional[jax.Array] = None, learned: Optional[jax.Array] = None) -> QTensor:
  """Quantizes `x`; the axes in `reduce_axes` share one scale.

  For a [in, out] weight in a dot, `reduce_axes=(0,)` gives one scale per output channel;
  'group' splits the (single) reduce axis into groups of `group_size`; 'tensor' uses one
  scale for the whole tensor. Returns a `QTensor` with int8 values (integer formats;
  int16 for 16-bit int) or float values of the format's dtype (fp8, the block formats'
  float8 / float4 elements). Not differentiable: use `fake_quant` for training.
  """
  axes = numerics.normalize_axes(reduce_axes, x.ndim)
  codes, scale, zp = quantize_parts(x, spec, axes, key, learned)
  codes = codes.astype(formats.get(spec.format).code_dtype(spec))
  return QTensor(codes, scale, None if zp is None else zp.astype(jnp.int32))


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  """(values − zero_point) · scale."""
  return q.dequantize(dtype)


def quantize_weight(w, spec: QuantSpec, layout: layout_lib.WeightLayout, *, key=None,
                    learned=None) -> QTensor:
  """Quantizes a weight as every contraction does; the QTensor keeps `w`'s layout.

  `learned` is the LSQ step size / PACT α in the weight's rank (see
  `layout.init_learned`). Values are int8 codes (integer formats; int16 for 16-bit int)
  or float values of the format's dtype (fp8, block formats), in `w`'s shape; the scale
  and zero point are folded to `w`'s rank.
  """
  w_BKN = layout_lib.canonical(w, layout)
  codes, scale, zp = layout_lib.quantize_canonical(
      w_BKN, spec, key, layout_lib.canonical_scale(learned, layout))
  permuted = tuple(w.shape[a] for a in layout.perm)
  values = jnp.transpose(codes.reshape(permuted), tuple(int(a) for a in np.argsort(layout.perm)))
  values = values.astype(formats.get(spec.format).code_dtype(spec))
  fold = lambda s: layout_lib.fold_scale(s, w.shape, layout, spec)
  return QTensor(values, fold(scale), None if zp is None else fold(zp.astype(jnp.int32)),
                 spec=spec, logical_shape=tuple(w.shape), contracting=layout.contracting,
                 batch=layout.batch)
