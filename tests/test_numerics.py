"""Quantizer numerics against independent numpy references: round-trip bounds per format,
calibration (absmax / percentile / mse), the NaN/Inf rule, golden error values, and one
test sweeping every quantizer."""
import functools
import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import numerics

QS = jq.QuantSpec
FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 3, -9),  # dtype, max, mantissa bits,
       "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0, 2, -16)}  # log2 smallest subnormal
FORMATS = ("int", "binary", "ternary", "fp8_e4m3", "fp8_e5m2")


def rng_x(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# Jitted entry points (one compile per spec and shape; eagerly every op compiles on its
# own). quantize, fake_quant and dequantize stay separate programs, so a test comparing
# fake_quant with dequantize(quantize) still compares two independently compiled paths.
@functools.lru_cache(maxsize=None)
def _jitted(fn, spec, reduce_axes):
  return jax.jit(functools.partial(fn, spec=spec, reduce_axes=reduce_axes))


def jit_quantize(x, spec, reduce_axes):
  return _jitted(jq.quantize, spec, tuple(reduce_axes))(x)


def jit_fake_quant(x, spec, reduce_axes):
  return _jitted(jq.fake_quant, spec, tuple(reduce_axes))(x)


jit_dequantize = jax.jit(jq.dequantize)


# ------------------------------------------------------------------ numpy references

def np_blocked(x, granularity, axis, group_size):
  """x viewed so each scale's elements lie on `red` axes (keepdims stats broadcast)."""
  if granularity == "tensor":
    return x, tuple(range(x.ndim))
  if granularity == "channel":
    return x, (axis,)
  k = x.shape[axis]
  xb = x.reshape(x.shape[:axis] + (k // group_size, group_size) + x.shape[axis + 1:])
  return xb, (axis + 1,)


def np_int_range(bits, symmetric):
  if symmetric:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def np_int_quant(x, bits, symmetric, granularity="channel", axis=0, group_size=None,
                 clip=1.0):
  """(dequantized, codes, scale, zp), all broadcast to x.shape; absmax range × `clip`."""
  x = np.asarray(x, np.float32)
  xb, red = np_blocked(x, granularity, axis, group_size)
  qmin, qmax = np_int_range(bits, symmetric)
  if symmetric:
    hi = np.max(np.abs(xb), axis=red, keepdims=True) * np.float32(clip)
    s = (hi / np.float32(qmax)).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    zp = np.zeros_like(s)
  else:
    lo = np.minimum(np.min(xb, axis=red, keepdims=True), 0) * np.float32(clip)
    hi = np.maximum(np.max(xb, axis=red, keepdims=True), 0) * np.float32(clip)
    s = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    zp = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax).astype(np.float32)
  codes = np.round(np.clip(xb / s + zp, qmin, qmax))
  deq = ((codes - zp) * s).astype(np.float32)
  full = lambda a: np.broadcast_to(a, xb.shape).reshape(x.shape)
  return full(deq), full(codes), full(s), full(zp)


def np_binary(x, granularity="channel", axis=0, group_size=None):
  xb, red = np_blocked(np.asarray(x, np.float32), granularity, axis, group_size)
  alpha = np.mean(np.abs(xb), axis=red, keepdims=True)  # XNOR-Net α = mean|W|
  return (np.where(xb < 0, -1.0, 1.0) * alpha).reshape(x.shape).astype(np.float32)


def np_ternary(x, granularity="channel", axis=0, group_size=None):
  xb, red = np_blocked(np.asarray(x, np.float32), granularity, axis, group_size)
  ax = np.abs(xb)
  delta = 0.7 * np.mean(ax, axis=red, keepdims=True)  # TWN Δ = 0.7·E|x|
  big = ax > delta
  alpha = np.sum(np.where(big, ax, 0), axis=red, keepdims=True) / np.maximum(
      np.sum(big, axis=red, keepdims=True), 1)
  return (np.sign(xb) * big * alpha).reshape(x.shape).astype(np.float32)


def np_expand(a, shape):
  """Broadcasts a scale-shaped array to `shape`, repeating group entries over their block."""
  a = np.asarray(a)
  for i, (sd, xd) in enumerate(zip(a.shape, shape)):
    if sd != xd:
      a = np.repeat(a, xd // sd, axis=i)
  return a


def fp8_bound(x, scale, fmt):
  """Half-ulp bound of the scaled fp8 cast: relative 2^-(m+1), plus half the smallest
  subnormal (times the scale) and float32 slack."""
  _, _, m, sub = FP8[fmt]
  return (2.0 ** -(m + 1) * np.abs(x) + scale * 2.0 ** (sub - 1)) * (1 + 1e-5) + 1e-30


def spec_of(fmt, **kw):
  if fmt != "int":
    kw.pop("bits", None)
  return QS(format=fmt, **kw)


# ------------------------------------------------------------------ int round trip

def test_int_range_closed_form():
  for bits in range(2, 9):
    assert numerics.int_range(QS(bits=bits)) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert numerics.int_range(QS(bits=bits, symmetric=False)) == (-(2 ** (bits - 1)),
                                                                   2 ** (bits - 1) - 1)
  assert numerics.int_range(QS(format="binary")) == (-1, 1)
  assert numerics.int_range(QS(format="ternary")) == (-1, 1)


GRANULARITY_LIST = ["tensor", "channel", "group"]


def _round_trip_cases():
  """bits × symmetric × granularity; the default run keeps every bits once, symmetric for
  even bits and asymmetric for odd, with the granularity rotating (bits % 3), so each
  symmetry meets every granularity; the rest of the cross product is slow."""
  for bits in range(2, 9):
    for symmetric in (True, False):
      for g, granularity in enumerate(GRANULARITY_LIST):
        quick = symmetric == (bits % 2 == 0) and g == bits % 3
        yield pytest.param(bits, symmetric, granularity,
                           id=f"{bits}-{symmetric}-{granularity}",
                           marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("bits, symmetric, granularity", list(_round_trip_cases()))
def test_int_round_trip_within_half_step(bits, symmetric, granularity):
  x = rng_x((64, 32), seed=bits) * np.linspace(0.1, 10, 32, dtype=np.float32)
  gs = 16 if granularity == "group" else None
  spec = QS(bits=bits, symmetric=symmetric, granularity=granularity, group_size=gs)
  q = jit_quantize(x, spec, reduce_axes=(0,))
  deq = np.asarray(jit_dequantize(q))
  ref_deq, ref_codes, ref_s, ref_zp = np_int_quant(x, bits, symmetric, granularity, 0, gs)
  # Every value lies inside the calibrated (absmax) range: error <= scale / 2.
  assert np.all(np.abs(deq - x) <= ref_s / 2 * (1 + 1e-5))
  np.testing.assert_allclose(np_expand(q.scale, x.shape), ref_s, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.values), ref_codes)
  np.testing.assert_allclose(deq, ref_deq, rtol=1e-6, atol=1e-7)
  qmin, qmax = np_int_range(bits, symmetric)
  assert q.values.dtype == jnp.int8
  assert qmin <= int(q.values.min()) and int(q.values.max()) <= qmax
  if symmetric:
    assert q.zero_point is None
  else:
    assert q.zero_point.dtype == jnp.int32
    np.testing.assert_array_equal(np_expand(q.zero_point, x.shape), ref_zp)
    # 0.0 is exactly representable: the range always holds zero.
    xz = x.copy()
    xz[-16:] = 0.0  # a whole group of zeros, same shape (reuses compiled ops)
    z = jit_quantize(xz, spec, reduce_axes=(0,))
    assert np.all(np.asarray(jit_dequantize(z))[-16:] == 0.0)


def _int_round_trip_property(bits, symmetric, granularity, shape_gs, seed, log_mag):
  """fake_quant of any int spec, shape and magnitude is within half a step of x."""
  shape, group_size = shape_gs
  x = rng_x(shape, seed) * np.float32(10.0 ** log_mag)
  gs = group_size if granularity == "group" else None
  spec = QS(bits=bits, symmetric=symmetric, granularity=granularity, group_size=gs)
  deq = np.asarray(jit_fake_quant(x, spec, reduce_axes=(0,)))
  _, _, ref_s, _ = np_int_quant(x, bits, symmetric, granularity, 0, gs)
  assert deq.shape == x.shape and deq.dtype == np.float32
  assert np.all(np.abs(deq - x) <= ref_s / 2 * (1 + 1e-5))


def _int_round_trip_given(max_examples):
  # Shapes from a small set: every new shape costs XLA compilations.
  return hypothesis.settings(max_examples=max_examples, deadline=None, derandomize=True)(
      hypothesis.given(bits=st.integers(2, 8), symmetric=st.booleans(),
                       granularity=st.sampled_from(["tensor", "channel", "group"]),
                       shape_gs=st.sampled_from([((64, 32), 16), ((4, 1), 1), ((6, 3), 2)]),
                       seed=st.integers(0, 2 ** 16), log_mag=st.floats(-6, 6))(
                           _int_round_trip_property))


# The default run draws 4 examples; the slow one 10 (more specs, shapes and magnitudes).
test_int_round_trip_property = _int_round_trip_given(4)
test_int_round_trip_property_deep = pytest.mark.slow(_int_round_trip_given(10))


def test_reduce_axes_negative_multiple_and_out_of_range():
  x = rng_x((4, 5, 6))
  a = jq.quantize(x, QS(), reduce_axes=(0, 2))
  b = jq.quantize(x, QS(), reduce_axes=(-1, -3))
  assert a.scale.shape == (1, 5, 1)
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  np.testing.assert_allclose(np.asarray(a.scale).ravel(), np.abs(x).max(axis=(0, 2)) / 127,
                             rtol=1e-6)
  for bad in [(3,), (-4,), (0, 7)]:
    with pytest.raises(ValueError, match="reduce_axes"):
      jq.quantize(x, QS(), reduce_axes=bad)


def test_group_errors_name_the_problem():
  x = rng_x((12, 4))
  with pytest.raises(ValueError, match="group_size"):
    jq.quantize(x, QS(granularity="group", group_size=5), reduce_axes=(0,))
  with pytest.raises(ValueError, match="reduce axis"):
    jq.quantize(x, QS(granularity="group", group_size=4), reduce_axes=(0, 1))


# ------------------------------------------------------------------ fp8, binary, ternary

@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_round_trip_half_ulp(fmt, granularity):
  dtype, fmax, _, _ = FP8[fmt]
  # Wide dynamic range: most scaled values are normal, many are subnormal.
  x = rng_x((64, 32)) * np.float32(10.0) ** np.random.default_rng(1).uniform(-6, 1, (64, 32))
  x = x.astype(np.float32)
  gs = 16 if granularity == "group" else None
  q = jq.quantize(x, QS(format=fmt, granularity=granularity, group_size=gs), reduce_axes=(0,))
  assert q.values.dtype == jnp.dtype(dtype) and q.zero_point is None
  xb, red = np_blocked(x, granularity, 0, gs)
  s = np.broadcast_to(np.max(np.abs(xb), axis=red, keepdims=True) / np.float32(fmax),
                      xb.shape).reshape(x.shape).astype(np.float32)
  np.testing.assert_allclose(np_expand(q.scale, x.shape), s, rtol=1e-6)
  deq = np.asarray(jq.dequantize(q))
  assert np.all(np.abs(deq - x) <= fp8_bound(x, s, fmt))
  # Same values as ml_dtypes' round-to-nearest-even cast of the scaled tensor.
  ref = (x / s).astype(dtype).astype(np.float32) * s
  np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_binary_matches_xnor_net(granularity):
  x = rng_x((64, 32), seed=3)
  gs = 16 if granularity == "group" else None
  spec = QS(format="binary", granularity=granularity, group_size=gs)
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)))
  np.testing.assert_allclose(out, np_binary(x, granularity, 0, gs), rtol=1e-6)
  q = jq.quantize(x, spec, reduce_axes=(0,))
  assert set(np.unique(np.asarray(q.values))) <= {-1, 1} and q.values.dtype == jnp.int8


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_ternary_matches_twn(granularity):
  x = rng_x((64, 32), seed=4)
  gs = 16 if granularity == "group" else None
  spec = QS(format="ternary", granularity=granularity, group_size=gs)
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)))
  np.testing.assert_allclose(out, np_ternary(x, granularity, 0, gs), rtol=1e-6)
  q = jq.quantize(x, spec, reduce_axes=(0,))
  codes = np.asarray(q.values)
  assert set(np.unique(codes)) == {-1, 0, 1}


