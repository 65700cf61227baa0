"""Integer-code formats: 'int' (uniform b-bit grids), 'binary' and 'ternary'.

Int codes sit on a uniform grid with a scale and, asymmetric, an integer zero point;
2..8-bit codes live in int8 (packed to 2 / 4 bits for serving when 2..4 bits), 16-bit
codes in int16 (e.g. int16 activations beside int8 weights, in mode='fake'). Binary codes
are ±1 times α = mean|x| (XNOR-Net, Rastegari et al. 2016), ternary {−1, 0, 1} times the
mean of the kept |x| above Δ = 0.7·mean|x| (TWN, Li & Liu 2016).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxquant import numerics
from jaxquant import qtensor
from jaxquant.formats.base import Format, inside_codes

INT_BITS = tuple(range(2, 9)) + (16,)
TWN_THRESHOLD = 0.7  # Li & Liu 2016, Ternary Weight Networks: Δ = 0.7·E|x|.
# Clipped STE for binary/ternary passes gradients where |x| <= 1 (Hubara et al. 2016, Htanh).
SIGN_CLIP = 1.0


def _pack_planes(q, bits):
  """Codes packed `bits` to the bit into uint8 bit planes (`qtensor.pack`)."""
  if bits >= 8:
    return q
  return dataclasses.replace(q, values=qtensor.pack(q.values, bits),
                             logical_shape=tuple(q.shape), packed=True)


def _unpack_planes(q, bits):
  return dataclasses.replace(q, values=qtensor.unpack(q.values, bits, q.logical_shape),
                             packed=False)


class Int(Format):
  """'int': b-bit integer codes, b in 2..8 or 16; symmetric (restricted ±(2^(b−1) − 1), or
  every code with `full_range`) or asymmetric with an integer zero point."""
  name = "int"
  zero_point = learned_scale = stochastic = full_range = clip_range = uniform_int = True

  def check(self, spec) -> None:
    bits = spec.bits
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in INT_BITS:
      raise ValueError(f"bits={bits!r} is not allowed for format='int'; choose an int in "
                       "2..8 or 16")

  def effective_bits(self, spec) -> int:
    return spec.bits

  def storage_bits(self, spec) -> int:
    """2 for int2, 4 for int3–4, a whole byte for 5–8 bits, 16 for int16."""
    if spec.bits == 2:
      return 2
    if spec.bits <= 4:
      return 4
    return 8 if spec.bits <= 8 else 16

  def int8_codes(self, spec) -> bool:
    return spec.bits <= 8

  def code_dtype(self, spec):
    return jnp.int8 if spec.bits <= 8 else jnp.int16

  def int_range(self, spec):
    """Symmetric: the restricted range ±(2^(b-1) − 1) (negation exact, grid centred on
    0), or with `full_range` every code −2^(b−1) .. 2^(b−1) − 1; asymmetric: the full
    signed range with an integer zero point."""
    if spec.symmetric and not spec.full_range:
      q = 2 ** (spec.bits - 1) - 1
      return -q, q
    return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1

  def scale_zero_point(self, lo, hi, spec):
    qmin, qmax = self.int_range(spec)
    if spec.symmetric:
      return numerics._safe_scale(hi / numerics.symmetric_levels(spec)), None
    n = qmax - qmin
    span = hi - lo  # overflows float32 for ranges like ±3e38: divide first there
    scale = numerics._safe_scale(jnp.where(jnp.isfinite(span), span / n, hi / n - lo / n))
    zp = jnp.clip(jnp.round(qmin - numerics.divide_by_scale(lo, scale)), qmin, qmax)
    return scale, zp.astype(jnp.int32)

  def encode(self, x32, scale, zp, spec, key, axes):
    zp = None if zp is None else numerics.expand_to(zp, x32.shape)
    return numerics.encode_int(x32, scale, zp, spec, key)

  def inside(self, x32, scale, zp, spec):
    qmin, qmax = self.int_range(spec)
    if spec.symmetric and spec.full_range:  # ±absmax sit half a step beyond the codes
      qmin, qmax = -numerics.symmetric_levels(spec), numerics.symmetric_levels(spec)
    return inside_codes(x32, scale, zp, qmin, qmax)

  def grid_range(self, scale, zp, spec):
    qmin, qmax = self.int_range(spec)
    if zp is None:
      hi = scale * numerics.symmetric_levels(spec)
      return -hi, hi
    zp = zp.astype(jnp.float32)
    return (qmin - zp) * scale, (qmax - zp) * scale

  def pack(self, q):
    return _pack_planes(q, self.storage_bits(q.spec))

  def unpack(self, q):
    return _unpack_planes(q, self.storage_bits(q.spec))


class _Sign(Format):
  """Codes in {−1, (0,) 1} times a per-slice α, or the codes themselves (scaled=False)."""
  unscaled = True
  bits = 0  # information bits = storage bits per code

  def effective_bits(self, spec) -> int:
    return self.bits

  def storage_bits(self, spec) -> int:
    return self.bits

  def int8_codes(self, spec) -> bool:
    return True

  def code_dtype(self, spec):
    return jnp.int8

  def int_range(self, spec):
    return -1, 1

  def scale_zero_point(self, lo, hi, spec):
    return numerics._safe_scale(hi / 1.0), None

  def inside(self, x32, scale, zp, spec):
    return jnp.abs(x32) <= SIGN_CLIP

  def pack(self, q):
    return _pack_planes(q, self.bits)

  def unpack(self, q):
    return _unpack_planes(q, self.bits)


class Binary(_Sign):
  """'binary': sign(x) · α, α = mean|x| (XNOR-Net); 1 bit per code."""
  name = "binary"
  stochastic = True
  bits = 1

  def fit_grid(self, x32, spec, axes):
    xb, stat_axes, shape = numerics.blocked(x32, spec, axes)
    if not spec.scaled:
      return jnp.ones(shape, jnp.float32), None  # the codes themselves: ±1 (BinaryConnect)
    alpha, n = numerics._finite_mean_abs(xb, stat_axes)
    alpha = jnp.where(jnp.isfinite(alpha) & (n > 0), alpha, 1.0)  # all-zero slice: α = 0
    return alpha.reshape(shape).astype(jnp.float32), None

  def encode(self, x32, scale, zp, spec, key, axes):
    if spec.rounding == "stochastic":
      # BinaryConnect (Courbariaux et al. 2015, eq. 3): +1 with probability
      # hard_sigmoid(x/α) = clip((x/α + 1) / 2, 0, 1), else −1: stochastic rounding of
      # that probability on the grid {0, 1}.
      t = (jnp.clip(numerics.divide_by_scale(jnp.nan_to_num(x32), scale), -1.0, 1.0)
           + 1.0) * 0.5
      return 2.0 * numerics.round_values(t, spec, key) - 1.0
    return jnp.where(x32 < 0, -1.0, 1.0)


class Ternary(_Sign):
  """'ternary': {−1, 0, 1} · α with the TWN threshold Δ = 0.7·mean|x|; 2 bits per code."""
  name = "ternary"
  bits = 2

  def fit_grid(self, x32, spec, axes):
    xb, stat_axes, shape = numerics.blocked(x32, spec, axes)
    if not spec.scaled:
      return jnp.ones(shape, jnp.float32), None  # the codes themselves: {−1, 0, 1}
    ax = numerics._finite_abs(xb)
    delta = TWN_THRESHOLD * numerics._finite_mean_abs(xb, stat_axes, keepdims=True)[0]
    big = ax > delta  # same Δ as `threshold`, kept blocked here
    alpha = numerics._mean(jnp.where(big, ax, 0.0), jnp.sum(big, axis=stat_axes), stat_axes)
    return numerics._safe_scale(alpha.reshape(shape)), None

  def encode(self, x32, scale, zp, spec, key, axes):
    ax = jnp.abs(jnp.where(jnp.isnan(x32), 0.0, x32))  # ±Inf exceed Δ: they saturate
    delta = numerics.expand_to(self.threshold(x32, spec, axes), x32.shape)
    return jnp.where(ax > delta, jnp.sign(jnp.nan_to_num(x32)), 0.0)

  def threshold(self, x32, spec, axes):
    """TWN threshold Δ = 0.7·mean|x| (finite entries) per scale entry, scale-shaped."""
    xb, stat_axes, shape = numerics.blocked(x32, spec, axes)
    return TWN_THRESHOLD * numerics._finite_mean_abs(xb, stat_axes)[0].reshape(shape)
