"""Pure-jnp quantization numerics: integer ranges, scale rules, rounding and codecs.

Nothing here knows about Flax or custom VJPs. Every function takes the tensor, the
`QuantSpec` and the axes that share one scale ("reduce axes"), and returns arrays whose
shapes keep every axis of `x` (reduced axes become length 1, or the number of groups for
'group' granularity) so they broadcast back against `x` by `expand_to`.

Non-finite inputs (the documented rule): calibration looks only at finite entries (an
all-non-finite or all-zero slice gets scale 1, except binary's all-zero slice: α = 0, so
zeros stay zeros); +Inf/-Inf saturate to the largest /
smallest code; NaN gets the code of 0.0 in integer values (integers have no NaN), and
`fake_quant` puts the NaN back (`dequantize` of codes cannot: it returns the code's
value), and the int dot / conv set NaN on every output that a
NaN operand row / column (conv: example / output feature) feeds, so a NaN is never
silently hidden in float outputs.

Denormals: XLA:CPU flushes float32 denormals to zero, so an all-denormal slice
calibrates like an all-zero one (scale 1, codes of 0.0).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import eager
from jaxquant import formats
from jaxquant.percentile import nanpercentile  # called by this name: the benchmark swaps it

if TYPE_CHECKING:
  from jaxquant.spec import QuantSpec

MSE_CLIP_RATIOS = tuple(np.linspace(0.3, 1.0, 36).tolist())
FLT_MAX = float(np.finfo(np.float32).max)


def __getattr__(name):
  """FP8_DTYPES / FP8_MAX: {format name: dtype / largest value} of the scaled fp8 casts,
  read from the format registry."""
  if name in ("FP8_DTYPES", "FP8_MAX"):
    fp8 = [formats.get(n) for n in formats.having("clip_range")
           if not formats.get(n).uniform_int]
    return {f.name: (f.dtype if name == "FP8_DTYPES" else f.max) for f in fp8}
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def int_range(spec: QuantSpec) -> Tuple[int, int]:
  """Integer code range [qmin, qmax] of an integer format (`Format.int_range`).

  Symmetric 'int' uses the restricted range ±(2^(b-1) − 1) so negation is exact and the
  grid is centred on 0, or with `full_range` every code −2^(b−1) .. 2^(b−1) − 1;
  asymmetric uses the full signed range with an integer zero point. Binary codes are ±1,
  ternary {−1, 0, 1}.
  """
  return formats.get(spec.format).int_range(spec)


def symmetric_levels(spec: QuantSpec) -> float:
  """The divisor of a symmetric int scale, scale = absmax / levels: qmax for the
  restricted range, qmax + 0.5 with `full_range` (both ends then round within half a
  step: +absmax to qmax, −absmax to qmin = −qmax − 1)."""
  _, qmax = int_range(spec)
  return qmax + 0.5 if spec.full_range else float(qmax)


def normalize_axes(reduce_axes: Sequence[int], ndim: int) -> Tuple[int, ...]:
  """Validates and sorts reduce axes (negative axes allowed)."""
  try:
    raw = [int(a) for a in reduce_axes]
  except TypeError:
    raise ValueError(f"reduce_axes={reduce_axes!r} must be a sequence of ints") from None
  if any(not -max(ndim, 1) <= a < max(ndim, 1) for a in raw):  # check before wrapping
    raise ValueError(f"reduce_axes={tuple(reduce_axes)!r} out of range for rank {ndim}")
  return tuple(sorted({a % ndim if ndim else a for a in raw}))


def blocked(x: jax.Array, spec: QuantSpec, reduce_axes: Tuple[int, ...]):
  """Returns (x viewed so that each scale's elements are the axes `stat_axes`, stat_axes,
  scale_shape). 'group' splits the single reduce axis a of length K into (K/g, g)."""
  if spec.granularity == "tensor":
    return x, tuple(range(x.ndim)), (1,) * x.ndim
  if spec.granularity == "channel":
    shape = tuple(1 if i in reduce_axes else d for i, d in enumerate(x.shape))
    return x, reduce_axes, shape
  if len(reduce_axes) != 1:
    raise ValueError(f"granularity='group' needs exactly one reduce axis, got reduce_axes={reduce_axes}")
  (a,) = reduce_axes
  k, g = x.shape[a], spec.group_size
  if k % g:
    raise ValueError(f"group_size={g} must divide the reduced axis length {k} (axis {a})")
  xb = x.reshape(x.shape[:a] + (k // g, g) + x.shape[a + 1:])
  shape = x.shape[:a] + (k // g,) + x.shape[a + 1:]
  return xb, (a + 1,), shape


def expand_to(s: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Broadcasts a scale / zero point to `shape`, repeating group entries over their block."""
  for i, (sd, xd) in enumerate(zip(s.shape, shape)):
    if sd not in (1, xd):
      s = jnp.repeat(s, xd // sd, axis=i)
  return s


def _finite_abs(x):
  return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


def _mean(t, n, axes, keepdims=False):
  """Σ t / n over `axes` (n: the count, reduced like the sum); where the float32 sum
  overflows (entries near ±3e38) it divides before summing instead."""
  m = jnp.sum(t, axis=axes, keepdims=keepdims) / jnp.maximum(n, 1)
  nk = n if keepdims else jnp.expand_dims(n, axes)
  return jnp.where(jnp.isfinite(m), m,
                   jnp.sum(t / jnp.maximum(nk, 1), axis=axes, keepdims=keepdims))


def _finite_mean_abs(xb, axes, keepdims=False):
  """(mean of |x| over the finite entries, their count)."""
  n = jnp.sum(jnp.isfinite(xb), axis=axes, keepdims=keepdims)
  return _mean(_finite_abs(xb), n, axes, keepdims), n


def _stat(fn, xb, axes, shape):
  return fn(xb, axes).reshape(shape)


def _safe_scale(s):
  s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)
  return s.astype(jnp.float32)