# ------------------------------------------------------------------ calibration

@pytest.mark.parametrize("fmt,symmetric", [("int", True), ("int", False), ("fp8_e4m3", True)])
@pytest.mark.parametrize("pct", [99.0, 90.0])
def test_percentile_clip_range(fmt, symmetric, pct):
  x = rng_x((64, 32), seed=5) ** 3  # heavy tails: the percentile clips
  spec = spec_of(fmt, bits=6, symmetric=symmetric, calibration="percentile", percentile=pct)
  q = jq.quantize(x, spec, reduce_axes=(0,))
  scale = np.asarray(q.scale).ravel()
  if fmt == "fp8_e4m3":
    np.testing.assert_allclose(scale * 448.0, np.percentile(np.abs(x), pct, axis=0), rtol=1e-5)
  elif symmetric:
    np.testing.assert_allclose(scale * 31, np.percentile(np.abs(x), pct, axis=0), rtol=1e-5)
  else:
    hi = np.maximum(np.percentile(x, pct, axis=0), 0)
    lo = np.minimum(np.percentile(x, 100 - pct, axis=0), 0)
    np.testing.assert_allclose(scale, (hi - lo) / 63, rtol=1e-5)
  # Values beyond the clip range saturate; inside, int error is at most half a step.
  deq = np.asarray(jq.dequantize(q))
  if fmt == "int":
    qmin, qmax = np_int_range(6, symmetric)
    zp = 0 if symmetric else np.asarray(q.zero_point).ravel()
    lo_c, hi_c = (qmin - zp) * scale, (qmax - zp) * scale
    assert np.all(np.abs(deq - np.clip(x, lo_c, hi_c)) <= scale / 2 * (1 + 1e-5))
    assert np.any(x > hi_c) and np.all(deq <= hi_c * (1 + 1e-6))


