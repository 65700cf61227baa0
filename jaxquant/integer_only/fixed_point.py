"""Fixed-point arithmetic of integer-only inference (Jacob et al. 2018, §2.2).

A real multiplier M > 0 (a ratio of scales, e.g. s_in·s_w / s_out) is stored as an int32
M0 ∈ [2^30, 2^31) and an exponent e:   M ≈ M0 · 2^(e − 31).
Applying it to an int32 accumulator x uses only integer operations (gemmlowp's reference
semantics, which the paper's §2.2 cites; the rules are restated here exactly):

  SaturatingRoundingDoublingHighMul(a, b)   (SRDHM; a, b int32)
      = floor(a·b / 2^31 + 1/2), i.e. a·b/2^31 rounded to nearest with ties toward +∞
        (gemmlowp adds a nudge of 2^30, or 1 − 2^30 for a negative product, and divides
        by 2^31 truncating toward zero; both give this value), except a = b = −2^31
        (the only product that does not fit) which saturates to 2^31 − 1.
  RoundingDivideByPOT(x, n)                 (RDBPOT; n ∈ [0, 31])
      = x / 2^n rounded to nearest, ties away from zero (−2.5 → −3, 2.5 → 3).
  SaturatingLeftShift(x, k) = x·2^k clamped to [−2^31, 2^31 − 1].
  MultiplyByQuantizedMultiplier(x, M0, e)
      = RDBPOT(SRDHM(x, M0), −e)                        if e ≤ 0
      = SRDHM(SaturatingLeftShift(x, e), M0)            if e > 0

The requantization of integer programs is the same arithmetic with the shift split in two
and a bias added at the finer resolution,
  Requantize(x, M0, left, right, c) = RDBPOT(SRDHM(SaturatingLeftShift(x, left) + c, M0), right)
for a multiplier M0·2^(left − right − 31) and an offset c in units of 2^-left of x:
`requant_shifts` shifts small accumulators (|x| ≤ a known bound) left first, so SRDHM
keeps `left` extra fractional bits and the result is (x + bias)·M rounded once (to within
2^-(right+1)) instead of twice: with 4-bit codes an accumulator can be ~10 and M ~ 0.3,
where MultiplyByQuantizedMultiplier's intermediate x·M0/2^31 would carry only 1–2
fractional bits, and a bias rounded to whole accumulator units would be off by up to M/2
output codes.

`quantize_multiplier` chooses (M0, e) on the host: M = m·2^e with m ∈ [1/2, 1) and
M0 = round(m·2^31) (an M0 of 2^31 becomes 2^30 with e + 1). Multipliers below 2^-32
give M0 = 0 (every product rounds to 0 or ±1 anyway); above 2^30 they are refused.

In JAX the 64-bit product a·b is formed in int64 only when `jax_enable_x64` is on;
otherwise from 16-bit halves in uint32 arithmetic (exact; no float anywhere), so the
integer program never needs x64. `isqrt` is the exact floor square root (bit by bit),
used by the integer normalization.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
M0_MIN = 2 ** 30  # a normalized multiplier: M0 ∈ [2^30, 2^31)
MAX_LEFT_SHIFT = 30
MAX_RIGHT_SHIFT = 31


def quantize_multiplier(m: float) -> Tuple[int, int]:
  """(M0, e) with M0·2^(e−31) ≈ m for a real multiplier m ≥ 0 (host side, float64)."""
  m = float(m)
  if not math.isfinite(m) or m < 0:
    raise ValueError(f"multiplier={m!r} must be a finite number >= 0")
  if m == 0.0:
    return 0, 0
  frac, e = math.frexp(m)  # m = frac·2^e, frac ∈ [1/2, 1)
  m0 = int(round(frac * 2 ** 31))
  if m0 == 2 ** 31:
    m0, e = 2 ** 30, e + 1
  if e > MAX_LEFT_SHIFT:
    raise ValueError(f"multiplier={m!r} is too large for int32 requantization "
                     f"(at most 2^{MAX_LEFT_SHIFT})")
  if e < -MAX_RIGHT_SHIFT:
    return 0, 0  # below 2^-32: |x·m| < 1/2 for every int32 x
  return m0, e


def quantize_multipliers(m: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Elementwise `quantize_multiplier`: (M0 int32, e int32) arrays shaped like `m`."""
  m = np.asarray(m, np.float64)
  pairs = [quantize_multiplier(v) for v in m.reshape(-1)]
  m0 = np.array([p[0] for p in pairs], np.int64).reshape(m.shape)
  e = np.array([p[1] for p in pairs], np.int64).reshape(m.shape)
  return m0.astype(np.int32), e.astype(np.int32)