def _min_max_then_cond() -> bool:
  """Whether `_finite_min_max` takes the plain min / max first (see there): on XLA:CPU,
  where a masked reduction writes out a masked copy of its operand. Elsewhere (GPU,
  TPU) the masked reductions fuse into one pass over the operand, while the
  `lax.cond` would make XLA materialise a float32 copy of it as the conditional's
  operand (measured on an H200: a 256 MB write per [8192, 8192] bf16 activation)."""
  return jax.default_backend() == "cpu"


def _finite_min_max(x32, axes):
  """(min, max) over `axes` of the finite entries (+inf, -inf where there are none).

  On XLA:CPU, the fast path: the plain min / max of x, two reductions straight over x
  (XLA:CPU would first write out a masked copy of x for the masked reductions; on a
  weight that is a full extra pass). Where every result is finite the slice holds no
  NaN / Inf (XLA's min / max propagate NaN, and an Inf would be the result), so they are
  the finite min / max exactly; otherwise the masked reductions run instead
  (`lax.cond`). On other backends the masked reductions run directly
  (`_min_max_then_cond`). Both give the same values."""
  def masked():
    finite = jnp.isfinite(x32)
    return (jnp.min(jnp.where(finite, x32, jnp.inf), axis=axes, initial=jnp.inf),
            jnp.max(jnp.where(finite, x32, -jnp.inf), axis=axes, initial=-jnp.inf))
  if not _min_max_then_cond():
    return masked()
  lo = jnp.min(x32, axis=axes, initial=jnp.inf)
  hi = jnp.max(x32, axis=axes, initial=-jnp.inf)
  if x32.size == 0:
    return lo, hi
  ok = jnp.all(jnp.isfinite(lo)) & jnp.all(jnp.isfinite(hi))
  return jax.lax.cond(ok, lambda: (lo, hi), masked)