@pytest.mark.parametrize("fmt,symmetric,granularity", [
    ("int", True, "channel"), ("int", False, "channel"), ("int", True, "group"),
    ("int", False, "tensor"), ("fp8_e5m2", True, "channel")])
def test_mse_calibration_is_grid_argmin_and_beats_absmax(fmt, symmetric, granularity):
  x = rng_x((64, 32), seed=6) ** 3
  gs = 16 if granularity == "group" else None
  kw = dict(bits=3, symmetric=symmetric, granularity=granularity, group_size=gs)
  q = jq.quantize(x, spec_of(fmt, calibration="mse", **kw), reduce_axes=(0,))
  deq_mse = np.asarray(jq.dequantize(q))
  xb, red = np_blocked(x, granularity, 0, gs)
  err = lambda d: np.sum((d.reshape(xb.shape) - xb) ** 2, axis=red)
  # numpy brute force over the documented clip-ratio grid.
  if fmt == "int":
    grid = [err(np_int_quant(x, 3, symmetric, granularity, 0, gs, clip=r)[0])
            for r in numerics.MSE_CLIP_RATIOS]
  else:
    dtype, fmax = FP8[fmt][:2]
    hi = np.max(np.abs(xb), axis=red, keepdims=True)
    grid = []
    for r in numerics.MSE_CLIP_RATIOS:
      s = (hi * np.float32(r) / np.float32(fmax)).astype(np.float32)
      grid.append(err(np.clip(xb / s, -fmax, fmax).astype(dtype).astype(np.float32) * s))
  grid = np.stack(grid)
  absmax_err = grid[-1]
  assert numerics.MSE_CLIP_RATIOS[-1] == 1.0
  e = err(deq_mse)
  assert np.all(e <= absmax_err * (1 + 1e-5))
  np.testing.assert_allclose(e, grid.min(axis=0), rtol=1e-4)
  if fmt == "int":  # heavy tails: clipping really helps somewhere (fp8 error is relative)
    assert np.any(e < 0.9 * absmax_err)


