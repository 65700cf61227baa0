"""Hypothesis fuzz suite of the quantizers: every valid QuantSpec × hostile inputs.

Specs: format × bits 2..8 × symmetric × granularity tensor/channel/group (group_size
dividing the reduced axis) × calibration absmax/percentile/mse (several percentiles) ×
rounding nearest/stochastic (int only) × ste identity/clipped/lsq/pact (lsq/pact int only,
lsq symmetric only), with and without a learned LSQ step / PACT α. The spec strategy
yields only valid specs; `test_invalid_specs_raise_naming_a_field` fuzzes invalid ones.

Inputs: float32 / float16 / bfloat16, shapes (), 1, 3, 7, 1x1, 4x6, 5x3x2 and size-zero
ones (0, 0x3, 3x0, 2x0x4) with any set of reduce axes (negative ones too), filled with
normal values of several magnitudes, zeros, ±Inf, NaN, denormals (1e-40 float32/bfloat16,
1e-7 float16), ±3e38 (float32/bfloat16) or ±65504 (float16), a bulk plus one outlier,
and mixtures of these inside one tensor. dot_general: [B?, M, K]·[B?, K, N] (rhs also
[B?, N, K]) with M, K, N of 0, 1 or more, batch dim or not.

Properties (the NaN/Inf rule is the one of `jaxquant.numerics`' docstring):
quantize
  * codes: int8 in [qmin, qmax] (binary {−1, 1}, ternary {−1, 0, 1}); fp8 codes finite
    and |code| <= fp8 max; NaN gets the code of 0.0 (the zero point, 0, binary +1);
    +Inf / −Inf get the largest / smallest code.
  * scale: float32, finite, > 0 (>= 0 for binary, 0 only when every finite entry of its
    slice is 0), shaped like the documented scale; zero point int32 in [qmin, qmax],
    present exactly for asymmetric int.
  * absmax / non-learned: the scale is the one of the documented rule computed in
    float64 numpy over the finite entries (no float32 overflow for ±3e38 ranges);
    percentile / mse scales never exceed the absmax one (unless a slice falls back to 1).
dequantize
  * dtype as asked, shape kept, every element finite (never NaN, never Inf: codes have
    neither, the grid is saturated to the dtype's range).
  * int: each value is the grid point of clip(x, grid) within half a step (a full step
    for stochastic rounding); fp8: within half an fp8 ulp; binary ±α by sign.
fake_quant
  * dtype and shape kept; NaN exactly where the input is NaN; every other element
    finite and bitwise equal to dequantize(quantize(x)) (same key).
  * mse: total squared error (finite entries) <= the absmax one and <= the one of the
    smallest clip ratio of the search grid.
  * jax.grad of the sum (the VJP with a ones cotangent, one forward pass with the value):
    dtype and shape of x, every element finite, in {0, 1}; 1 at NaN
    inputs; 'identity' all ones; 'clipped' (and lsq / pact without a learned value) 0 at
    ±Inf and 1 at every finite entry of a symmetric absmax slice; binary/ternary clipped
    is 1 exactly where |x| <= 1. Learned LSQ step / PACT α gradients are finite.
dot_general (modes 'int' and 'fake', operands quantized or float, with and without a
quantized backward `DotSpec.grad`)
  * dtype = the operands' dtype, shape as lax.dot_general.
  * NaN: with K > 0, output (b, m, n) IS NaN whenever row (b, m) of lhs or column (b, n)
    of rhs holds a NaN, in both modes (the int path puts NaN back: integer codes have
    none); K = 0 gives zeros.
  * Otherwise finite: when the bound K·B_lhs·B_rhs fits the output dtype (B: the finite
    absmax, widened to 2·absmax + 256 for a quantized operand: half a step of grid beyond
    the range, or the fallback scale 1 with codes up to 255), every element outside the
    NaN rows/columns (and the Inf rows/columns of an operand kept in float) is finite.
    Quantized ±Inf saturate, so they never make an output non-finite. Beyond that bound
    (e.g. ±3e38 operands) the exact result overflows and nothing is asserted.
  * jax.grad w.r.t. both operands: dtype/shape kept, finite under the same bound (N or
    M times the other operand's bound) unless the other operand is float with non-finite
    entries.

The quantizers run eagerly (no jit: one jit compile per spec would dominate) on a small
fixed set of shapes so XLA's per-op compile cache is reused; dot_general runs jitted, one
program per spec and layout (its eager ops are mostly distinct per spec). Each example
runs R tensors through one drawn spec/shape (the later ones hit a warm cache). Each fuzz
test comes twice: a quick one in the default run (~860 cases, most of them the cheap
invalid-spec ones) and a `deep` one marked `slow` that draws 4 to 20 times as many other
examples (~3300 cases). Deterministic (`derandomize=True`, no example database);
JAXQUANT_FUZZ_SCALE=k multiplies the example counts of both. The last test prints the
number of cases each fuzz test ran, checks each ran its budget, and that the quick run
reached every branch of the properties above (a spec kind or input that only the deep
run would draw fails it). XLA:CPU flushes denormals to zero, so a denormal input may
quantize as 0 (the references accept either).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import os

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import numerics
from jaxquant.spec import CALIBRATIONS, GRANULARITIES, MODES, ROUNDINGS

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)

# The formats this file has oracles for (the block formats: tests/test_formats*.py).
FORMATS = ("int", "binary", "ternary", "fp8_e4m3", "fp8_e5m2")

fq = importlib.import_module("jaxquant.fake_quant")  # the module (the package exports the function)

QS, DS = jq.QuantSpec, jq.DotSpec

CASES: collections.Counter = collections.Counter()  # test name -> examples run
FINISHED: dict = {}  # test name -> examples run, set when the whole hypothesis test passed
HIT: collections.defaultdict = collections.defaultdict(set)  # test name -> branches reached

DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16)
SHAPES = ((), (1,), (3,), (7,), (1, 1), (4, 6), (5, 3, 2), (0,), (0, 3), (3, 0), (2, 0, 4))
FP8_NP = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
F32_TINY = float(np.finfo(np.float32).tiny)
KEY = jax.random.key(7)
# Examples per quick fuzz test (the default run); the `slow` deep tests draw DEEP × N_*_DEEP
# (the four deep ones together take minutes). JAXQUANT_FUZZ_SCALE=10
# multiplies both for a deeper (still deterministic) run.
_SCALE = float(os.environ.get("JAXQUANT_FUZZ_SCALE", "1"))
DEEP = 4
# Each example draws a spec and a shape, then R tensors (operand pairs) of that shape: the
# later ones find XLA's per-op compile cache warm. Cases = R × examples.
R_STRUCTURE, R_VALUES, R_DOT = 3, 4, 4
# The quick budgets reach every branch test_zz_fuzz_case_count checks (together with the
# fixed learned / MSE cases) with a margin: 7 structure and 2 values examples did in the
# file alone, but not in the whole suite's worker (binary and ternary were missed), so
# the draws are not to be trimmed to the bare minimum. The deep budgets (DEEP × N_*_DEEP)
# are independent of them.
N_STRUCTURE, N_VALUES, N_DOT, N_INVALID = (
    max(1, int(n * _SCALE)) for n in (10, 10, 4, 750))
N_STRUCTURE_DEEP, N_VALUES_DEEP, N_DOT_DEEP, N_INVALID_DEEP = (
    max(1, int(n * _SCALE)) for n in (10, 10, 4, 750))
N_DOT_LAYOUT = max(1, int(_SCALE))  # the quick dot_general test: per layout (6 of them)


def fuzz_settings(n):
  return hypothesis.settings(
      max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
      suppress_health_check=[hypothesis.HealthCheck.too_slow,
                             hypothesis.HealthCheck.data_too_large])


def fuzz_test(name, n, body, **strategies):
  """A test function `name` running `body(name, **example)` (which counts its cases in
  CASES[name]) on `n` hypothesis examples drawn from `strategies`; hypothesis seeds a
  derandomized run from the function's name, so each name draws its own examples. A full
  pass records how many cases it ran in FINISHED[name]."""
  def draw(**example):
    body(name, **example)
  draw.__name__ = "_" + "".join(c if c.isalnum() else "_" for c in name)
  given_test = fuzz_settings(n)(hypothesis.given(**strategies)(draw))

  def run():
    before = CASES[name]
    given_test()
    FINISHED[name] = CASES[name] - before
  run.__name__ = name
  run.__doc__ = body.__doc__
  return run


def fuzz_tests(name, n, n_deep, body, **strategies):
  """The quick test `name` (`n` examples, the default run) and `name + '_deep'`, marked
  slow, that draws DEEP × n_deep other examples."""
  return (fuzz_test(name, n, body, **strategies),
          pytest.mark.slow(fuzz_test(name + "_deep", DEEP * n_deep, body, **strategies)))


# ------------------------------------------------------------------------- strategies

def big_of(dtype):
  return 65504.0 if dtype == np.float16 else 3e38


def denormal_of(dtype):
  return 1e-7 if dtype == np.float16 else 1e-40


PROFILES = ("normal", "mixed", "mixed", "specials", "zeros", "nan", "inf", "denormal",
            "big", "extremes", "extremes", "outlier", "constant", "sparse")


@st.composite
def tensors(draw, shape, dtype):
  """Arrays of `shape` / `dtype` from a fill profile: finite values of a few magnitudes,
  zeros, ±Inf, NaN, denormals, ±big, or a mixture of all of these in one tensor."""
  profile = draw(st.sampled_from(PROFILES))
  seed = draw(st.integers(0, 2 ** 32 - 1))
  mag = draw(st.sampled_from((1.0, 1e-3, 1e3, 1e-30, 1e30) if dtype != np.float16
                             else (1.0, 1e-3, 1e3, 1e-6, 3e4)))
  rng = np.random.default_rng(seed)
  size = int(np.prod(shape, dtype=np.int64))
  base = rng.standard_normal(size) * mag
  big, den = big_of(dtype), denormal_of(dtype)
  special = np.array([0.0, np.inf, -np.inf, np.nan, den, -den, big, -big])
  if profile == "normal":
    x = base
  elif profile in ("mixed", "specials"):
    p_special = 0.3 if profile == "mixed" else 0.9
    pick = rng.random(size) < p_special
    x = np.where(pick, special[rng.integers(0, len(special), size)], base)
  elif profile == "zeros":
    x = np.zeros(size) * rng.choice([1.0, -1.0])
  elif profile == "nan":
    x = np.where(rng.random(size) < 0.8, np.nan, base)
  elif profile == "inf":
    x = np.where(rng.random(size) < 0.5, np.inf, -np.inf)
    x = np.where(rng.random(size) < 0.2, np.nan, x)
  elif profile == "denormal":
    x = den * rng.integers(-3, 4, size)
  elif profile == "big":
    x = np.where(rng.random(size) < 0.5, big, -big) * rng.uniform(0.5, 1.0, size)
  elif profile == "extremes":  # exactly ±big, both signs in most slices, a few others
    x = big * (-1.0) ** np.arange(size) * rng.choice([1.0, 1.0, 1.0, 0.5, 0.0], size)
  elif profile == "outlier":  # a bulk near 0.3·M and one outlier ±M: at low bits the
    # smallest MSE clip ratio (0.3) is the best one
    x = 0.3 * mag * rng.choice([-1.0, 1.0], size) * (1 + 0.02 * rng.standard_normal(size))
    if size:
      x[rng.integers(0, size)] = mag * rng.choice([-1, 1])
  elif profile == "constant":
    x = np.full(size, base[0] if size else 0.0)
  else:  # sparse
    x = np.where(rng.random(size) < 0.8, 0.0, base)
  with np.errstate(over="ignore"):
    return np.asarray(x, np.float64).astype(dtype).reshape(shape)


def divisors(k):
  return [1, 2, 5] if k == 0 else [d for d in range(1, k + 1) if k % d == 0]


@st.composite
def reduce_axes_for(draw, shape, granularity):
  """(reduce_axes as passed, maybe negative; group_size or None)."""
  ndim = len(shape)
  if granularity == "group":
    a = draw(st.integers(0, ndim - 1))
    gs = draw(st.sampled_from(divisors(shape[a])))
    return (a - ndim if draw(st.booleans()) else a,), gs
  if ndim == 0:
    return (), None
  axes = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim,
                       min_size=1 if granularity == "tensor" else 0))
  return tuple(a - ndim if draw(st.booleans()) else a for a in axes), None


@st.composite
def quant_specs(draw, granularity, group_size, formats=FORMATS):
  """Valid QuantSpecs only: the spec's documented constraints are built in."""
  fmt = draw(st.sampled_from(formats + ("int",) * len(formats)))  # int: half the specs
  is_int = fmt == "int"
  symmetric = draw(st.booleans()) if is_int else True
  allowed_stes = ["identity", "clipped"]
  if is_int:
    allowed_stes += ["pact"] + (["lsq"] if symmetric else [])
  return QS(format=fmt, bits=draw(st.integers(2, 8)), symmetric=symmetric,
            granularity=granularity, group_size=group_size,
            calibration=draw(st.sampled_from(CALIBRATIONS)),
            percentile=draw(st.sampled_from((99.9, 99.0, 90.0, 50.0, 100.0, 0.5))),
            rounding=draw(st.sampled_from(ROUNDINGS)) if is_int else "nearest",
            ste=draw(st.sampled_from(allowed_stes)))


