"""The format registry and the formats added through it: MXFP8 / MXFP4 (OCP Microscaling
v1.0), NVFP4 and int16.

Every element cast is checked three ways: the library's path, `ml_dtypes`' casts, and a
small numpy reference of the OCP rounding rules written here (round to nearest, ties to
even, on the minifloat grid; saturation at the largest finite value). Scales are checked
against numpy references of the MX rule X = 2^(floor(log2 amax) − emax_elem) and of
NVFP4's two-level rule."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats, numerics

QS = jq.QuantSpec
BLOCK = ("mxfp8", "mxfp4", "nvfp4")
# (mantissa bits, smallest normal exponent, largest finite value) of the element types.
E4M3 = (3, -6, 448.0)
E2M1 = (1, 0, 6.0)
ELEMS = {"mxfp8": E4M3, "mxfp4": E2M1, "nvfp4": E2M1}
EMAX = {"mxfp8": 8, "mxfp4": 2}
ML_DTYPES = {"mxfp8": ml_dtypes.float8_e4m3fn, "mxfp4": ml_dtypes.float4_e2m1fn,
             "nvfp4": ml_dtypes.float4_e2m1fn}


def ref_round(y, elem):
  """Round to nearest even on a minifloat grid, saturating: the OCP element cast.

  Below the smallest normal 2^emin the grid is the subnormal one, spacing 2^(emin − m);
  at exponent e ≥ emin the spacing is 2^(e − m). Division by a power of two is exact, and
  np.round rounds half to even."""
  m, emin, vmax = elem
  y = np.asarray(y, np.float64)
  a = np.abs(y)
  _, k = np.frexp(np.where(a > 0, a, 1.0))
  e = np.maximum(k - 1, emin)
  step = np.ldexp(1.0, e - m)
  q = np.minimum(np.round(a / step) * step, vmax)
  return np.where(np.signbit(y), -q, q)


def ml_cast(y, dtype, vmax):
  """ml_dtypes' cast (round to nearest even) of y clipped to ±vmax (saturation)."""
  return np.clip(np.asarray(y, np.float32), -vmax, vmax).astype(dtype).astype(np.float64)


def probe_values(elem):
  """Grid points, midpoints, points one float32 ulp either side of them, beyond max."""
  m, emin, vmax = elem
  grid = np.unique(np.abs(ref_round(np.linspace(0, vmax, 20000), elem)))
  mids = (grid[1:] + grid[:-1]) / 2
  pts = np.concatenate([grid, mids, [vmax * 1.01, vmax * 1.5, vmax * 4]]).astype(np.float32)
  pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                        np.nextafter(pts, np.float32(0))])
  return np.concatenate([pts, -pts]).astype(np.float32)


def test_registry_is_the_one_list_of_formats():
  assert jq.spec.FORMATS == formats.names()
  for name in formats.names():
    assert formats.get(name).name == name
  with pytest.raises(KeyError, match="mxfp4"):
    formats.get("mxfp5")
  assert formats.sub_byte_bits() == {"binary": 1, "ternary": 2, "mxfp4": 4, "nvfp4": 4}


def _format_literals(path):
  """(line, text) of string constants that are format names other than 'int', and of
  comparisons of a `.format` with 'int', in a Python file."""
  named = set(formats.names()) - {"int"}
  hits = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Constant) and node.value in named:
      hits.append((node.lineno, node.value))
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute)
        and node.left.attr == "format"
        and any(isinstance(c, ast.Constant) and c.value == "int" for c in node.comparators)):
      hits.append((node.lineno, "format == 'int'"))
  return hits