def _all_zero_cases():
  """format (and int symmetry) × calibration; the default run keeps each format once and
  each calibration twice (rotating), the rest of the cross product is slow."""
  kinds = [("int", True), ("int", False), ("binary", True), ("ternary", True),
           ("fp8_e4m3", True), ("fp8_e5m2", True)]
  for c, calibration in enumerate(["absmax", "percentile", "mse"]):
    for k, (fmt, symmetric) in enumerate(kinds):
      yield pytest.param(fmt, symmetric, calibration, id=f"{calibration}-{fmt}-{symmetric}",
                         marks=() if k % 3 == c else pytest.mark.slow)


@pytest.mark.parametrize("fmt,symmetric,calibration", list(_all_zero_cases()))
def test_all_zero_tensor_gives_zeros(fmt, symmetric, calibration):
  x = np.zeros((64, 32), np.float32)
  for granularity in ("tensor", "channel"):
    spec = spec_of(fmt, symmetric=symmetric, calibration=calibration, granularity=granularity)
    out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)))
    assert np.all(out == 0.0), (spec, out)
    q = jq.quantize(x, spec, reduce_axes=(0,))
    assert np.all(np.isfinite(np.asarray(q.scale)))
    assert np.all(np.asarray(jq.dequantize(q)) == 0.0)