def _range_stats(x32, spec, axes, scale_shape):
  """(lo, hi) of the calibrated clip range, each shaped `scale_shape`."""
  finite = jnp.isfinite(x32)
  if spec.symmetric:
    if spec.calibration == "percentile":
      ax = _finite_abs(x32)
      hi = _percentile(jnp.where(finite, ax, jnp.nan), spec.percentile, axes)
    else:  # max |x| over finite entries, 0 for a slice with none (or of size zero)
      lo, hi = _finite_min_max(x32, axes)
      hi = jnp.maximum(jnp.maximum(hi, -lo), 0.0)
    hi = jnp.nan_to_num(hi.reshape(scale_shape))
    return -hi, hi
  if spec.calibration == "percentile":
    xn = jnp.where(finite, x32, jnp.nan)
    lo = _percentile(xn, 100.0 - spec.percentile, axes)
    hi = _percentile(xn, spec.percentile, axes)
  else:
    lo, hi = _finite_min_max(x32, axes)
  lo = jnp.minimum(jnp.nan_to_num(lo.reshape(scale_shape), posinf=0.0, neginf=0.0), 0.0)
  hi = jnp.maximum(jnp.nan_to_num(hi.reshape(scale_shape), posinf=0.0, neginf=0.0), 0.0)
  return lo, hi  # the range always holds 0 so zero is exact


def _percentile(x, q, axes):
  # nanpercentile over several axes: move them last and flatten.
  keep = [i for i in range(x.ndim) if i not in axes]
  xt = jnp.transpose(x, keep + list(axes))
  xt = xt.reshape(xt.shape[: len(keep)] + (int(np.prod(xt.shape[len(keep):])),))  # no -1: size 0
  if xt.shape[-1] == 0:
    return jnp.zeros(xt.shape[:-1], jnp.float32)
  return nanpercentile(xt, q)


def divide_by_scale(x, scale):
  """x / scale for a positive `scale` that broadcasts against `x`. XLA rewrites a division
  by a broadcast as a multiply by the reciprocal, and XLA:CPU flushes a reciprocal below
  FLT_MIN (scale > ~8.5e37, e.g. 2-bit int of |x| ~ 3e38) to 0: x / s became 0 and
  ±Inf / s NaN. Such scales, and x, are first brought down by 2^-64 (exact).

  The factor is written as a division (1 / 2^64 is exactly 2^-64): XLA:CPU does not fuse
  a division into an elementwise consumer that broadcasts it, so the per-slice factor is
  computed once. Written as a select, it was fused into the pass over x and recomputed
  per element with the whole scale computation before it (a [2048, 2048] weight
  quantized in 4.1 ms, 2.5 ms now; the MLP's QAT step 0.81 -> 0.77 of float)."""
  c = 1.0 / jnp.where(scale > 2.0 ** 64, 2.0 ** 64, 1.0).astype(jnp.float32)
  return (x * c) / (scale * c)


def scale_zero_point(lo, hi, spec: QuantSpec):
  """Scale and integer zero point mapping [lo, hi] onto the code range
  (`Format.scale_zero_point`)."""
  return formats.get(spec.format).scale_zero_point(lo, hi, spec)


def round_values(y, spec: QuantSpec, key: Optional[jax.Array]):
  """Round-to-nearest (half to even) or unbiased stochastic rounding floor(y + u),
  u ~ U(0, 1) on a 2^16-point grid (see `uniform16`)."""
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")
    u = (uniform16(key, y.shape).astype(jnp.float32) + 0.5) * (1.0 / 65536)
    return jnp.floor(y + u)
  return jnp.round(y)