def requant_shifts(m: np.ndarray, bound) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(M0, left, right) int32 arrays for multipliers `m` applied to values with |x| ≤
  `bound` (a scalar or an array broadcasting against `m`): left is the largest shift
  (≤ 30) with bound·2^left ≤ 2^30, so the shifted value plus a rounding offset of the same
  bound stays inside int32; right = left − e. Raises ValueError when a multiplier needs
  a larger left shift than that headroom (it would saturate)."""
  m0, e = quantize_multipliers(m)
  bound = np.broadcast_to(np.asarray(bound, np.float64), m0.shape)
  headroom = np.zeros(m0.shape, np.int64)
  for shift in range(1, MAX_LEFT_SHIFT + 1):  # exact in float64: 2^shift is a power of two
    headroom += (bound * 2.0 ** shift <= 2.0 ** 30).astype(np.int64)
  e = e.astype(np.int64)
  if np.any((e > headroom) & (m0 != 0)):
    raise ValueError(f"multiplier {float(np.max(m)):.4g} needs a left shift of "
                     f"{int(np.max(e))} bits on values bounded by {float(np.max(bound)):.4g}")
  left = np.maximum(np.minimum(headroom, e + MAX_RIGHT_SHIFT), e)
  right = left - e
  left = np.where(m0 == 0, 0, left)
  right = np.where(m0 == 0, 0, right)
  return m0, left.astype(np.int32), right.astype(np.int32)


def _u32(x):
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _i32(x):
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def _mul_u32_wide(a_u, b_u):
  """(hi, lo) uint32 words of the exact 64-bit product of two uint32 values."""
  mask = jnp.uint32(0xFFFF)
  a_lo, a_hi = a_u & mask, a_u >> 16
  b_lo, b_hi = b_u & mask, b_u >> 16
  ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi  # each < 2^32
  cross = (ll >> 16) + (lh & mask) + (hl & mask)  # < 3·2^16: no wrap
  lo = (ll & mask) | (cross << 16)
  hi = hh + (lh >> 16) + (hl >> 16) + (cross >> 16)
  return hi, lo


def srdhm(a: jax.Array, b: jax.Array) -> jax.Array:
  """SaturatingRoundingDoublingHighMul of int32 arrays (broadcasting), see the module
  docstring: floor(a·b/2^31 + 1/2), saturated at a = b = −2^31."""
  a = jnp.asarray(a, jnp.int32)
  b = jnp.asarray(b, jnp.int32)
  a, b = jnp.broadcast_arrays(a, b)
  overflow = (a == INT32_MIN) & (b == INT32_MIN)
  if jax.config.jax_enable_x64:
    ab = a.astype(jnp.int64) * b.astype(jnp.int64)
    out = ((ab + (1 << 30)) >> 31).astype(jnp.int32)
  else:
    a_u, b_u = _u32(a), _u32(b)
    hi, lo = _mul_u32_wide(a_u, b_u)
    # Two's complement 64-bit product: the unsigned product of the bit patterns, minus
    # 2^32·b for a < 0 and 2^32·a for b < 0 (only the high word changes).
    hi = hi - jnp.where(a < 0, b_u, jnp.uint32(0)) - jnp.where(b < 0, a_u, jnp.uint32(0))
    lo2 = lo + jnp.uint32(1 << 30)
    hi = hi + (lo2 < lo).astype(jnp.uint32)  # carry
    # Arithmetic shift right by 31 of (hi:lo2); the result fits int32 (bar saturation).
    out = _i32((hi << 1) | (lo2 >> 31))
  return jnp.where(overflow, jnp.int32(INT32_MAX), out)


def rounding_divide_by_pot(x: jax.Array, n) -> jax.Array:
  """RoundingDivideByPOT: x / 2^n rounded to nearest, ties away from zero; n ∈ [0, 31]
  (an int or an int32 array broadcasting against x)."""
  x = jnp.asarray(x, jnp.int32)
  n = jnp.asarray(n, jnp.int32)
  mask = _i32((jnp.uint32(1) << _u32(n)) - jnp.uint32(1))  # 2^n − 1 (n = 31 fits)
  remainder = x & mask
  threshold = (mask >> 1) + (x < 0).astype(jnp.int32)
  return (x >> n) + (remainder > threshold).astype(jnp.int32)


def saturating_left_shift(x: jax.Array, k) -> jax.Array:
  """x·2^k clamped to the int32 range, k ∈ [0, 30]."""
  x = jnp.asarray(x, jnp.int32)
  k = jnp.asarray(k, jnp.int32)
  hi = jnp.int32(INT32_MAX) >> k
  lo = jnp.int32(INT32_MIN) >> k
  shifted = jnp.clip(x, lo, hi) << k
  return jnp.where(x > hi, jnp.int32(INT32_MAX), jnp.where(x < lo, jnp.int32(INT32_MIN), shifted))


def multiply_by_quantized_multiplier(x: jax.Array, m0, e) -> jax.Array:
  """x·M0·2^(e−31) in integer arithmetic (see the module docstring); `m0` and `e` are
  int32 and broadcast against `x`."""
  x = jnp.asarray(x, jnp.int32)
  e = jnp.asarray(e, jnp.int32)
  left = jnp.maximum(e, 0)
  right = jnp.maximum(-e, 0)
  return rounding_divide_by_pot(srdhm(saturating_left_shift(x, left), m0), right)


def requantize(x: jax.Array, m0, left, right, offset=None) -> jax.Array:
  """RDBPOT(SRDHM(SaturatingLeftShift(x, left) + offset, m0), right):
  (x + offset·2^-left)·m0·2^(left−right−31), the offset being a bias in units of 2^-left
  (callers bound |x·2^left| + |offset| below 2^31)."""
  shifted = saturating_left_shift(x, left)
  if offset is not None:
    shifted = shifted + jnp.asarray(offset, jnp.int32)
  return rounding_divide_by_pot(srdhm(shifted, m0), right)


def isqrt(v: jax.Array) -> jax.Array:
  """floor(sqrt(v)) of int32 values v ∈ [0, 2^31), exactly (digit-by-digit, base 4)."""
  v = jnp.asarray(v, jnp.int32)
  root = jnp.zeros_like(v)
  bit = jnp.int32(1 << 30)
  for _ in range(16):  # one result bit per step, highest first
    trial = root + bit
    take = v >= trial
    v = jnp.where(take, v - trial, v)
    root = jnp.where(take, (root >> 1) + bit, root >> 1)
    bit = bit >> 2
  return root


def rounding_divide(a: jax.Array, d) -> jax.Array:
  """a / d rounded to nearest, ties away from zero, for int32 a and d > 0 (|a|·2 + d must
  fit int32; callers check their bounds)."""
  a = jnp.asarray(a, jnp.int32)
  d = jnp.asarray(d, jnp.int32)
  mag = jax.lax.div(2 * jnp.abs(a) + d, 2 * d)  # both ≥ 0: truncation is floor
  return jnp.where(a < 0, -mag, mag)