NONFINITE_FMTS = [("int", True), ("int", False), ("binary", True), ("ternary", True),
                  ("fp8_e4m3", True), ("fp8_e5m2", True)]


@pytest.mark.parametrize("fmt,symmetric", NONFINITE_FMTS)
def test_nan_inf_rule(fmt, symmetric):
  """Calibration sees only finite entries; ±Inf saturate to the extreme codes; NaN gets the
  code of 0.0; fake_quant puts NaN back."""
  x = rng_x((64, 32), seed=7)
  clean = x.copy()
  x[2, 0], x[5, 0], x[9, 0] = np.nan, np.inf, -np.inf
  x[:, 2] = [np.nan, np.inf, -np.inf, np.nan] * 16  # an all-non-finite channel
  spec = spec_of(fmt, symmetric=symmetric)
  q = jq.quantize(x, spec, reduce_axes=(0,))
  q_clean = jq.quantize(np.delete(clean[:, :1], [2, 5, 9], axis=0), spec, reduce_axes=(0,))
  scale = np.asarray(q.scale).ravel()
  np.testing.assert_allclose(scale[0], np.asarray(q_clean.scale).ravel()[0], rtol=1e-6)
  assert np.all(np.isfinite(scale)) and scale[2] == 1.0
  codes = np.asarray(q.values).astype(np.float32)
  deq = np.asarray(jq.dequantize(q))
  zp = 0 if q.zero_point is None else np.asarray(q.zero_point).ravel()[0]
  if fmt == "int":
    qmin, qmax = np_int_range(8, symmetric)
    assert codes[5, 0] == qmax and codes[9, 0] == qmin and codes[2, 0] == zp
  elif fmt in ("binary", "ternary"):
    assert codes[5, 0] == 1 and codes[9, 0] == -1
    assert codes[2, 0] == (1 if fmt == "binary" else 0)  # the code 0.0 gets
  else:
    fmax = FP8[fmt][1]
    assert codes[5, 0] == fmax and codes[9, 0] == -fmax and codes[2, 0] == 0
  if fmt != "binary":
    assert deq[2, 0] == 0.0
  assert np.all(np.isfinite(deq))
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)))
  assert np.isnan(out[2, 0]) and np.all(np.isnan(out) == np.isnan(x))
  assert out[5, 0] == deq[5, 0] and out[9, 0] == deq[9, 0]
  np.testing.assert_array_equal(out[:, 1], deq[:, 1])


# ------------------------------------------------------------------ goldens and sweep