def test_no_format_literals_outside_the_registry():
  root = pathlib.Path(jq.__file__).parent
  files = [p for p in root.rglob("*.py") if "formats" not in p.relative_to(root).parts]
  files.append(root.parent / "experiments" / "sweeps" / "axes.py")
  hits = [(p.name, hit) for p in files if p.exists() for hit in _format_literals(p)]
  assert hits == []
  assert _format_literals(root / "formats" / "__init__.py")  # the check finds them


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_element_cast_matches_ml_dtypes_and_the_reference(fmt):
  f = formats.get(fmt)
  y = probe_values(ELEMS[fmt])
  ours = np.asarray(jax.jit(f.cast)(jnp.asarray(y)).astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(ours, ref_round(y, ELEMS[fmt]))
  np.testing.assert_array_equal(ours, ml_cast(y, ML_DTYPES[fmt], ELEMS[fmt][2]))


def test_reference_rounding_sanity():
  # Ties to even on E2M1: 0.25 → 0, 0.75 → 1, 1.25 → 1, 2.5 → 2, 3.5 → 4, 5 → 4; 7 → 6.
  got = ref_round([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0], E2M1)
  np.testing.assert_array_equal(got, [0, 1, 1, 2, 2, 4, 4, 6, -4])
  # E4M3 around 448: 464 is the tie between 448 and the next binade step, saturates.
  np.testing.assert_array_equal(ref_round([432.0, 440.0, 464.0, 1e6, 2.0 ** -10], E4M3),
                                [448, 448, 448, 448, 0])


def _blocks(x, size):
  """x [K, N] as [K / size, size, N]: blocks along the reduced axis 0."""
  return x.reshape(x.shape[0] // size, size, x.shape[1])


def ref_mx(x, fmt):
  """(scale [K/32, N], codes [K, N]) by the OCP MX rule, in numpy."""
  xb = _blocks(x.astype(np.float64), 32)
  amax = np.max(np.abs(xb), axis=1)
  e = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - EMAX[fmt]
  e = np.where(amax > 0, np.clip(e, -126, 127), 0)
  scale = np.ldexp(1.0, e.astype(int))
  codes = ref_round(xb / scale[:, None, :], ELEMS[fmt]).reshape(x.shape)
  return scale, codes


def _data(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  # Block magnitudes over many binades, a zero block, exact powers of two, saturation.
  x *= np.exp2(rng.integers(-20, 20, (shape[0] // 32, 1, shape[1]))).repeat(32, 0).reshape(
      shape).astype(np.float32)
  x[:32, 0] = 0.0
  x[32:64, 1] = np.float32(2.0 ** 5)
  x[33, 1] = np.float32(2.0 ** 5 * 1.99)  # amax / X close to 2^(emax+1): saturates
  return x


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_quantize_matches_the_reference(fmt):
  x = _data((128, 8))
  q = jq.quantize(x, QS(format=fmt), reduce_axes=(0,))
  scale, codes = ref_mx(x, fmt)
  assert q.values.dtype == formats.get(fmt).elem and q.scale.shape == (4, 8)
  np.testing.assert_array_equal(np.asarray(q.scale, np.float64), scale)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.float32), np.float64), codes)
  ml = ml_cast(x.astype(np.float64).reshape(4, 32, 8) / scale[:, None], ML_DTYPES[fmt],
               ELEMS[fmt][2]).reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.float32), np.float64), ml)
  # E8M0: every scale is a power of two that float8_e8m0fnu holds exactly.
  e8 = np.asarray(q.scale).astype(ml_dtypes.float8_e8m0fnu)
  np.testing.assert_array_equal(e8.astype(np.float64), scale)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), (codes * np.repeat(scale, 32, 0)
                                                             ).astype(np.float32))


def ref_nvfp4(x):
  """(scale [K/16, N], codes [K, N], tensor scale) by the NVFP4 rule, in float32 numpy."""
  f32 = np.float32
  amax = f32(np.max(np.abs(x)))
  t = amax * f32(1.0 / (6.0 * 448.0))
  m, k = np.frexp(t)
  s_t = f32(np.ldexp(np.round(m * 2.0 ** 20) / 2.0 ** 20, k))
  xb = _blocks(x, 16)
  inv = f32(1.0) / (f32(6.0) * s_t)
  s_b = ref_round(np.minimum(np.max(np.abs(xb), axis=1) * inv, f32(448.0)), E4M3)
  ml_s_b = ml_cast(np.max(np.abs(xb), axis=1) * inv, ml_dtypes.float8_e4m3fn, 448.0)
  np.testing.assert_array_equal(s_b, ml_s_b)
  scale = (s_b.astype(f32) * s_t).astype(f32)
  assert np.all(scale.astype(np.float64) == s_b * np.float64(s_t))  # exact product
  safe = np.where(scale > 0, scale, f32(1.0))
  y = xb * (f32(1.0) / safe)[:, None, :]
  codes = np.where(scale[:, None, :] > 0, ref_round(y, E2M1), 0.0).reshape(x.shape)
  ml = np.where(scale[:, None, :] > 0, ml_cast(y, ml_dtypes.float4_e2m1fn, 6.0), 0.0)
  np.testing.assert_array_equal(codes, ml.reshape(x.shape))
  return scale, codes, s_t


def test_nvfp4_quantize_matches_the_reference():
  x = _data((128, 8), seed=1)
  q = jq.quantize(x, QS(format="nvfp4"), reduce_axes=(0,))
  scale, codes, s_t = ref_nvfp4(x)
  assert q.scale.shape == (8, 8)
  np.testing.assert_array_equal(np.asarray(q.scale), scale)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.float32), np.float64), codes)
  assert float(jnp.max(q.scale)) == 448.0 * float(s_t)  # the block holding amax: s_b = 448