@st.composite
def quant_cases(draw, shapes=SHAPES, r=3):
  """([x, ...], spec, reduce_axes, use_learned): `r` tensors of one shape and
  dtype for one spec (the later ones find XLA's per-op compile cache warm). `shapes`: a
  tuple of shapes (any reduce axes) or a dict shape -> its one reduce axis."""
  shape = draw(st.sampled_from(tuple(shapes)))
  dtype = draw(st.sampled_from(DTYPES))
  granularity = draw(st.sampled_from(GRANULARITIES if shape else ("tensor", "channel")))
  if isinstance(shapes, dict):
    a = shapes[shape]
    axes, gs = (a,), (draw(st.sampled_from(divisors(shape[a]))) if granularity == "group"
                      else None)
  else:
    axes, gs = draw(reduce_axes_for(shape, granularity))
  spec = draw(quant_specs(granularity, gs))
  use_learned = spec.ste in ("lsq", "pact") and draw(st.booleans())
  xs = [draw(tensors(shape, dtype)) for _ in range(r)]
  return xs, spec, axes, use_learned


# ------------------------------------------------------------------ numpy references

def np_blocked(x, spec, axes):
  """numpy mirror of numerics.blocked: (blocked x, stat axes, scale shape)."""
  if spec.granularity == "tensor":
    return x, tuple(range(x.ndim)), (1,) * x.ndim
  if spec.granularity == "channel":
    return x, axes, tuple(1 if i in axes else d for i, d in enumerate(x.shape))
  (a,) = axes
  k, g = x.shape[a], spec.group_size
  xb = x.reshape(x.shape[:a] + (k // g, g) + x.shape[a + 1:])
  return xb, (a + 1,), x.shape[:a] + (k // g,) + x.shape[a + 1:]


def np_expand(s, shape):
  for i, (sd, xd) in enumerate(zip(s.shape, shape)):
    if sd not in (1, xd):
      s = np.repeat(s, xd // sd, axis=i)
  return np.broadcast_to(s, shape)


def np_reference_scale(x64, spec, axes):
  """The documented absmax-calibration scale, in float64 over finite entries, before the
  fallback to 1 (returned as computed; `None` where the rule has no closed form here)."""
  xb, red, shape = np_blocked(x64, spec, axes)
  fin = np.isfinite(xb)
  ax = np.where(fin, np.abs(xb), 0.0)
  if spec.format == "binary":
    n = fin.sum(axis=red)
    return np.where(n > 0, ax.sum(axis=red) / np.maximum(n, 1), 1.0).reshape(shape)
  if spec.format == "ternary":
    n = fin.sum(axis=red, keepdims=True)
    delta = 0.7 * ax.sum(axis=red, keepdims=True) / np.maximum(n, 1)
    if np.any(np.isclose(ax, delta, rtol=1e-4, atol=0) & (ax > 0)):
      return None  # an entry at the threshold: float32 may decide it either way
    big = ax > delta
    return (np.where(big, ax, 0).sum(axis=red) / np.maximum(big.sum(axis=red), 1)).reshape(shape)
  if spec.format in FP8_NP:
    return np.max(ax, axis=red, initial=0.0).reshape(shape) / numerics.FP8_MAX[spec.format]
  qmin, qmax = numerics.int_range(spec)
  if spec.symmetric:
    return np.max(ax, axis=red, initial=0.0).reshape(shape) / qmax
  lo = np.minimum(np.min(np.where(fin, xb, np.inf), axis=red, initial=np.inf), 0.0)
  hi = np.maximum(np.max(np.where(fin, xb, -np.inf), axis=red, initial=-np.inf), 0.0)
  return ((hi - lo) / (qmax - qmin)).reshape(shape)


def expected_scale_shape(shape, spec, axes):
  return np_blocked(np.zeros(shape), spec, axes)[2]


def code_range(spec):
  if spec.format in FP8_NP:
    f = numerics.FP8_MAX[spec.format]
    return -f, f
  return numerics.int_range(spec)


# ------------------------------------------------------------------------- properties

def check_qtensor(x, spec, axes, q, learned):
  """Codes, scale and zero point of `q = quantize(x)` (see the module docstring)."""
  x64 = np.asarray(x, np.float64)
  v = np.asarray(q.values)
  assert v.shape == x.shape
  qmin, qmax = code_range(spec)
  if spec.is_integer:
    assert q.values.dtype == jnp.int8
  else:
    assert q.values.dtype == FP8_NP[spec.format]
  c = v.astype(np.float64)
  assert np.all(np.isfinite(c)) and np.all((c >= qmin) & (c <= qmax)), (c.min(), c.max())
  if spec.is_integer:
    assert np.all(c == np.round(c))
  if spec.format == "binary":
    assert np.all(np.isin(c, (-1, 1)))
  s = np.asarray(q.scale)
  assert q.scale.dtype == jnp.float32
  sshape = expected_scale_shape(x.shape, spec, axes) if learned is None else learned.shape
  assert s.shape == tuple(sshape), (s.shape, sshape)
  assert np.all(np.isfinite(s))
  if spec.format == "binary":
    assert np.all(s >= 0)
  else:
    assert np.all(s > 0), s
  if spec.format == "int" and not spec.symmetric:
    assert q.zero_point is not None and q.zero_point.dtype == jnp.int32
    z = np.asarray(q.zero_point)
    assert z.shape == s.shape and np.all((z >= qmin) & (z <= qmax))
  else:
    assert q.zero_point is None
  zfull = (np.zeros(x.shape) if q.zero_point is None
           else np_expand(np.asarray(q.zero_point, np.float64), x.shape))
  # Specials: NaN -> the code of 0.0, ±Inf -> the extreme codes.
  nan, pinf, ninf = np.isnan(x64), x64 == np.inf, x64 == -np.inf
  nan_code = {"binary": 1.0, "ternary": 0.0}.get(spec.format, 0.0)
  if spec.format == "int":
    assert np.all(c[nan] == zfull[nan])
  else:
    assert np.all(c[nan] == nan_code)
  assert np.all(c[pinf] == qmax) and np.all(c[ninf] == qmin)
  # The documented calibration (absmax over finite entries), against float64 numpy.
  if learned is None:
    ref = np_reference_scale(x64, spec, axes)
    if ref is not None:
      got = s.astype(np.float64)
      fallback = ~np.isfinite(ref) | (ref <= 0)
      if spec.format == "binary":
        fallback = ~np.isfinite(ref)  # an all-zero slice keeps α = 0
      tiny = ref < 64 * F32_TINY  # denormal / flushed-to-zero territory: 1 or ≈ ref
      if spec.calibration == "absmax" or spec.format in ("binary", "ternary"):
        near = np.isclose(got, ref, rtol=2e-5, atol=0)
        ok = np.where(fallback, got == 1.0,
                      near | (tiny & ((got == 1.0) | (got <= 64 * F32_TINY))))
      else:  # percentile / mse clip inside the absmax range
        ok = (got == 1.0) | (got <= ref * (1 + 2e-5)) | tiny
      assert np.all(ok), (s, ref)
  return s, zfull


def check_dequantized(x, spec, q, s, zfull, deq32):
  """Dequantized values sit on the grid next to clip(x): within half a step (int nearest),
  a step (stochastic), half an fp8 ulp; binary is ±α by sign."""
  x64 = np.asarray(x, np.float64)
  d = np.asarray(deq32, np.float64)
  assert np.all(np.isfinite(d))
  sf = np_expand(s.astype(np.float64), x.shape)
  fin = np.isfinite(x64)
  if spec.format == "binary":
    # Sign of x; XLA:CPU reads a denormal as 0 (code +1), so either sign is fine there.
    ok = np.abs(d - np.where(x64 < 0, -sf, sf)) <= 1e-6 * sf
    ok |= (np.abs(x64) < F32_TINY) & (np.abs(np.abs(d) - sf) <= 1e-6 * sf)
    assert np.all(ok[~np.isnan(x64)])
    return
  if spec.format == "ternary":
    close = lambda a, b: np.abs(a - b) <= 1e-6 * sf
    assert np.all(close(d, 0) | close(d, sf) | close(d, -sf))
    return
  qmin, qmax = code_range(spec)
  glo, ghi = (qmin - zfull) * sf, (qmax - zfull) * sf
  xc = np.clip(np.where(fin, x64, 0.0), glo, ghi)
  err = np.abs(d - xc)
  slack = 1e-5 * sf + 4 * F32_TINY + 1e-6 * np.abs(xc)
  if spec.format in FP8_NP:
    mant, sub = {"fp8_e4m3": (3, 2.0 ** -9), "fp8_e5m2": (2, 2.0 ** -16)}[spec.format]
    bound = np.abs(xc) * 2.0 ** -(mant + 1) + sf * sub / 2 + slack
  else:
    bound = sf * (1.0 if spec.rounding == "stochastic" else 0.5) + slack
  assert np.all((err <= bound)[fin]), np.max((err - bound)[fin])


def check_learned_init(x, spec, axes, learned):
  """init_learned: LSQ step 2·mean|x|/sqrt(Q_P) (non-finite entries count as 0), PACT α
  the absmax (symmetric) or max(x, 0) range, both over finite entries, in float64 numpy;
  saturated at FLT_MAX, 1 where that is 0 (empty / all-zero / all-non-finite slices)."""
  xb, red, shape = np_blocked(np.asarray(x, np.float64), spec, axes)
  fin = np.isfinite(xb)
  if spec.ste == "lsq":
    n = np.prod([xb.shape[a] for a in red], dtype=np.int64)
    ref = 2 * np.where(fin, np.abs(xb), 0).sum(axis=red) / max(n, 1)
    ref = ref.reshape(shape) / np.sqrt(numerics.int_range(spec)[1])
  elif spec.symmetric:
    ref = np.max(np.where(fin, np.abs(xb), 0), axis=red, initial=0.0).reshape(shape)
  else:
    ref = np.maximum(np.max(np.where(fin, xb, 0), axis=red, initial=0.0), 0).reshape(shape)
  ref = np.minimum(ref, float(np.finfo(np.float32).max))
  got = np.asarray(learned, np.float64)
  assert learned.dtype == jnp.float32 and got.shape == ref.shape
  tiny = ref < 64 * F32_TINY
  ok = np.where(ref == 0, got == 1.0, np.isclose(got, ref, rtol=2e-5, atol=0)
                | (tiny & ((got == 1.0) | (got <= 64 * F32_TINY))))
  assert np.all(ok), (got, ref)


def quantizer_features(x, spec, use_learned):
  """The kinds of spec and input one quantizer case exercises (the last test checks that
  the quick run reaches each of QUANTIZER_FEATURES)."""
  x64 = np.asarray(x, np.float64)
  f = {f"format={spec.format}", f"granularity={spec.granularity}",
       f"calibration={spec.calibration}", f"ste={spec.ste}", f"rounding={spec.rounding}",
       f"dtype={np.dtype(x.dtype).name}"}
  if spec.format == "int":
    f.add("int_symmetric" if spec.symmetric else "int_asymmetric")
  if use_learned:
    f.add(f"learned_{spec.ste}")
  if x.size == 0:
    f.add("size_zero")
  if x.ndim == 0:
    f.add("scalar")
  if np.isnan(x64).any():
    f.add("nan_input")
  if np.isinf(x64).any():
    f.add("inf_input")
  if (spec.calibration == "mse" and not use_learned and spec.rounding == "nearest"
      and spec.format not in ("binary", "ternary")):
    f.add("mse_beats_candidates")
  return f


QUANTIZER_FEATURES = (
    {f"format={f}" for f in FORMATS} | {f"granularity={g}" for g in GRANULARITIES}
    | {f"calibration={c}" for c in CALIBRATIONS} | {f"rounding={r}" for r in ROUNDINGS}
    | {f"ste={s}" for s in ("identity", "clipped", "lsq", "pact")}
    | {"dtype=float32", "dtype=float16", "dtype=bfloat16", "int_symmetric", "int_asymmetric",
       "learned_lsq", "learned_pact", "size_zero", "scalar", "nan_input", "inf_input",
       "mse_beats_candidates"})


def run_quantizers(x, spec, axes_arg, use_learned, hit=None):
  if hit is not None:
    hit.update(quantizer_features(x, spec, use_learned))
  axes = numerics.normalize_axes(axes_arg, x.ndim)  # for the numpy references
  xj = jnp.asarray(x)
  dtype = xj.dtype
  learned = numerics.init_learned(xj, spec, axes_arg) if use_learned else None
  if use_learned:
    check_learned_init(x, spec, axes, learned)
  q = jq.quantize(xj, spec, reduce_axes=axes_arg, key=KEY, learned=learned)
  s, zfull = check_qtensor(x, spec, axes, q, learned)
  deq32 = jq.dequantize(q)
  deq = jq.dequantize(q, dtype)
  assert deq32.dtype == jnp.float32 and deq.dtype == dtype
  assert deq.shape == x.shape and deq32.shape == x.shape
  d = np.asarray(deq, np.float64)
  assert np.all(np.isfinite(d)), "dequantize produced a non-finite value"
  check_dequantized(x, spec, q, s, zfull, deq32)  # learned grids too (PACT clips to them)
  # fake_quant value and gradient of its sum (a VJP with a ones cotangent: one forward
  # pass for both, the same `forward` as the undifferentiated call).
  def fq_fn(xx, ll):
    return jq.fake_quant(xx, spec, reduce_axes=axes_arg, key=KEY, learned=ll)
  if learned is None:
    out, vjp = jax.vjp(lambda xx: fq_fn(xx, None), xj)
    (dx,), dl = vjp(jnp.ones_like(out)), None
  else:
    out, vjp = jax.vjp(fq_fn, xj, learned)
    dx, dl = vjp(jnp.ones_like(out))
  # fake_quant: NaN exactly where x is NaN, else finite and == dequantize(quantize(x)).
  assert out.dtype == dtype and out.shape == x.shape
  o = np.asarray(out, np.float64)
  nan = np.isnan(np.asarray(x, np.float64))
  np.testing.assert_array_equal(np.isnan(o), nan)
  assert np.all(np.isfinite(o[~nan]))
  np.testing.assert_array_equal(o[~nan], d[~nan])
  # Gradient of the sum.
  assert dx.dtype == dtype and dx.shape == x.shape
  g = np.asarray(dx, np.float64)
  assert np.all(np.isfinite(g)) and np.all((g == 0) | (g == 1)), np.unique(g)
  assert np.all(g[nan] == 1)
  x64 = np.asarray(x, np.float64)
  if spec.ste == "identity":
    assert np.all(g == 1)
  elif spec.format in ("binary", "ternary"):
    np.testing.assert_array_equal(g[~nan], (np.abs(x64) <= 1)[~nan].astype(np.float64))
  elif learned is None:
    assert np.all(g[np.isinf(x64)] == 0)
    if spec.calibration == "absmax" and spec.symmetric:
      assert np.all(g[np.isfinite(x64)] == 1)  # absmax: nothing finite is clipped
  if dl is not None:
    assert dl.shape == learned.shape and dl.dtype == learned.dtype
    assert np.all(np.isfinite(np.asarray(dl))), ("learned gradient not finite", dl)
  # MSE: no worse than absmax, nor than the smallest clip ratio of its grid.
  if (spec.calibration == "mse" and learned is None and spec.rounding == "nearest"
      and spec.format not in ("binary", "ternary")):
    check_mse_beats_candidates(x, spec, axes, d)


def check_mse_beats_candidates(x, spec, axes, deq_mse):
  x64 = np.asarray(x, np.float64)
  fin = np.isfinite(x64)
  sse = lambda d: float(np.sum(np.where(fin, (np.asarray(d, np.float64) - x64) ** 2, 0.0)))
  xj = jnp.asarray(x)
  am = dataclasses.replace(spec, calibration="absmax")
  e_mse = sse(deq_mse)
  e_abs = sse(jq.dequantize(jq.quantize(xj, am, reduce_axes=axes), xj.dtype))
  assert e_mse <= e_abs * (1 + 1e-4) + 1e-30, (e_mse, e_abs)
  # Smallest ratio of the grid, through the static-range path.
  xb, red, shape = np_blocked(x64, spec, axes)
  finb = np.isfinite(xb)
  r = numerics.MSE_CLIP_RATIOS[0]
  if spec.symmetric:
    hi = np.max(np.where(finb, np.abs(xb), 0.0), axis=red, initial=0.0).reshape(shape)
    lo = -hi
  else:
    lo = np.min(np.where(finb, xb, np.inf), axis=red, initial=np.inf)
    hi = np.max(np.where(finb, xb, -np.inf), axis=red, initial=-np.inf)
    lo, hi = np.minimum(lo, 0).reshape(shape), np.maximum(hi, 0).reshape(shape)
  x32 = xj.astype(jnp.float32)
  nax = numerics.normalize_axes(axes, x.ndim)
  codes, scale, zp = fq.quantize_parts(x32, am, nax, None, None,
                                       clip_range=(np.float32(lo * r), np.float32(hi * r)))
  cand = jq.QTensor(codes, scale, zp).dequantize(xj.dtype)
  e_r = sse(cand)
  assert e_mse <= e_r * (1 + 1e-4) + 1e-30, (e_mse, e_r)


WARM_SHAPES = {(7,): 0, (4, 6): 0, (5, 3, 2): 1}  # shape -> reduce axis


def _fuzz_quantizers_structure(name, case):
  """quantize / dequantize / fake_quant (value and grad): every valid spec × every shape
  (size-zero included) and reduce-axes set × dtype × value profile."""
  xs, spec, axes, use_learned = case
  for x in xs:
    CASES[name] += 1
    run_quantizers(x, spec, axes, use_learned, HIT[name])


def _fuzz_quantizers_values(name, case):
  """The same properties on three shapes with one reduce axis each: XLA's compile cache
  stays warm, so most of the time goes to specs × values rather than compiling."""
  xs, spec, axes, use_learned = case
  for x in xs:
    CASES[name] += 1
    run_quantizers(x, spec, axes, use_learned, HIT[name])


LEARNED_X = np.array([[1.0, np.nan, -2.0, np.inf], [0.3, -np.inf, 1e-40, 0.0],
                      [3e38, -0.5, 7.0, -3e38]], np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec,axes", [
    (QS(ste="lsq", bits=4, granularity="tensor"), (0, 1)),
    (QS(ste="lsq", bits=2), (-1,)),
    (QS(ste="pact", bits=3, symmetric=False, granularity="group", group_size=2), (1,)),
    (QS(ste="pact", bits=8, rounding="stochastic"), (0,))], ids=str)
def test_fuzz_quantizers_learned(spec, axes, dtype):
  """The fuzz properties with a learned LSQ step / PACT α on hostile values: fixed cases,
  so the default run has some whatever the quick fuzz draws (the deep run draws more)."""
  name = "test_fuzz_quantizers_learned"
  with np.errstate(over="ignore"):
    big = np.isfinite(LEARNED_X) & (np.abs(LEARNED_X) > big_of(dtype))  # ±3e38: float16 max
    x = np.where(big, np.sign(LEARNED_X) * big_of(dtype), LEARNED_X).astype(dtype)
  CASES[name] += 1
  run_quantizers(x, spec, axes, True, HIT[name])


@pytest.mark.parametrize("spec", [QS(calibration="mse", bits=3, symmetric=False),
                                  QS(format="fp8_e4m3", calibration="mse")], ids=str)
def test_fuzz_quantizers_mse(spec):
  """The fuzz properties (MSE no worse than absmax nor the smallest clip ratio) on a
  fixed hostile tensor, whatever the quick fuzz draws."""
  name = "test_fuzz_quantizers_learned"
  CASES[name] += 1
  run_quantizers(LEARNED_X, spec, (0,), False, HIT[name])


test_fuzz_quantizers_structure, test_fuzz_quantizers_structure_deep = fuzz_tests(
    "test_fuzz_quantizers_structure", N_STRUCTURE, N_STRUCTURE_DEEP, _fuzz_quantizers_structure,
    case=quant_cases(r=R_STRUCTURE))
test_fuzz_quantizers_values, test_fuzz_quantizers_values_deep = fuzz_tests(
    "test_fuzz_quantizers_values", N_VALUES, N_VALUES_DEEP, _fuzz_quantizers_values,
    case=quant_cases(WARM_SHAPES, r=R_VALUES))


# ------------------------------------------------------------------- dot_general fuzz

# (M, K, N), batch size or None, rhs stored [N, K]: each feature at least once, few
# distinct layouts (every layout × dtype × spec path compiles its own eager ops).
DOT_LAYOUTS = (((3, 4, 2), None, False), ((3, 4, 2), 2, True), ((1, 1, 1), None, True),
               ((0, 4, 2), 2, False), ((3, 0, 2), None, False), ((2, 4, 0), None, True))
INT_FORMATS = ("int", "binary", "ternary")


@st.composite
def dot_cases(draw, layouts=DOT_LAYOUTS, r=3):
  """([(lhs, rhs), ...], dimension_numbers, DotSpec): `r` operand pairs
  [B?, M, K] · [B?, K, N] (or rhs [B?, N, K]) for one spec and layout."""
  (m, k, n), batch, rhs_nk = draw(st.sampled_from(layouts))
  dtype = draw(st.sampled_from(DTYPES))
  mode = draw(st.sampled_from(MODES))
  lead = () if batch is None else (batch,)
  pairs = [(draw(tensors(lead + (m, k), dtype)),
            draw(tensors(lead + ((n, k) if rhs_nk else (k, n)), dtype)))
           for _ in range(r)]
  nb = len(lead)
  dims = (((nb + 1,), (nb + (1 if rhs_nk else 0),)), (tuple(range(nb)), tuple(range(nb))))

  def operand_spec():
    if draw(st.integers(0, 5)) == 0:
      return None  # kept in float
    gran = draw(st.sampled_from(GRANULARITIES))
    gs = draw(st.sampled_from(divisors(k))) if gran == "group" else None
    return draw(quant_specs(gran, gs, formats=INT_FORMATS if mode == "int" else FORMATS))

  ls, rs = operand_spec(), operand_spec()
  grad = None
  if ls is not None and rs is not None and draw(st.booleans()):
    grad = QS(bits=draw(st.integers(2, 8)),
              granularity=draw(st.sampled_from(("tensor", "channel"))),
              calibration=draw(st.sampled_from(CALIBRATIONS)),
              rounding=draw(st.sampled_from(ROUNDINGS)),
              ste=draw(st.sampled_from(("identity", "clipped"))))
  return pairs, dims, DS(lhs=ls, rhs=rs, grad=grad, mode=mode)


def operand_bound(x, qspec):
  """A bound on |value| the dot sees for operand x: the finite absmax, widened for a
  quantization grid (half a step beyond the range, or the fallback scale 1 of an
  all-zero / all-non-finite slice: codes up to 255)."""
  x64 = np.asarray(x, np.float64)
  fin = x64[np.isfinite(x64)]
  amax = float(np.max(np.abs(fin), initial=0.0))
  return amax if qspec is None else 2 * amax + 256


def groups_mismatch(spec, k):
  """The documented ValueError: the int kernel needs the lhs / rhs scale groups along K
  to line up (the same count, or one of them a single group)."""
  if spec.mode != "int" or spec.lhs is None or spec.rhs is None or k == 0:
    return False
  g = lambda q: k // q.group_size if q.granularity == "group" else 1
  gl, gr = g(spec.lhs), g(spec.rhs)
  return gl not in (1, max(gl, gr)) or gr not in (1, max(gl, gr))


DOT_FEATURES = frozenset({
    "mode=int", "mode=fake", "float_operand", "quantized_backward", "rhs_nk", "batched",
    "k=0", "m_or_n=0", "nan_input", "group_operand"})


@functools.lru_cache(maxsize=None)
def _dot_value_and_grads(dims, spec):
  """dot_general(·, ·, dims, spec) and the gradients of its sum, jitted: the dot fuzz
  compiles one program per spec and layout (its R operand pairs reuse it) instead of
  every eager op of the contraction and its VJP (several times slower; unlike the
  quantizers', few of these ops are shared between specs). A ValueError of the spec is
  raised while tracing, as eagerly."""
  def value_and_grads(a, c):
    out, vjp = jax.vjp(lambda u, v: jq.dot_general(u, v, dims, spec, key=KEY), a, c)
    return out, vjp(jnp.ones_like(out))
  return jax.jit(value_and_grads)


def run_dot(lhs, rhs, dims, spec, hit=None):
  (lc, rc), (lb, _) = dims
  b = lhs.shape[0] if lb else 1
  m, k = lhs.shape[-2], lhs.shape[-1]
  rhs_nk = rc[0] == rhs.ndim - 1
  n = rhs.shape[-2] if rhs_nk else rhs.shape[-1]
  if hit is not None:  # the kinds of case this is (the quick run must reach DOT_FEATURES)
    operands = (spec.lhs, spec.rhs)
    hit.add(f"mode={spec.mode}")
    hit.update(name for name, on in (
        ("float_operand", None in operands), ("quantized_backward", spec.grad is not None),
        ("rhs_nk", rhs_nk), ("batched", bool(lb)), ("k=0", k == 0), ("m_or_n=0", m * n == 0),
        ("nan_input", np.isnan(np.asarray(lhs, np.float64)).any()
         or np.isnan(np.asarray(rhs, np.float64)).any()),
        ("group_operand", any(o is not None and o.granularity == "group" for o in operands)),
        ("groups_mismatch", groups_mismatch(spec, k))) if on)
  l3 = np.asarray(lhs, np.float64).reshape(b, m, k)
  r3 = np.asarray(rhs, np.float64).reshape(b, *rhs.shape[-2:])
  if rhs_nk:
    r3 = np.swapaxes(r3, 1, 2)  # [B, K, N]
  lj, rj = jnp.asarray(lhs), jnp.asarray(rhs)
  try:  # the value and both gradients of the sum
    out, (dl, dr) = _dot_value_and_grads(dims, spec)(lj, rj)
  except ValueError as e:  # documented: lhs / rhs groups must line up along K
    assert groups_mismatch(spec, k) and "group" in str(e), e
    return
  assert not groups_mismatch(spec, k)
  dtype = lj.dtype
  assert out.dtype == dtype
  assert out.shape == lhs.shape[:len(lb)] + (m, n)
  o = np.asarray(out, np.float64).reshape(b, m, n)
  # NaN / Inf rule.
  fmax = float(jnp.finfo(dtype).max)
  bad_l = np.isnan(l3).any(axis=2)
  bad_r = np.isnan(r3).any(axis=1)
  if spec.lhs is None:
    bad_l |= np.isinf(l3).any(axis=2)
  if spec.rhs is None:
    bad_r |= np.isinf(r3).any(axis=1)
  bad = bad_l[:, :, None] | bad_r[:, None, :]
  bl, br = operand_bound(lhs, spec.lhs), operand_bound(rhs, spec.rhs)
  if k * bl * br < fmax / 8:  # no overflow possible: non-finite only where the rule allows
    assert np.all(np.isfinite(o[~bad])), "non-finite dot output outside NaN/Inf rows/cols"
  if k > 0:
    nan_in = np.isnan(l3).any(axis=2)[:, :, None] | np.isnan(r3).any(axis=1)[:, None, :]
    assert np.all(np.isnan(o[nan_in])), "NaN input row/column hidden in the dot output"
  else:
    assert np.all(o == 0)
  # Gradients of the sum w.r.t. both operands.
  assert dl.dtype == dtype and dl.shape == lhs.shape
  assert dr.dtype == dtype and dr.shape == rhs.shape
  if (spec.rhs is not None or np.all(np.isfinite(r3))) and n * br < fmax / 8:
    assert np.all(np.isfinite(np.asarray(dl, np.float64))), "non-finite d lhs"
  if (spec.lhs is not None or np.all(np.isfinite(l3))) and m * bl < fmax / 8:
    assert np.all(np.isfinite(np.asarray(dr, np.float64))), "non-finite d rhs"


def _fuzz_dot_general(name, case):
  """jq.dot_general (modes int and fake, quantized backward or not) with hostile operands,
  every layout: M, K or N of 0 or 1, batch dim or not, rhs [K, N] or [N, K]."""
  pairs, dims, spec = case
  for lhs, rhs in pairs:
    CASES[name] += 1
    run_dot(lhs, rhs, dims, spec, HIT[name])


def layout_id(layout):
  (m, k, n), batch, rhs_nk = layout
  return f"{'' if batch is None else f'{batch}x'}{m}x{k}x{n}{'_nk' if rhs_nk else ''}"


# The quick tests: N_DOT_LAYOUT examples of each layout (a layout drawn at random may miss
# K = 0 or a batch dim in a few examples; hypothesis' first example of each is its
# simplest spec, float operands) and N_DOT examples with the layout drawn too (the spec
# kinds); the deep one draws DEEP × N_DOT examples, layout and all.
_QUICK_DOT = {layout_id(lay): fuzz_test(f"test_fuzz_dot_general[{layout_id(lay)}]",
                                        N_DOT_LAYOUT, _fuzz_dot_general,
                                        case=dot_cases((lay,), r=R_DOT))
              for lay in DOT_LAYOUTS}


@pytest.mark.parametrize("layout", list(_QUICK_DOT))
def test_fuzz_dot_general(layout):
  _QUICK_DOT[layout]()


test_fuzz_dot_general.__doc__ = _fuzz_dot_general.__doc__
test_fuzz_dot_general_specs = fuzz_test("test_fuzz_dot_general_specs", N_DOT, _fuzz_dot_general,
                                        case=dot_cases(r=R_DOT))
test_fuzz_dot_general_deep = pytest.mark.slow(fuzz_test(
    "test_fuzz_dot_general_deep", DEEP * N_DOT_DEEP, _fuzz_dot_general, case=dot_cases(r=R_DOT)))


# ------------------------------------------------------------------ invalid specs

@st.composite
def any_spec_kwargs(draw):
  """QuantSpec fields drawn from valid and invalid values alike."""
  return dict(
      format=draw(st.sampled_from(FORMATS + ("int4", "fp16", ""))),
      bits=draw(st.sampled_from((2, 3, 8, 1, 9, 0, True, 4.0, "8"))),
      symmetric=draw(st.sampled_from((True, False, 1, None))),
      granularity=draw(st.sampled_from(GRANULARITIES + ("row", None))),
      group_size=draw(st.sampled_from((None, 1, 4, 0, -2, True, 2.0))),
      calibration=draw(st.sampled_from(CALIBRATIONS + ("max",))),
      percentile=draw(st.sampled_from((99.9, 100, 50, 1e-6, 0, -1, 100.5, float("nan"), "99"))),
      rounding=draw(st.sampled_from(ROUNDINGS + ("floor",))),
      ste=draw(st.sampled_from(("identity", "clipped", "lsq", "pact", "ste"))))


def violated_fields(kw):
  """The fields a QuantSpec with these values breaks, by the documented constraints."""
  bad = set()
  is_int_like = lambda v: isinstance(v, int) and not isinstance(v, bool)
  fmt = kw["format"]
  if fmt not in FORMATS:
    bad.add("format")
  if fmt == "int" and not (is_int_like(kw["bits"]) and 2 <= kw["bits"] <= 8):
    bad.add("bits")
  if not isinstance(kw["symmetric"], bool):
    bad.add("symmetric")
  if kw["granularity"] not in GRANULARITIES:
    bad.add("granularity")
  if kw["granularity"] == "group":
    if not (is_int_like(kw["group_size"]) and kw["group_size"] >= 1):
      bad.add("group_size")
  elif kw["group_size"] is not None:
    bad.add("group_size")
  if kw["calibration"] not in CALIBRATIONS:
    bad.add("calibration")
  p = kw["percentile"]
  if not isinstance(p, (int, float)) or not 0 < p <= 100:
    bad.add("percentile")
  if kw["rounding"] not in ROUNDINGS:
    bad.add("rounding")
  if kw["rounding"] == "stochastic" and fmt not in ("int", "binary"):
    bad.add("rounding")  # binary: BinaryConnect's stochastic binarization
  if kw["ste"] not in ("identity", "clipped", "lsq", "pact"):
    bad.add("ste")
  if fmt in FORMATS and fmt != "int":
    if kw["symmetric"] is False:
      bad.add("symmetric")
    if kw["ste"] in ("lsq", "pact"):
      bad.add("ste")
  if kw["ste"] == "lsq" and kw["symmetric"] is False:
    bad |= {"ste", "symmetric"}
  return bad


SPEC_CHOICES = (None, QS(), QS(format="fp8_e4m3"), QS(format="binary"), QS(symmetric=False),
                QS(ste="lsq"), QS(ste="pact"), QS(granularity="group", group_size=2),
                QS(granularity="tensor", rounding="stochastic"), "int8", 8)


def _fuzz_invalid_specs(name, kw, dot):
  """Invalid QuantSpec / DotSpec combinations raise ValueError naming a broken field;
  valid ones construct and keep their values."""
  CASES[name] += 1
  hit = HIT[name]
  bad = violated_fields(kw)
  hit.add("quant_spec_invalid" if bad else "quant_spec_valid")
  if bad:
    with pytest.raises(ValueError) as e:
      QS(**kw)
    assert any(f + "=" in str(e.value) for f in bad), (bad, str(e.value))
  else:
    spec = QS(**kw)
    assert all(getattr(spec, f) == v for f, v in kw.items() if f != "percentile")
  lhs, rhs, grad, mode = dot
  bad = set()
  for name, v in (("lhs", lhs), ("rhs", rhs), ("grad", grad)):
    if v is not None and not isinstance(v, QS):
      bad.add(name)
  if mode not in MODES:
    bad.add("mode")
  if isinstance(grad, QS) and (grad.ste in ("lsq", "pact") or grad.format != "int"
                               or not grad.symmetric or grad.granularity == "group"):
    bad.add("grad")
  if mode == "int":
    for name, v in (("lhs", lhs), ("rhs", rhs)):
      if isinstance(v, QS) and not v.is_integer:
        bad.add(name)
  hit.add("dot_spec_invalid" if bad else "dot_spec_valid")
  if bad:
    with pytest.raises(ValueError) as e:
      DS(lhs=lhs, rhs=rhs, grad=grad, mode=mode)
    assert any(f in str(e.value) for f in bad), (bad, str(e.value))
  else:
    DS(lhs=lhs, rhs=rhs, grad=grad, mode=mode)


test_invalid_specs_raise_naming_a_field, test_invalid_specs_raise_naming_a_field_deep = (
    fuzz_tests("test_invalid_specs_raise_naming_a_field", N_INVALID, N_INVALID_DEEP,
               _fuzz_invalid_specs,
               kw=any_spec_kwargs(), dot=st.tuples(
                   st.sampled_from(SPEC_CHOICES), st.sampled_from(SPEC_CHOICES),
                   st.sampled_from(SPEC_CHOICES), st.sampled_from(MODES + ("float", None)))))


# ------------------------------------------------- regressions found by the fuzz suite

def _size_zero_cases():
  """spec × (an empty reduce axis, zero channels); the default run keeps both for the
  percentile and MSE calibrations (the reshapes that divided by zero) and one, rotating,
  for the other specs; the rest is slow."""
  specs = [QS(), QS(symmetric=False), QS(granularity="tensor"), QS(calibration="percentile"),
           QS(calibration="mse", symmetric=False), QS(format="binary"), QS(format="ternary"),
           QS(format="fp8_e4m3", calibration="mse"), QS(ste="pact")]
  for i, spec in enumerate(specs):
    for j, (shape, axes) in enumerate([((0, 3), (0,)), ((3, 0), (0,))]):
      quick = spec.calibration != "absmax" or i % 2 == j
      yield pytest.param(shape, axes, spec, id=f"{spec}-shape{j}-axes{j}",
                         marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("shape,axes,spec", list(_size_zero_cases()))
def test_regression_size_zero_tensors(shape, axes, spec):
  """Empty tensors: `max`/`min` over a zero-size axis raised ("zero-size array to
  reduction operation max which has no identity"), and the percentile reshape divided
  by zero. Codes are empty, every scale is the fallback 1."""
  x = jnp.zeros(shape, jnp.float32)
  q = jq.quantize(x, spec, reduce_axes=axes)
  assert q.values.shape == shape and np.all(np.asarray(q.scale) == 1.0)
  assert jq.fake_quant(x, spec, reduce_axes=axes).shape == shape
  assert jax.grad(lambda a: jnp.sum(jq.fake_quant(a, spec, reduce_axes=axes)))(x).shape == shape
  learned = numerics.init_learned(x, spec, axes) if spec.ste == "pact" else None
  assert jq.fake_quant(x, spec, reduce_axes=axes, learned=learned).shape == shape


def test_regression_division_by_huge_scale():
  """Scales above 1/FLT_MIN (~8.5e37; low-bit int with |x| ~ 3e38): XLA turns x / s (s
  broadcast) into x·(1/s), and 1/s is a denormal that XLA:CPU flushes to 0, so every
  code became the zero point (finite x·0 = 0) and ±Inf·0 = NaN got the NaN code."""
  x = jnp.array([-3e38, -0.5, 1e38, -np.inf, np.inf], jnp.float32)
  spec = QS(bits=2, symmetric=False, granularity="tensor")
  q = jq.quantize(x, spec, reduce_axes=(0,))
  assert float(q.scale[0]) > 1e38
  np.testing.assert_array_equal(np.asarray(q.values), [-2, 0, 1, -2, 1])  # zp 0
  spec = QS(bits=2, granularity="tensor", ste="clipped")
  x = jnp.array([3e38, 1e30, -3e38, np.inf], jnp.float32)
  np.testing.assert_array_equal(np.asarray(jq.quantize(x, spec, reduce_axes=(0,)).values),
                                [1, 0, -1, 1])
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)), np.float64)
  np.testing.assert_allclose(out, [3e38, 0, -3e38, 3e38], rtol=1e-6)
  g = jax.grad(lambda a: jnp.sum(jq.fake_quant(a, spec, reduce_axes=(0,))))(x)
  np.testing.assert_array_equal(np.asarray(g), [1, 1, 1, 0])


def test_regression_float32_overflow_in_calibration():
  """Finite ranges whose float32 statistics overflow: asymmetric hi − lo, the binary mean
  and the ternary threshold / mean summed to Inf, and the scale fell back to 1 (every
  ±3e38 dequantized to a value near 0, ternary codes all 0)."""
  x = jnp.array([3e38, -3e38, 1.0, 3e38], jnp.float32)
  q = jq.quantize(x, QS(symmetric=False, granularity="tensor"), reduce_axes=(0,))
  np.testing.assert_allclose(float(q.scale[0]), 6e38 / 255, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jq.dequantize(q), np.float64)[[0, 1]], [3e38, -3e38],
                             rtol=1e-2)
  qb = jq.quantize(x, QS(format="binary", granularity="tensor"), reduce_axes=(0,))
  np.testing.assert_allclose(float(qb.scale[0]), (9e38 + 1) / 4, rtol=1e-5)
  qt = jq.quantize(x, QS(format="ternary", granularity="tensor"), reduce_axes=(0,))
  np.testing.assert_array_equal(np.asarray(qt.values), [1, -1, 0, 1])
  np.testing.assert_allclose(float(qt.scale[0]), 3e38, rtol=1e-5)