GOLDEN_X = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
# MSE of fake_quant(GOLDEN_X, spec, reduce_axes=(0,)) (per-channel over axis 0), computed
# from the implementation after the reference checks above passed. Regression goldens.
GOLDEN_MSE = {
    "int8_sym": 3.661155e-05,
    "int8_asym": 2.869482e-05,
    "int4_sym": 1.236778e-02,
    "int4_asym": 8.189611e-03,
    "int2_sym": 0.542758,
    "int4_sym_percentile": 1.170087e-02,
    "int4_sym_mse": 1.063188e-02,
    "int4_sym_group16": 7.387491e-03,
    "binary": 0.355123,
    "ternary": 0.1872364,
    "fp8_e4m3": 6.579713e-04,
    "fp8_e5m2": 2.585782e-03,
}
GOLDEN_SPECS = {
    "int8_sym": QS(bits=8),
    "int8_asym": QS(bits=8, symmetric=False),
    "int4_sym": QS(bits=4),
    "int4_asym": QS(bits=4, symmetric=False),
    "int2_sym": QS(bits=2),
    "int4_sym_percentile": QS(bits=4, calibration="percentile", percentile=99.0),
    "int4_sym_mse": QS(bits=4, calibration="mse"),
    "int4_sym_group16": QS(bits=4, granularity="group", group_size=16),
    "binary": QS(format="binary"),
    "ternary": QS(format="ternary"),
    "fp8_e4m3": QS(format="fp8_e4m3"),
    "fp8_e5m2": QS(format="fp8_e5m2"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_mse(name):
  out = np.asarray(jq.fake_quant(GOLDEN_X, GOLDEN_SPECS[name], reduce_axes=(0,)))
  mse = float(np.mean((out.astype(np.float64) - GOLDEN_X) ** 2))
  np.testing.assert_allclose(mse, GOLDEN_MSE[name], rtol=1e-4)


def test_golden_mse_agrees_with_numpy_references():
  x = GOLDEN_X
  mse = lambda d: float(np.mean((d.astype(np.float64) - x) ** 2))
  refs = {
      "int8_sym": np_int_quant(x, 8, True)[0], "int8_asym": np_int_quant(x, 8, False)[0],
      "int4_sym": np_int_quant(x, 4, True)[0], "int4_asym": np_int_quant(x, 4, False)[0],
      "int2_sym": np_int_quant(x, 2, True)[0],
      "int4_sym_group16": np_int_quant(x, 4, True, "group", 0, 16)[0],
      "binary": np_binary(x), "ternary": np_ternary(x),
  }
  for fmt in FP8:
    dtype, fmax = FP8[fmt][:2]
    s = np.max(np.abs(x), axis=0, keepdims=True) / np.float32(fmax)
    refs[fmt] = (x / s).astype(dtype).astype(np.float32) * s
  for name, ref in refs.items():
    np.testing.assert_allclose(mse(ref), GOLDEN_MSE[name], rtol=1e-4, err_msg=name)


def _all_quantizers():
  for fmt, calibration, granularity in itertools.product(
      FORMATS, ("absmax", "percentile", "mse"), ("tensor", "channel", "group")):
    for symmetric in ((True, False) if fmt == "int" else (True,)):
      gs = 16 if granularity == "group" else None
      yield spec_of(fmt, bits=4, symmetric=symmetric, calibration=calibration,
                    granularity=granularity, group_size=gs, percentile=99.0)


def _every_quantizer_cases():
  """Every quantizer; the default run keeps, for each format (and int symmetry), each
  calibration once with the granularity rotating by format, so every pair of format,
  calibration and granularity is covered. The rest of the cross product is slow."""
  cals, grans = ("absmax", "percentile", "mse"), ("tensor", "channel", "group")
  kinds = sorted({(s.format, s.symmetric) for s in _all_quantizers()})
  for spec in _all_quantizers():
    k = kinds.index((spec.format, spec.symmetric))
    quick = grans.index(spec.granularity) == (cals.index(spec.calibration) + k) % 3
    yield pytest.param(spec, id=str(spec), marks=() if quick else pytest.mark.slow)


REL_MSE_MAX = {"int": 0.03, "binary": 0.45, "ternary": 0.35, "fp8_e4m3": 0.01,
               "fp8_e5m2": 0.02}


@pytest.mark.parametrize("spec", list(_every_quantizer_cases()))
def test_every_quantizer(spec):
  x = GOLDEN_X
  q = jq.quantize(x, spec, reduce_axes=(0,))
  out = jq.fake_quant(x, spec, reduce_axes=(0,))
  assert out.shape == x.shape and out.dtype == jnp.float32
  out = np.asarray(out)
  assert np.all(np.isfinite(out))
  deq = np.asarray(jq.dequantize(q))
  np.testing.assert_array_equal(out, deq)
  expected_scale_shape = {"tensor": (1, 1), "channel": (1, 32), "group": (4, 32)}
  assert q.scale.shape == expected_scale_shape[spec.granularity]
  assert q.scale.dtype == jnp.float32
  scale_np = np.asarray(q.scale)
  assert np.all(np.isfinite(scale_np) & (scale_np > 0))
  s = np_expand(q.scale, x.shape)
  codes = np.asarray(q.values).astype(np.float32)
  if spec.format == "int":
    assert q.values.dtype == jnp.int8
    qmin, qmax = np_int_range(4, spec.symmetric)
    assert qmin <= codes.min() and codes.max() <= qmax
    zp = 0 if spec.symmetric else np_expand(q.zero_point, x.shape)
    clipped = np.clip(x, (qmin - zp) * s, (qmax - zp) * s)
    assert np.all(np.abs(out - clipped) <= s / 2 * (1 + 1e-5))
  elif spec.format in ("binary", "ternary"):
    assert q.values.dtype == jnp.int8 and q.zero_point is None
    ref = np_binary if spec.format == "binary" else np_ternary
    np.testing.assert_allclose(out, ref(x, spec.granularity, 0, spec.group_size), rtol=1e-6)
  else:
    fmax = FP8[spec.format][1]
    assert q.values.dtype == jnp.dtype(FP8[spec.format][0])
    clipped = np.clip(x, -fmax * s, fmax * s)
    assert np.all(np.abs(out - clipped) <= fp8_bound(clipped, s, spec.format))
  rel_mse = np.mean((out - x) ** 2) / np.mean(x ** 2)
  assert rel_mse < REL_MSE_MAX[spec.format]


def test_every_quantizer_covers_all_formats():
  specs = list(_all_quantizers())
  assert {s.format for s in specs} == set(FORMATS)
  assert len(specs) == 2 * 9 + 4 * 9


@pytest.mark.parametrize("calibration", ["absmax", "percentile", "mse"])
def test_stochastic_rounding_with_every_calibration(calibration):
  import jax
  spec = QS(bits=4, calibration=calibration, rounding="stochastic")
  out = np.asarray(jq.fake_quant(GOLDEN_X, spec, reduce_axes=(0,), key=jax.random.key(0)))
  s = np_expand(jq.quantize(GOLDEN_X, QS(bits=4, calibration=calibration),
                                                reduce_axes=(0,)).scale, GOLDEN_X.shape)
  clipped = np.clip(GOLDEN_X, -7 * s, 7 * s)
  assert np.all(np.abs(out - clipped) <= s * (1 + 1e-5))  # within one step


def test_nearest_rounding_breaks_exact_ties_to_even():
  """The documented tie rule: x/s = ±0.5, ±1.5, ±2.5, ±3.5 → 0, ±2, ±2, ±4 (half to
  even), not half-up (1, 2, 3, 4) nor half away from zero. absmax 127 gives s = 1."""
  x = jnp.asarray([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 127.0], jnp.float32)
  spec = jq.QuantSpec(bits=8, granularity="tensor")
  q = jq.quantize(x, spec, reduce_axes=(0,))
  assert float(q.scale.reshape(())) == 1.0
  np.testing.assert_array_equal(np.asarray(q.values), [0, 2, 2, 4, 0, -2, -2, -4, 127])
  np.testing.assert_array_equal(np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,))),
                                [0, 2, 2, 4, 0, -2, -2, -4, 127])
  # The same rule inside the int8 contraction: a one-hot weight reads the codes back.
  w = jnp.eye(9, dtype=jnp.float32) * 127.0  # per-column scale 1, codes 127·δ
  # Under jit: one compile of the contraction instead of one per eager op (~6x faster).
  out = jax.jit(lambda a, b: jq.dot_general(a, b, (((1,), (0,)), ((), ())), jq.DotSpec(
      lhs=spec, rhs=jq.QuantSpec(bits=8))))(x[None], w)
  np.testing.assert_array_equal(np.asarray(out)[0] / 127.0, [0, 2, 2, 4, 0, -2, -2, -4, 127])


