"""The sort-free `nanpercentile` (jaxquant/percentile.py) against numpy: exact order
statistics, its float32 interpolation, and its two selections agreeing bit for bit."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import percentile

_nanpercentile = jax.jit(percentile.nanpercentile, static_argnums=1)


QS_MATRIX = (0.0, 1.0, 50.0, 99.0, 99.9, 100.0)
# Every q of the matrix in one program per input shape (each q static, folded in as a
# constant as in a quantizer): one compile per case instead of one per case and q.
_nanpercentile_matrix = jax.jit(lambda v: [percentile.nanpercentile(v, q) for q in QS_MATRIX])


@pytest.mark.parametrize("case", ["normal", "ties", "signed_zeros", "nan", "one", "huge_range"])
def test_nanpercentile_without_sort_matches_numpy(case):
  """The sort-free percentile (bitwise search over order keys) against numpy's
  nanpercentile in float64, at each q of QS_MATRIX: the order statistics are exact, so
  the result is their float32 linear interpolation."""
  r = np.random.default_rng(zlib.crc32(case.encode()))  # deterministic (str hash is not)
  x = {"normal": lambda: r.standard_normal((3, 1000)),
       "ties": lambda: r.integers(-3, 4, (3, 101)).astype(float),
       "signed_zeros": lambda: r.choice([0.0, -0.0, 2.0, -2.0], (2, 50)),
       "nan": lambda: np.where(r.random((3, 200)) < 0.3, np.nan, r.standard_normal((3, 200))),
       "one": lambda: r.standard_normal((4, 1)),
       "huge_range": lambda: r.standard_normal((2, 300)) * 10.0 ** r.integers(-30, 30, (2, 300)),
       }[case]().astype(np.float32)
  srt = np.sort(x.astype(np.float64), axis=-1)  # NaN last
  for q, out in zip(QS_MATRIX, _nanpercentile_matrix(jnp.asarray(x))):
    out = np.asarray(out)
    ref = np.nanpercentile(x.astype(np.float64), q, axis=-1)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    for row in range(x.shape[0]):
      n = int(np.sum(~np.isnan(x[row])))
      pos = np.float32(q) / np.float32(100) * np.float32(n - 1)
      lo, hi = srt[row, int(np.floor(pos))], srt[row, int(np.ceil(pos))]
      if pos == np.floor(pos):  # an order statistic itself: exact
        assert out[row] == ref[row], (q, row, out[row], ref[row])
      else:  # between two: their interpolation at the float32 position, float32 rounding
        assert min(lo, hi) <= out[row] <= max(lo, hi)
        w = float(pos - np.floor(pos))
        assert abs(out[row] - (lo * (1 - w) + hi * w)) <= 4e-7 * max(abs(lo), abs(hi)), q


def test_nanpercentile_all_nan_row_is_nan_and_no_gradient():
  x = jnp.asarray([[np.nan, np.nan], [1.0, 3.0]], jnp.float32)
  out = np.asarray(_nanpercentile(x, 50.0))
  assert np.isnan(out[0]) and out[1] == 2.0
  assert float(jax.grad(lambda x: percentile.nanpercentile(x, 99.0).sum())(
      jnp.ones((1, 8), jnp.float32)).sum()) == 0.0


def test_nanpercentile_radix_select_equals_the_bitwise_search(monkeypatch):
  """The two exact selections (two 16-bit histogram passes for ≤ 64 long rows, the
  32-pass bitwise search otherwise) pick bit-identical order statistics, on rows with ties, signed
  zeros, subnormals, ±Inf, NaN, a single value, all NaN, and values 1e-30..1e30."""
  rng = np.random.default_rng(11)
  rows = [rng.normal(size=300),
          np.repeat([1.0, -0.0, 0.0, 2.5], 75),
          np.concatenate([rng.normal(size=290), [np.nan] * 10]),
          np.concatenate([[np.inf, -np.inf], rng.normal(size=298)]),
          np.concatenate([[7.0], [np.nan] * 299]),
          np.full(300, np.nan),
          np.sign(rng.normal(size=300)) * 10.0 ** rng.uniform(-30, 30, size=300),
          np.concatenate([rng.normal(size=250) * 1e-40, rng.normal(size=50)])]
  x = jnp.asarray(np.stack(rows).astype(np.float32))
  outs = {}
  monkeypatch.setattr(percentile, "_RADIX_MIN_SIZE", 0)  # these rows are short
  for cap in (64, 0):
    monkeypatch.setattr(percentile, "_RADIX_MAX_ROWS", cap)
    # One program per selection, every q static in it (q folded in as a constant).
    outs[cap] = [np.asarray(o) for o in jax.jit(lambda v: [
        percentile.nanpercentile(v, q) for q in (0.0, 1.0, 37.5, 50.0, 99.0, 99.9, 100.0)])(x)]
  for a, b in zip(outs[64], outs[0]):  # same order statistics; the interpolation may
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))  # round differently by 1 ulp
    ok = ~np.isnan(a)
    np.testing.assert_array_max_ulp(a[ok], b[ok], maxulp=1)
  # the order statistics themselves are bit-identical
  keys = percentile._order_keys(x)
  keys = jnp.where(jnp.isnan(x), jnp.uint32(0xFFFFFFFF), keys)
  n = jnp.sum(~jnp.isnan(x), axis=-1)
  for rank in (0, 3, 150, 299):
    low = jnp.clip(jnp.full((x.shape[0],), rank), 0, jnp.maximum(n - 1, 0)).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(n - 1, 0))
    t_low, t_high = jax.jit(percentile._select_by_radix)(keys, low, high)
    s_low = jax.jit(percentile._select_by_search)(keys, low)
    np.testing.assert_array_equal(np.asarray(t_low), np.asarray(s_low))
    np.testing.assert_array_equal(np.asarray(t_high),
                                  np.asarray(percentile._neighbour(keys, s_low, high)))
  # (test_nanpercentile_without_sort_matches_numpy checks the search's values)
  assert np.isnan(outs[64][4][5])
