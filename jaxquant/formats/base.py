"""`Format`: everything the library asks of one numeric format.

Spec validation, calibration, the codec, the quantizer's clip mask, the observers'
ranges and the stored (packed) form all go through a format's object from the registry
(`jaxquant.formats.get`), so a new format is one class (or one more instance of an
existing one) and one registry entry.

Conventions shared with `jaxquant.numerics`: `x32` is float32, `axes` are the normalized
reduce axes, scales and zero points keep every axis of `x` (length 1, the axis' length or
its number of groups), `encode` receives the scale already expanded to `x`'s shape.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from jaxquant import numerics


class Format:
  """One numeric format: its code grid, scale rule, codec, clip mask and storage.

  Capabilities (class attributes, read by `QuantSpec` validation and the layers):
    zero_point: symmetric=False (an integer zero point) is allowed.
    learned_scale: ste='lsq' / 'pact' (a learned step size or clip α) is allowed.
    stochastic: rounding='stochastic' is allowed.
    unscaled: scaled=False (the codes themselves, no scale) is allowed.
    full_range: full_range=True (every code of a symmetric grid) is allowed.
    clip_range: the scale maps a clip range (lo, hi) onto the grid: percentile / MSE
      calibration, static activation ranges (`jq.calibrate`) and the range observers
      apply.
    uniform_int: a uniform integer grid (scale, zero point), what the PTQ algorithms,
      quantized gradients and the integer-only lowering work on.
    block_size: for block formats, the elements along the reduced axis that share one
      scale (the spec's granularity is then 'group' with this group size), else None.
  """
  name: str = ""
  zero_point = False
  learned_scale = False
  stochastic = False
  unscaled = False
  full_range = False
  clip_range = False
  uniform_int = False
  block_size: Optional[int] = None

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"

  def check(self, spec) -> None:
    """Raises ValueError for a field value of `spec` this format does not allow (beyond
    the capabilities above, which `QuantSpec` checks itself)."""

  def derived(self, spec) -> Dict[str, Any]:
    """Spec fields the format fixes, {field: value} (set on the spec at construction)."""
    del spec
    return {}

  def effective_bits(self, spec) -> int:
    """Information bits per value (a block format's shared scales not included)."""
    raise NotImplementedError

  def storage_bits(self, spec) -> int:
    """Bits per stored code in serving weights (scales not included)."""
    raise NotImplementedError

  def int8_codes(self, spec) -> bool:
    """Whether the codes are integers that fit an int8 container (s8 dots can run)."""
    del spec
    return False

  def code_dtype(self, spec):
    """The dtype of a `QTensor`'s (unpacked) values."""
    raise NotImplementedError

  def int_range(self, spec) -> Tuple[int, int]:
    """Integer code range [qmin, qmax] (integer formats only)."""
    raise ValueError(f"format={self.name!r} has no integer range")

  def fit_grid(self, x32, spec, axes):
    """(scale float32, zero point int32 or None) of `x32`, shaped to broadcast."""
    return self.scale_zero_point(*numerics.calibrated_range(x32, spec, axes), spec)

  def scale_zero_point(self, lo, hi, spec):
    """Scale and zero point mapping the clip range [lo, hi] onto the grid."""
    raise ValueError(f"format={self.name!r} has no clip-range scale rule")

  def encode(self, x32, scale, zp, spec, key, axes):
    """Codes of `x32` (float32 integers, or values of the format's float dtype);
    `scale` is expanded to `x32.shape`, `zp` is scale-shaped or None."""
    raise NotImplementedError

  def inside(self, x32, scale, zp, spec):
    """The clip mask: where the clipped straight-through estimator passes gradients.
    `scale` is expanded to `x32.shape`."""
    raise NotImplementedError

  def grid_range(self, scale, zp, spec):
    """(lo, hi), the values a per-tensor grid covers (scalar scale / zero point)."""
    raise ValueError(f"format={self.name!r} has no clip-range grid")

  def pack(self, q):
    """The stored form of a `QTensor` with this format (its serving bytes)."""
    return q

  def unpack(self, q):
    """Inverse of `pack`: values of `code_dtype`, float32 scales."""
    return q


def inside_codes(x32, scale, zp, qmin, qmax):
  """Whether x / scale (+ zp) lies in [qmin, qmax], with a few float32 ulps of slack:
  scale = absmax / qmax is rounded (XLA turns the division by a constant into a
  multiply), so qmax · scale can fall an ulp short of the calibrated absmax, which must
  keep its gradient."""
  z = 0.0 if zp is None else numerics.expand_to(zp, x32.shape).astype(jnp.float32)
  y = numerics.divide_by_scale(x32, scale) + z
  slack = 4 * 2.0 ** -23 * max(-qmin, qmax)
  return (y >= qmin - slack) & (y <= qmax + slack)