def test_uniform16_bits_are_uniform_independent_and_keyed():
  """The counter-hash bits of stochastic rounding: uniform 16-bit values (each bit ~1/2,
  16 equal bins), neighbours uncorrelated, deterministic per key, different per key."""
  from jaxquant.numerics import uniform16  # pylint: disable=import-outside-toplevel
  k = jax.random.key(7)
  u = np.asarray(uniform16(k, (256, 512))).astype(np.int64)
  assert u.min() >= 0 and u.max() < 2 ** 16
  n = u.size
  bits = (u[..., None] >> np.arange(16)) & 1
  np.testing.assert_allclose(bits.reshape(-1, 16).mean(0), 0.5, atol=5 / np.sqrt(n))
  counts = np.bincount((u >> 12).ravel(), minlength=16)
  chi2 = np.sum((counts - n / 16) ** 2 / (n / 16))
  assert chi2 < 60  # 15 degrees of freedom: p ~ 1e-7
  f = (u.astype(np.float64) + 0.5) / 65536 - 0.5
  assert abs(np.mean(f[:, 1:] * f[:, :-1])) < 5 / (12 * np.sqrt(n))  # along rows
  assert abs(np.mean(f[1:] * f[:-1])) < 5 / (12 * np.sqrt(n))  # along columns
  np.testing.assert_array_equal(u, np.asarray(uniform16(k, (256, 512))))
  other = np.asarray(uniform16(jax.random.key(8), (256, 512)))
  assert np.mean(other == u) < 0.01


