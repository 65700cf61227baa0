"""QTensor: quantized values with their scale and zero point, plus sub-byte packing.

Invariant: ``x ≈ (values − zero_point) · scale``, with `scale` and `zero_point` broadcast
to `values.shape` by repeating each entry over its block (one entry per channel, per
group, or a single one per tensor).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import numerics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized tensor.

  Invariant: ``x ≈ (values − zero_point) · scale`` (``zero_point`` 0 when None).

  Attributes:
    values: int8 codes for integer formats (2–8-bit, binary ±1, ternary {−1,0,1}), or
      float8 values for fp8 formats. Sub-byte codes live in an int8 container here; see
      `pack` for storage.
    scale: float32, same rank as `values`; each axis has length 1, the values' length, or
      the number of groups along that axis.
    zero_point: int32 shaped like `scale`, or None for symmetric formats.
  """
  values: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None

  @property
  def shape(self):
    return self.values.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """(values − zero_point) · scale, as `dtype`."""
    scale = numerics.expand_to(self.scale, self.values.shape)
    zp = None if self.zero_point is None else numerics.expand_to(self.zero_point, self.values.shape)
    v = numerics.decode(self.values, scale, zp)
    if jnp.issubdtype(dtype, jnp.floating):  # a grid edge may lie beyond dtype's range
      fmax = float(jnp.finfo(dtype).max)
      v = jnp.clip(v, -fmax, fmax)
    return v.astype(dtype)


def pack(values: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes of `bits` ∈ {1, 2, 4} bits along the flattened array into uint8.

  1-bit packs the sign (code −1 → 0, +1 → 1) eight per byte; 2- and 4-bit store the
  two's-complement low bits, 4 or 2 per byte. Returns a flat uint8 array of
  ceil(size·bits/8) bytes; `unpack` needs the original shape.
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
  v = jnp.pad(v, (0, pad)).reshape(-1, per)
  shifts = jnp.arange(per, dtype=jnp.int32)[None, :] * bits  # explicit rank: no promotion
  return jnp.sum(v << shifts, axis=1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, shape) -> jax.Array:
  """Inverse of `pack`: int8 codes of the given shape."""
  if bits not in (1, 2, 4):
    raise ValueError(f"bits={bits!r} cannot be unpacked; choose one of [1, 2, 4]")
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.int32)[None, :] * bits
  v = (packed.astype(jnp.int32)[:, None] >> shifts) & ((1 << bits) - 1)
  v = v.reshape(-1)[: int(np.prod(shape))]
  if bits == 1:
    v = 2 * v - 1
  else:
    v = jnp.where(v >= (1 << (bits - 1)), v - (1 << bits), v)  # sign-extend
  return v.reshape(shape).astype(jnp.int8)