def _fmix32(h):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def uniform16(key, shape) -> jax.Array:
  """16 random bits (uint16) per element, for stochastic rounding.

  Two 32-bit seeds come from `key` (jax's threefry, 2 words); each element's bits are a
  counter-based hash of its linear index, fmix32(fmix32(i ^ s0) + s1), top 16 bits.
  Elementwise, so XLA fuses it into the quantizer: threefry for every element was the
  largest cost of a quantized backward pass on CPU (two [M, N] gradients per layer),
  and stochastic rounding needs only uniform, independent-looking bits, not a
  cryptographic stream. Deterministic in `key`. Falls back to `jax.random.bits` for a
  symbolic shape or ≥ 2^32 elements.
  """
  size = None
  if all(isinstance(d, (int, np.integer)) for d in shape):
    size = int(np.prod(shape))
  if size is None or size >= 2 ** 32:
    return jax.random.bits(key, tuple(shape), jnp.uint16)
  s = jax.random.bits(key, (2,), jnp.uint32)
  i = jax.lax.iota(jnp.uint32, size).reshape(shape)
  h = _fmix32(_fmix32(i ^ s[0]) + s[1])
  return (h >> 16).astype(jnp.uint16)


def encode_int(x32, scale, zp, spec, key):
  """Integer codes of x (float32) on the grid (scale, zp); NaN → code of 0, ±Inf saturate."""
  qmin, qmax = int_range(spec)
  y = divide_by_scale(x32, scale)
  if zp is not None:
    y = y + zp
  y = jnp.where(jnp.isnan(y), 0.0 if zp is None else zp.astype(jnp.float32), y)
  y = jnp.clip(y, qmin, qmax)  # clip before rounding: stochastic rounding stays in range
  return jnp.clip(round_values(y, spec, key), qmin, qmax)


def fit_grid(x: jax.Array, spec: QuantSpec, reduce_axes: Sequence[int]):
  """The grid that fits `x` for `spec`: scale (float32) and zero point (int32 or None),
  shaped to broadcast (the format's rule, `Format.fit_grid`).

  Binary: α = mean|x| (XNOR-Net, Rastegari et al. 2016). Ternary: α = mean of |x| over
  |x| > Δ with Δ = 0.7·mean|x| (TWN). Int/fp8: absmax, percentile or MSE clip range.
  Block formats: their per-block scale rule (`jaxquant.formats.minifloat`).
  """
  axes = normalize_axes(reduce_axes, x.ndim)
  return formats.get(spec.format).fit_grid(x.astype(jnp.float32), spec, axes)


def calibrated_range(x: jax.Array, spec: QuantSpec, reduce_axes: Sequence[int]):
  """The clip range (lo, hi) of an int / fp8 `spec`'s calibration (absmax, percentile or
  MSE), shaped like the scale; `fit_grid` maps it to the grid with `scale_zero_point`,
  and passing it as a quantizer's static range gives the same grid."""
  axes = normalize_axes(reduce_axes, x.ndim)
  x32 = x.astype(jnp.float32)
  xb, stat_axes, shape = blocked(x32, spec, axes)
  lo, hi = _range_stats(xb, spec, stat_axes, shape)
  if spec.calibration == "mse":
    lo, hi = _mse_search(x32, lo, hi, spec)
  return lo, hi


def _mse_search(x32, lo, hi, spec):
  """Per scale entry, the clip ratio r·[lo, hi] with least squared quantization error.

  The ratios run in a `lax.scan` (one compiled body, not one copy per ratio); ties keep
  the earlier (smaller) ratio."""
  spec = dataclasses.replace(spec, rounding="nearest")  # the search needs no PRNG key
  # Errors in units of the entry's range: squares of ±3e38 would overflow float32 (and of
  # tiny values underflow), making every ratio tie.
  unit = jnp.maximum(-lo, hi)
  unit = expand_to(jnp.where(unit > 0, unit, 1.0), x32.shape)

  def error(r):
    rlo, rhi = lo * r, hi * r
    scale, zp = scale_zero_point(rlo, rhi, spec)
    xq = decode(encode(x32, scale, zp, spec, None), expand_to(scale, x32.shape),
                None if zp is None else expand_to(zp, x32.shape))
    xq = jnp.clip(xq, -FLT_MAX, FLT_MAX)  # as QTensor.dequantize saturates a grid edge
    err = jnp.where(jnp.isfinite(x32), divide_by_scale(xq - x32, unit) ** 2, 0.0)
    return block_sum(err, scale.shape), rlo, rhi

  def step(best, r):
    err, rlo, rhi = error(r)
    better = err < best[0]
    return tuple(jnp.where(better, new, old) for new, old in
                 zip((err, rlo, rhi), best)), None

  ratios = jnp.asarray(MSE_CLIP_RATIOS, jnp.float32)
  best, _ = jax.lax.scan(step, error(ratios[0]), ratios[1:])
  return best[1], best[2]