@pytest.mark.parametrize("axes", [(1,), (0, 1)])
def test_finite_min_max_same_on_the_cpu_path_and_the_masked_path(monkeypatch, axes):
  """The CPU fast path (plain min / max, masked reductions under lax.cond when a result
  is not finite) and the masked reductions used on GPU / TPU agree exactly, with NaN,
  ±Inf, rows with no finite entry, and all-finite data."""
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  with_bad = x.copy()
  with_bad[0, 3], with_bad[1, 0], with_bad[2, 6] = np.nan, np.inf, -np.inf
  with_bad[3, :] = np.nan
  results = {}
  for cpu_path in (True, False):
    monkeypatch.setattr(numerics, "_min_max_then_cond", lambda c=cpu_path: c)
    fn = jax.jit(lambda v: numerics._finite_min_max(v, axes))
    results[cpu_path] = [tuple(np.asarray(t) for t in fn(v)) for v in (x, with_bad)]
  for (lo_c, hi_c), (lo_m, hi_m) in zip(results[True], results[False]):
    np.testing.assert_array_equal(lo_c, lo_m)
    np.testing.assert_array_equal(hi_c, hi_m)
  lo, hi = results[False][1]
  finite = np.where(np.isfinite(with_bad), with_bad, np.nan)
  with np.errstate(all="ignore"):
    want_lo = np.nanmin(finite, axis=axes) if axes == (0, 1) else np.nanmin(finite, axis=1)
  np.testing.assert_array_equal(np.where(np.isnan(want_lo), np.inf, want_lo), lo)
  if axes == (1,):  # rows with finite entries get finite bounds; the all-NaN row ±inf
    assert np.all(np.isfinite(lo[[0, 1, 2, 4]])) and lo[3] == np.inf and hi[3] == -np.inf
