"""Float-code formats: scaled fp8 casts, and the block (microscaling) formats.

'fp8_e4m3' / 'fp8_e5m2': x / s cast to the fp8 type (round to nearest even, saturating at
the largest finite value), s from the calibrated clip range: s = hi / max.

Block formats share one scale per block of `block_size` consecutive elements along the
reduced axis (for a weight [K, N]: blocks of K per column), so a spec with one of them
has granularity 'group' and group_size = block_size, derived.

'mxfp8' (E4M3 elements) and 'mxfp4' (E2M1), OCP Microscaling Formats (MX) v1.0: blocks
of 32 with a shared power-of-two scale X = 2^(floor(log2(amax)) − emax_elem) (E8M0),
emax_elem the element type's largest exponent (8 for E4M3, 2 for E2M1); each element is
x / X cast with round to nearest even and saturation to ±max (448, 6). amax / X lies in
[2^emax, 2^(emax + 1)), so a block's largest elements may saturate, as the spec's rule
has it.

'nvfp4' (NVIDIA): E2M1 elements in blocks of 16, an E4M3 scale per block and an FP32
scale per tensor. The tensor scale is s_t = amax / (6 · 448) (amax of the whole tensor),
kept to 20 significant bits; a block's scale s_b = e4m3(amax_block · (1 / (6 · s_t)))
(round to nearest even, saturating at 448); elements e2m1(x · (1 / (s_b · s_t))). With
20 bits in s_t, s_b · s_t is exact in float32, so the stored E4M3 byte and FP32 tensor
scale give back the quantizer's scale bit for bit, and s_t is the largest block scale /
448 (the block holding amax has s_b = 448 exactly).

Stored form (`pack`, what `jq.convert` keeps): MX scales as float8_e8m0fnu (1 byte per
block), NVFP4 block scales as float8_e4m3fn (1 byte) plus the FP32 tensor scale in
`QTensor.tensor_scale`, E2M1 codes two per byte (the sign bit and a 3-bit magnitude index
into {0, 0.5, 1, 1.5, 2, 3, 4, 6}, in `qtensor.pack`'s 4-bit planes), E4M3 codes as
float8_e4m3fn.

Non-finite inputs follow the library's rule (`jaxquant.numerics`): scales from finite
entries only, ±Inf saturate, NaN encodes as 0 (fake_quant puts the NaN back). Exponents:
X is kept in [2^−126, 2^127], so a block whose amax < 2^(emax_elem − 126) gets X = 2^−126
rather than a float32 denormal (XLA:CPU flushes those to zero); an all-zero block gets
X = 1. An NVFP4 block whose s_b rounds to 0, and a whole tensor whose s_t falls below
2^−100 (s_b · s_t would leave float32's normal range), encode as zeros with zero scales.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import numerics
from jaxquant import qtensor
from jaxquant.formats.base import Format, inside_codes

# E2M1 magnitudes by their 3-bit code (exponent bits then the mantissa bit).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIN_EXPONENT, MAX_EXPONENT = -126, 127  # shared MX exponents kept (E8M0: −127..127)
NVFP4_TENSOR_BITS = 20   # significant bits of the NVFP4 tensor scale
NVFP4_TINY = 2.0 ** -100  # NVFP4 tensor scales below this encode the tensor as zeros


class Fp8(Format):
  """A scaled fp8 cast: x / s as `dtype`, s = hi / max of the calibrated range."""
  clip_range = True

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, dtype
    self.max = float(ml_dtypes.finfo(dtype).max)

  def effective_bits(self, spec) -> int:
    return 8

  def storage_bits(self, spec) -> int:
    return 8

  def code_dtype(self, spec):
    return self.dtype

  def scale_zero_point(self, lo, hi, spec):
    return numerics._safe_scale(hi / self.max), None

  def encode(self, x32, scale, zp, spec, key, axes):
    y = numerics.divide_by_scale(jnp.where(jnp.isnan(x32), 0.0, x32), scale)
    return jnp.clip(y, -self.max, self.max).astype(self.dtype)

  def inside(self, x32, scale, zp, spec):
    return inside_codes(x32, scale, zp, -self.max, self.max)

  def grid_range(self, scale, zp, spec):
    hi = scale * self.max
    return -hi, hi


def block_amax(x32, spec, axes):
  """(max finite |x| per block, scale-shaped)."""
  xb, stat_axes, shape = numerics.blocked(x32, spec, axes)
  return jnp.max(numerics._finite_abs(xb), axis=stat_axes).reshape(shape)


def fp4_nibbles(values):
  """The E2M1 bit patterns (int32 0..15, sign in bit 3) of float4_e2m1fn `values`."""
  f = values.astype(jnp.float32)
  a = jnp.abs(f)
  index = sum((a >= v).astype(jnp.int32) for v in E2M1_VALUES[1:])
  return index | (jnp.signbit(f).astype(jnp.int32) << 3)


def fp4_from_nibbles(nibbles):
  """float4_e2m1fn values of E2M1 bit patterns (the low 4 bits of `nibbles`)."""
  n = nibbles.astype(jnp.int32)
  magnitude = jnp.asarray(E2M1_VALUES, jnp.float32)[n & 7]
  return jnp.where((n & 8) != 0, -magnitude, magnitude).astype(jnp.float4_e2m1fn)


class MX(Format):
  """An OCP Microscaling format: `elem` elements, blocks of `block_size`, E8M0 scales."""

  def __init__(self, name: str, elem, block_size: int = 32):
    self.name, self.elem, self.block_size = name, elem, block_size
    info = ml_dtypes.finfo(elem)
    self.max = float(info.max)
    self.bits = int(info.bits)
    self.emax = int(np.floor(np.log2(self.max)))  # largest exponent: 8 E4M3, 2 E2M1

  def check(self, spec) -> None:
    if spec.group_size not in (None, self.block_size):
      raise ValueError(f"group_size={spec.group_size!r} is not allowed for "
                       f"format={self.name!r}: its blocks are {self.block_size} elements "
                       "(leave group_size unset)")
    if spec.calibration != "absmax":
      raise ValueError(f"calibration={spec.calibration!r} is not allowed for "
                       f"format={self.name!r}: its block scale rule takes each block's "
                       "absmax; choose calibration='absmax'")

  def derived(self, spec):
    return {"granularity": "group", "group_size": self.block_size}

  def effective_bits(self, spec) -> int:
    return self.bits

  def storage_bits(self, spec) -> int:
    return self.bits

  def code_dtype(self, spec):
    return self.elem

  def fit_grid(self, x32, spec, axes):
    """X = 2^(floor(log2(amax)) − emax) per block (frexp: amax = m · 2^k, m in [0.5, 1),
    so floor(log2(amax)) = k − 1 exactly)."""
    amax = block_amax(x32, spec, axes)
    _, k = jnp.frexp(amax)
    e = jnp.clip(k - 1 - self.emax, MIN_EXPONENT, MAX_EXPONENT)
    e = jnp.where(amax > 0, e, 0)
    return jnp.ldexp(jnp.ones(amax.shape, jnp.float32), e), None

  def cast(self, y):
    """y (float32) as elements: round to nearest even, saturating at ±max."""
    return jnp.clip(y, -self.max, self.max).astype(self.elem)

  def encode(self, x32, scale, zp, spec, key, axes):
    x = jnp.where(jnp.isnan(x32), 0.0, x32)
    return self.cast(numerics.divide_by_scale(x, scale))

  def inside(self, x32, scale, zp, spec):
    """|x| within the block's saturation bound max · scale."""
    return jnp.abs(x32) <= self.max * scale

  def pack_values(self, values):
    """Element values as stored: E2M1 bit patterns two per byte, E4M3 as they are."""
    if self.bits == 4:
      return qtensor.pack(fp4_nibbles(values), 4)
    return values

  def unpack_values(self, q):
    """Inverse of `pack_values`: the element values of a packed QTensor `q`."""
    if self.bits == 4:
      return fp4_from_nibbles(qtensor.unpack(q.values, 4, q.logical_shape))
    return q.values

  def pack(self, q):
    return dataclasses.replace(q, values=self.pack_values(q.values),
                               scale=q.scale.astype(jnp.float8_e8m0fnu),
                               logical_shape=tuple(q.shape), packed=True)

  def unpack(self, q):
    return dataclasses.replace(q, values=self.unpack_values(q), packed=False,
                               scale=q.scale.astype(jnp.float32))