@pytest.mark.parametrize("fmt", BLOCK)
def test_pack_stores_codes_and_scales_exactly(fmt):
  x = _data((64, 8), seed=2)
  # Quantize under jit (eagerly every op compiles on its own); pack as convert does.
  q = jax.jit(lambda x: jq.quantize_weight(x, QS(format=fmt), jq.make_layout(2, (0,))))(x)
  p = q.pack()
  # Packing under jit stores the same bytes (XLA once turned nvfp4's division by 448
  # into a multiplication by 1/448 there, and the scales no longer round-tripped).
  jitted = jax.jit(lambda q: q.pack())(q)
  np.testing.assert_array_equal(np.asarray(jitted.scale.astype(jnp.float32)),
                                np.asarray(p.scale.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(jitted.unpacked().scale), np.asarray(q.scale))
  assert p.packed and p.values.dtype == (jnp.uint8 if fmt != "mxfp8" else jnp.float8_e4m3fn)
  assert p.scale.dtype == (jnp.float8_e4m3fn if fmt == "nvfp4" else jnp.float8_e8m0fnu)
  u = p.unpacked()
  np.testing.assert_array_equal(np.asarray(u.scale), np.asarray(q.scale))
  np.testing.assert_array_equal(np.asarray(u.values.astype(jnp.float32)),
                                np.asarray(q.values.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(q.dequantize()))
  if fmt != "mxfp8":  # the nibbles are E2M1's bit patterns (ml_dtypes' encoding)
    bits = np.asarray(q.values).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(jq.unpack(p.values, 4, x.shape)) & 15, bits)
  if fmt != "nvfp4":  # E8M0 bytes: the biased exponent log2(X) + 127
    np.testing.assert_array_equal(np.asarray(p.scale).view(np.uint8),
                                  np.log2(np.asarray(q.scale)).astype(int) + 127)


def test_block_spec_fields_are_derived_and_checked():
  s = QS(format="mxfp4")
  assert (s.granularity, s.group_size, s.effective_bits, s.storage_bits) == ("group", 32, 4, 4)
  assert QS(format="nvfp4").group_size == 16 and QS(format="mxfp8").storage_bits == 8
  assert not s.is_integer and s == QS(format="mxfp4", group_size=32)
  for kwargs, field in [(dict(group_size=16), "group_size"), (dict(symmetric=False), "symmetric"),
                        (dict(rounding="stochastic"), "rounding"), (dict(ste="lsq"), "ste"),
                        (dict(calibration="mse"), "calibration"), (dict(static=True), "static")]:
    with pytest.raises(ValueError, match=field):
      QS(format="mxfp4", **kwargs)
  with pytest.raises(ValueError, match="mode"):
    jq.Rule(".*", weight=QS(format="mxfp4"))
  jq.Rule(".*", weight=QS(format="mxfp4"), act=QS(format="nvfp4"), mode="fake")


def test_nonfinite_and_zero_inputs():
  x = np.ones((32, 3), np.float32)
  x[0, 0], x[1, 0], x[:, 2] = np.nan, np.inf, 0.0
  for fmt in BLOCK:
    y = np.asarray(jq.fake_quant(jnp.asarray(x), QS(format=fmt), reduce_axes=(0,)))
    assert np.isnan(y[0, 0]) and np.all(y[1:, 0] == y[1:, 0])  # NaN kept, Inf saturates
    assert y[1, 0] == np.max(y[1:, 0]) and np.all(y[:, 2] == 0.0)
    # 1.0 comes back (NVFP4: to the float32 rounding of its tensor scale, amax / 2688).
    np.testing.assert_allclose(y[:, 1], 1.0, rtol=2 ** -23 if fmt == "nvfp4" else 0)


@pytest.mark.parametrize("fmt", BLOCK)
def test_fake_quant_gradients(fmt):
  x = jnp.asarray(_data((64, 4), seed=3))
  # Under jit: one compile per program (eagerly every op of the VJP compiles on its own).
  g = jax.jit(jax.grad(lambda x: jnp.sum(
      jq.fake_quant(x, QS(format=fmt), reduce_axes=(0,)) * 3.0)))(x)
  np.testing.assert_array_equal(np.asarray(g), 3.0)  # identity STE
  spec = QS(format=fmt, ste="clipped")
  g = jax.jit(jax.grad(lambda x: jnp.sum(jq.fake_quant(x, spec, reduce_axes=(0,)))))(x)
  q = jax.jit(lambda x: jq.quantize(x, spec, reduce_axes=(0,)))(x)
  bound = formats.get(fmt).max * np.repeat(np.asarray(q.scale), x.shape[0] // q.scale.shape[0], 0)
  np.testing.assert_array_equal(np.asarray(g), (np.abs(np.asarray(x)) <= bound) * 1.0)