@pytest.mark.parametrize("mag", [1.0, 3e38])
@pytest.mark.parametrize("symmetric", [True, False])
def test_regression_mse_smallest_ratio_is_selectable(symmetric, mag):
  """_mse_search started from the first ratio's error but the *unclipped* range, so when
  the smallest clip ratio (0.3) was the best it returned ratio 1.0 (the absmax range).
  And at mag=3e38 every squared error overflowed float32, so all ratios tied (errors are
  now measured in units of the entry's range)."""
  if symmetric:  # one outlier; at 2 bits clipping it to the bulk at 0.3 is optimal
    x = np.array([1.0] + [0.3] * 100)
  else:  # found by brute force over the ratio grid (numpy): ratio 0.3 wins by 14%
    x = np.array([1.0, -1.0] + [-0.34] * 50 + [-0.16] * 50)
  x = (x * mag).astype(np.float32)
  spec = QS(bits=2, symmetric=symmetric, granularity="tensor", calibration="mse")
  s = float(jq.quantize(x, spec, reduce_axes=(0,)).scale[0])
  qmin, qmax = numerics.int_range(spec)
  want = 0.3 * mag / qmax if symmetric else 0.6 * mag / (qmax - qmin)
  np.testing.assert_allclose(s, want, rtol=1e-5)
  err = lambda sp: np.sum((np.asarray(jq.fake_quant(x, sp, reduce_axes=(0,)), np.float64)
                           - x.astype(np.float64)) ** 2)
  e_mse, e_abs = err(spec), err(QS(bits=2, symmetric=symmetric, granularity="tensor"))
  assert e_mse < 0.9 * e_abs