def block_sum(err, scale_shape):
  """Sums `err` over the elements that share each scale entry."""
  shape = []
  for sd, xd in zip(scale_shape, err.shape):
    shape += [sd, xd // sd] if sd not in (1, xd) else [sd, 1] if sd == xd else [1, xd]
  e = err.reshape(shape)
  return jnp.sum(e, axis=tuple(range(1, len(shape), 2))).reshape(scale_shape)


def encode(x32, scale, zp, spec: QuantSpec, key, axes=()):
  """Codes of x (`Format.encode`): int codes as float32 for integer formats, or values of
  the format's float dtype (fp8, the block formats' elements).

  `axes` (normalized reduce axes) is only needed for ternary's data-dependent threshold.
  """
  scale = expand_to(scale, x32.shape)
  return formats.get(spec.format).encode(x32, scale, zp, spec, key, axes)


def decode(codes, scale_full, zp_full):
  """Float32 values (codes − zp)·scale from codes; `scale_full` already expanded."""
  c = codes.astype(jnp.float32)
  if zp_full is not None:
    c = c - zp_full.astype(jnp.float32)
  return c * scale_full


def lsq_range(spec: QuantSpec) -> Tuple[int, int]:
  """(−Q_N, Q_P), the lowest and highest multiple of the LSQ step on the grid: the
  symmetric codes (−(2^(b−1) − 1), 2^(b−1) − 1), or unsigned (0, 2^b − 1) with
  symmetric=False."""
  qmin, qmax = int_range(spec)
  return (qmin, qmax) if spec.symmetric else (0, qmax - qmin)


def init_learned(x: jax.Array, spec: QuantSpec, reduce_axes: Sequence[int]) -> jax.Array:
  """Initial value of the learned quantity: LSQ step size 2·mean|x|/sqrt(Q_P) (Esser et
  al. 2019, §2.1) or PACT clip α = the calibrated clip range (absmax by default)."""
  axes = normalize_axes(reduce_axes, x.ndim)
  xb, stat_axes, shape = blocked(x.astype(jnp.float32), spec, axes)
  if spec.ste == "lsq":
    _, qmax = lsq_range(spec)
    # _mean: a float32 sum of |x| ~ 3e38 overflows; 2·mean may pass FLT_MAX: saturate.
    m = _mean(_finite_abs(xb), jnp.sum(jnp.ones(xb.shape, jnp.int32), axis=stat_axes), stat_axes)
    return _safe_scale(jnp.minimum(2.0 * m.reshape(shape) / np.sqrt(qmax), FLT_MAX))
  if spec.ste == "pact":
    lo, hi = _range_stats(xb, spec, stat_axes, shape)
    return _safe_scale(hi)
  raise ValueError(f"ste={spec.ste!r} has no learned quantity; use 'lsq' or 'pact'")


# `init_learned`, one compiled call outside a trace (see `jaxquant.eager`); `spec` and
# `reduce_axes` by keyword.
init_learned_compiled = eager.compiled_when_eager(init_learned, ("spec", "reduce_axes"))


def elements_per_scale(shape: Sequence[int], scale_shape: Sequence[int]) -> int:
  """How many elements of x share one scale entry (N in LSQ's gradient scale)."""
  return int(np.prod(shape) // max(1, np.prod(scale_shape)))