class NVFP4(MX):
  """NVIDIA's NVFP4: E2M1 elements, blocks of 16, E4M3 block scales, an FP32 tensor scale."""

  def __init__(self, name: str = "nvfp4"):
    super().__init__(name, jnp.float4_e2m1fn, 16)
    self.scale_max = float(ml_dtypes.finfo(jnp.float8_e4m3fn).max)  # 448

  def tensor_scale(self, x32):
    """s_t = amax / (6 · 448) over the whole tensor, to `NVFP4_TENSOR_BITS` bits; 0 for
    a tensor with no finite nonzero entry or a tiny one (see the module docstring)."""
    amax = jnp.max(numerics._finite_abs(x32))
    t = amax * np.float32(1.0 / (self.max * self.scale_max))
    m, k = jnp.frexp(t)
    unit = float(2 ** NVFP4_TENSOR_BITS)
    s = jnp.ldexp(jnp.round(m * unit) / unit, k)
    return jnp.where(s >= NVFP4_TINY, s, 0.0)

  def fit_grid(self, x32, spec, axes):
    """Scale s_b · s_t per block (exact in float32), 0 where s_b rounds to 0."""
    s_t = self.tensor_scale(x32)
    inv = 1.0 / (self.max * jnp.where(s_t > 0, s_t, 1.0))
    s_b = jnp.clip(block_amax(x32, spec, axes) * inv, 0.0, self.scale_max)
    s_b = s_b.astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return jnp.where(s_t > 0, s_b * s_t, 0.0), None

  def encode(self, x32, scale, zp, spec, key, axes):
    x = jnp.where(jnp.isnan(x32), 0.0, x32)
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    return self.cast(jnp.where(scale > 0, x * inv, 0.0))

  def pack(self, q):
    s = q.scale.astype(jnp.float32)
    top = jnp.max(s)
    # A true division by 448: under jit, XLA would otherwise turn top / 448 into
    # top · (1 / 448), which rounds differently, and the stored E4M3 scales would no
    # longer multiply back to the exact `s` (the barrier hides the constant from it).
    divisor = jax.lax.optimization_barrier(jnp.float32(self.scale_max))
    s_t = jnp.where(top > 0, top / divisor, 1.0)
    return dataclasses.replace(q, values=self.pack_values(q.values),
                               scale=(s / s_t).astype(jnp.float8_e4m3fn),
                               tensor_scale=s_t.astype(jnp.float32),
                               logical_shape=tuple(q.shape), packed=True)

  def unpack(self, q):
    scale = q.scale.astype(jnp.float32) * q.tensor_scale
    return dataclasses.replace(q, values=self.unpack_values(q), scale=scale,
                               tensor_scale=None, packed=False)