def test_regression_dequantize_saturates_to_the_dtype_range():
  """float16 ±65504 with an asymmetric grid: the grid edge (qmin − zp)·s lies half a
  step beyond −65504 and the cast to float16 gave −Inf from a finite input."""
  x = jnp.array([65504, -65504, 1.0], jnp.float16)
  spec = QS(symmetric=False)
  out = np.asarray(jq.fake_quant(x, spec, reduce_axes=(0,)), np.float64)
  assert np.all(np.isfinite(out)) and out[1] == -65504
  deq = np.asarray(jq.dequantize(jq.quantize(x, spec, reduce_axes=(0,)), jnp.float16))
  assert np.all(np.isfinite(deq.astype(np.float64)))


def test_regression_lsq_step_gradient_ignores_nan():
  """LSQ's step-size gradient summed g·(round(y) − y) with y = NaN at a NaN input: one
  NaN activation made the learned step's gradient NaN. NaN gets the code of 0.0, so it
  contributes round(0) − 0 = 0, as in the forward pass."""
  spec = QS(ste="lsq", granularity="tensor", bits=4)
  x = jnp.array([1.0, np.nan, -2.0, np.inf, 0.3], jnp.float32)
  x0 = jnp.where(jnp.isnan(x), 0.0, x)
  learned = numerics.init_learned(x, spec, (0,))
  grad = jax.grad(lambda a, l: jnp.sum(jq.fake_quant(a, spec, reduce_axes=(0,), learned=l)),
                  argnums=1)
  g, g0 = grad(x, learned), grad(x0, learned)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-6)


