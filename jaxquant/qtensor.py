"""QTensor: quantized values with their scale and zero point, plus sub-byte packing.

Invariant: ``x ≈ (values − zero_point) · scale``, with `scale` and `zero_point` broadcast
to `values.shape` by repeating each entry over its block (one entry per channel, per
group, or a single one per tensor).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats
from jaxquant import numerics

if TYPE_CHECKING:
  from jaxquant.spec import QuantSpec


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "scale", "zero_point", "tensor_scale"],
                   meta_fields=["spec", "logical_shape", "contracting", "batch", "packed"])
@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized tensor.

  Invariant: ``x ≈ (values − zero_point) · scale`` (``zero_point`` 0 when None).

  Attributes:
    values: int8 codes for integer formats (2–8-bit, binary ±1, ternary {−1,0,1}; int16
      for 16-bit int), or float values of the format's dtype (float8 for fp8 and MXFP8,
      float4_e2m1fn for MXFP4 / NVFP4); when `packed`, the format's stored form (see
      `pack`): uint8 bytes holding `spec.storage_bits`-bit codes.
    scale: float32, same rank as the tensor; each axis has length 1, the tensor's length,
      or the number of groups along that axis. When `packed`, a block format's stored
      scales: float8_e8m0fnu (MX) or float8_e4m3fn (NVFP4), one byte per block.
    zero_point: int32 shaped like `scale`, or None for symmetric formats.
    tensor_scale: a packed NVFP4 tensor's FP32 per-tensor scale (the decoded scale is
      scale · tensor_scale); None otherwise.

  Static fields (part of the pytree structure, not leaves), set for quantized weights by
  `jq.quantize` / `jq.quantize_weight` and None on intermediate QTensors:
    spec: the `QuantSpec` that produced the codes.
    logical_shape: the tensor's shape (needed to unpack packed codes).
    contracting, batch: for a contraction weight, the axes contracted and the batch axes
      shared with the input, in the order the scales were laid out (`jaxquant.layout`).
    packed: whether `values` holds packed bytes.
  """
  values: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None
  tensor_scale: Optional[jax.Array] = None
  spec: Optional[QuantSpec] = None
  logical_shape: Optional[Tuple[int, ...]] = None
  contracting: Optional[Tuple[int, ...]] = None
  batch: Optional[Tuple[int, ...]] = None
  packed: bool = False

  @property
  def shape(self):
    return self.logical_shape if self.logical_shape is not None else self.values.shape

  @property
  def int8_codes(self) -> bool:
    """Whether the (unpacked) values are int8 codes, the operand of an s8 dot."""
    if self.spec is None:
      return self.values.dtype == jnp.int8
    return self.spec.is_integer

  def pack(self) -> "QTensor":
    """The stored form of the format (`Format.pack`): integer codes packed
    `spec.storage_bits` to the bit into uint8 (unchanged for 8-bit), a block format's
    codes and scales in their storage types."""
    if self.packed or self.spec is None:
      return self
    return formats.get(self.spec.format).pack(self)

  def unpacked(self) -> "QTensor":
    """The same tensor with unpacked values and float32 scales (a no-op unless
    `packed`)."""
    if not self.packed:
      return self
    return formats.get(self.spec.format).unpack(self)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """(values − zero_point) · scale, as `dtype`."""
    q = self.unpacked()
    scale = numerics.expand_to(q.scale, q.values.shape)
    zp = None if q.zero_point is None else numerics.expand_to(q.zero_point, q.values.shape)
    v = numerics.decode(q.values, scale, zp)
    if jnp.issubdtype(dtype, jnp.floating):  # a grid edge may lie beyond dtype's range
      fmax = float(jnp.finfo(dtype).max)
      v = jnp.clip(v, -fmax, fmax)
    return v.astype(dtype)


def pack(values: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes of `bits` ∈ {1, 2, 4} bits into uint8, in bit planes.

  The flattened codes (zero-padded to a multiple of p = 8 / bits) are cut into p
  consecutive planes of m = ceil(size / p) codes; byte j holds code i·m + j of plane i
  in bits [i·bits, (i+1)·bits). 1-bit stores the sign (code −1 → 0, +1 → 1); 2- and
  4-bit store the two's-complement low bits. For a weight [K, N] with K a multiple of
  p, plane i is the row block [i·K/p, (i+1)·K/p): unpacking is p shifts of the byte
  array and one concatenation (no interleave), which XLA runs at the speed of a copy.
  Returns a flat uint8 array of ceil(size·bits/8) bytes; `unpack` needs the shape.
  """
  if bits not in (1, 2, 4):
    raise ValueError(f"bits={bits!r} cannot be packed; choose one of [1, 2, 4]")
  v = jnp.ravel(values).astype(jnp.int32)
  per = 8 // bits
  if bits == 1:
    v = (v > 0).astype(jnp.int32)
  else:
    v = v & ((1 << bits) - 1)
  pad = (-v.size) % per
  v = jnp.pad(v, (0, pad)).reshape(per, -1)
  shifts = jnp.arange(per, dtype=jnp.int32)[:, None] * bits  # explicit rank: no promotion
  return jnp.sum(v << shifts, axis=0).astype(jnp.uint8)


def plane(packed: jax.Array, index, bits: int) -> jax.Array:
  """The int8 codes that bit plane `index` (an int, or an int array broadcasting with
  `packed`) of packed bytes holds (see `pack`)."""
  p = jax.lax.bitcast_convert_type(packed, jnp.int8)
  index = jnp.asarray(index, jnp.int8)
  if bits == 1:
    bit = jax.lax.shift_right_logical(p, index) & jnp.int8(1)
    return (bit + bit - 1).astype(jnp.int8)
  # Move the plane's field to the top bits, then an arithmetic shift sign-extends it.
  up = jax.lax.shift_left(p, (8 - bits * (index + 1)).astype(jnp.int8))
  return jax.lax.shift_right_arithmetic(up, jnp.int8(8 - bits))


def unpack(packed: jax.Array, bits: int, shape) -> jax.Array:
  """Inverse of `pack`: int8 codes of the given shape."""
  if bits not in (1, 2, 4):
    raise ValueError(f"bits={bits!r} cannot be unpacked; choose one of [1, 2, 4]")
  size = int(np.prod(shape))
  planes = [plane(packed, i, bits) for i in range(8 // bits)]
  return jnp.concatenate(planes)[:size].reshape(shape)