def test_regression_lsq_step_gradient_of_an_empty_tensor():
  """LSQ's gradient scale 1/sqrt(N·Q_P) with N = 0 elements per step (an empty x) was
  1/0 = Inf, and Inf × the empty sum 0 gave a NaN step gradient."""
  spec = QS(ste="lsq", bits=4)
  x = jnp.zeros((0, 3), jnp.float32)
  learned = numerics.init_learned(x, spec, (0,))
  g = jax.grad(lambda l: jnp.sum(jq.fake_quant(x, spec, reduce_axes=(0,), learned=l)))(learned)
  np.testing.assert_array_equal(np.asarray(g), np.zeros((1, 3)))


def test_regression_lsq_init_of_huge_values():
  """init_learned's LSQ step 2·mean|x|/sqrt(Q_P): the float32 mean of |x| ~ 3e38 summed to
  Inf and the step fell back to 1 (every value saturated); 2·mean beyond FLT_MAX too."""
  x = jnp.array([3e38, -3e38, 1.0, np.inf], jnp.float32)
  for bits, want in ((8, 2 * 1.5e38 / np.sqrt(127)), (2, 3e38)):
    spec = QS(ste="lsq", bits=bits, granularity="tensor")
    np.testing.assert_allclose(float(numerics.init_learned(x, spec, (0,))[0]), want, rtol=1e-5)
  spec = QS(ste="lsq", bits=2, granularity="tensor")
  x = jnp.array([3e38, 3e38], jnp.float32)  # 2·mean = 6e38: saturates at FLT_MAX
  assert float(numerics.init_learned(x, spec, (0,))[0]) == np.finfo(np.float32).max


def _value_and_vjp_ones(fn, *args):
  """fn(*args) and its VJP with a ones cotangent."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(jnp.ones_like(out))


@pytest.mark.parametrize("mode", ["int", "fake"])
def test_regression_dot_with_empty_contraction_and_groups(mode):
  """K = 0 with 'group' granularity: the operand has 0 scale groups and the int kernel /
  quantized backward computed K // G = 0 // 0 (ZeroDivisionError), or _group_count
  rejected 0 groups against 1. The empty contraction is 0, its gradients empty."""
  lhs, rhs = jnp.zeros((3, 0), jnp.float32), jnp.zeros((0, 2), jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  for rs in (QS(granularity="group", group_size=1), QS()):
    spec = DS(lhs=QS(granularity="group", group_size=2), rhs=rs, mode=mode,
              grad=QS(granularity="tensor"))
    # Under jit (one compile, not one per eager op); the ZeroDivisionError / group-count
    # errors this catches are raised while tracing, jit or not.
    out, (dl, dr) = jax.jit(lambda a, b: _value_and_vjp_ones(
        lambda u, v: jq.dot_general(u, v, dims, spec), a, b))(lhs, rhs)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 2)))
    assert dl.shape == (3, 0) and dr.shape == (0, 2)


# ------------------------------------------------------------------ the case count

def test_zz_fuzz_case_count(capsys):
  """Prints how many cases each fuzz test ran in this session and checks that each one
  that passed ran (nearly) its full budget. Runs last in file order."""
  if not FINISHED:
    pytest.skip("no fuzz test ran to completion in this session")
  budget = {"test_fuzz_quantizers_structure": R_STRUCTURE * N_STRUCTURE,
            "test_fuzz_quantizers_values": R_VALUES * N_VALUES,
            "test_fuzz_dot_general_specs": R_DOT * N_DOT,
            "test_invalid_specs_raise_naming_a_field": N_INVALID,
            "test_fuzz_quantizers_structure_deep": DEEP * R_STRUCTURE * N_STRUCTURE_DEEP,
            "test_fuzz_quantizers_values_deep": DEEP * R_VALUES * N_VALUES_DEEP,
            "test_fuzz_dot_general_deep": DEEP * R_DOT * N_DOT_DEEP,
            "test_invalid_specs_raise_naming_a_field_deep": DEEP * N_INVALID_DEEP,
            **{f"test_fuzz_dot_general[{lay}]": R_DOT * N_DOT_LAYOUT for lay in _QUICK_DOT}}
  with capsys.disabled():
    print("\n[fuzz] cases run: " + ", ".join(f"{k}={v}" for k, v in FINISHED.items())
          + f"; total {sum(FINISHED.values())}")
  for name, n in FINISHED.items():
    assert n >= 0.9 * budget[name], (name, n, budget[name])
  # The quick run keeps a case of every kind the properties distinguish: were one missing
  # (the deep run still has it), raise the quick budget (N_*) until it is reached.
  quick = {"test_fuzz_quantizers_structure", "test_fuzz_quantizers_values"}
  if _SCALE >= 1 and quick <= FINISHED.keys() and CASES["test_fuzz_quantizers_learned"] >= 14:
    missed = QUANTIZER_FEATURES - set().union(*(HIT[name] for name in quick),
                                              HIT["test_fuzz_quantizers_learned"])
    assert not missed, f"the quick quantizer fuzz reached no case of {sorted(missed)}"
  quick_dot = {f"test_fuzz_dot_general[{lay}]" for lay in _QUICK_DOT} | {
      "test_fuzz_dot_general_specs"}
  if _SCALE >= 1 and quick_dot <= FINISHED.keys():
    missed = DOT_FEATURES - set().union(*(HIT[name] for name in quick_dot))
    assert not missed, f"the quick dot_general fuzz reached no case of {sorted(missed)}"
  if _SCALE >= 1 and "test_invalid_specs_raise_naming_a_field" in FINISHED:
    missed = ({"quant_spec_valid", "quant_spec_invalid", "dot_spec_valid", "dot_spec_invalid"}
              - HIT["test_invalid_specs_raise_naming_a_field"])
    assert not missed, f"the quick invalid-spec fuzz reached no case of {sorted(missed)}"
