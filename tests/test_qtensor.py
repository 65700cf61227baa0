"""QTensor (pytree, invariant x ≈ (values − zero_point)·scale) and sub-byte pack/unpack."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.qtensor import plane


def test_qtensor_invariant_with_group_scales_and_zero_points():
  values = jnp.asarray(np.arange(-6, 6, dtype=np.int8).reshape(4, 3))
  scale = jnp.asarray([[0.5, 1.0, 2.0], [0.25, 4.0, 1.0]], jnp.float32)  # 2 groups of 2 rows
  zp = jnp.asarray([[1, 0, -2], [0, 3, 1]], jnp.int32)
  q = jq.QTensor(values, scale, zp)
  expected = (np.asarray(values, np.float32) - np.repeat(np.asarray(zp), 2, axis=0)) \
      * np.repeat(np.asarray(scale), 2, axis=0)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), expected)
  np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), expected)
  assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
  assert q.shape == (4, 3)
  # symmetric: no zero point
  q0 = jq.QTensor(values, jnp.full((1, 1), 0.5, jnp.float32))
  np.testing.assert_array_equal(np.asarray(q0.dequantize()), np.asarray(values) * 0.5)


def test_qtensor_is_a_pytree_through_jit():
  x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
  q = jq.quantize(x, jq.QuantSpec(symmetric=False), reduce_axes=(0,))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 3
  q2 = jax.tree_util.tree_unflatten(treedef, leaves)
  np.testing.assert_array_equal(np.asarray(q2.values), np.asarray(q.values))
  out = jax.jit(lambda q: q.dequantize())(q)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(q.dequantize()))
  qs = jq.quantize(x, jq.QuantSpec(), reduce_axes=(0,))
  assert qs.zero_point is None and len(jax.tree_util.tree_leaves(qs)) == 2
  with pytest.raises(Exception):  # frozen
    q.scale = None


def test_pack_layout_is_little_endian_within_bytes():
  # 1-bit: code +1 → bit 1, −1 → bit 0, first value in the lowest bit.
  packed = jq.pack(jnp.asarray([1, -1, 1, 1, -1, -1, -1, 1], jnp.int8), 1)
  assert packed.dtype == jnp.uint8 and np.asarray(packed).tolist() == [0b10001101]
  # 4-bit two's complement: [−1, 3] → low nibble 0xF, high nibble 0x3.
  assert np.asarray(jq.pack(jnp.asarray([-1, 3], jnp.int8), 4)).tolist() == [0x3F]
  # 2-bit: [1, −2, 0, −1] → 01, 10, 00, 11 from the low bits up.
  assert np.asarray(jq.pack(jnp.asarray([1, -2, 0, -1], jnp.int8), 2)).tolist() == [0b11001001]


def test_pack_stores_bit_planes_of_consecutive_codes():
  # 4-bit, 8 codes: byte j holds code j (low nibble) and code 4 + j (high nibble), so a
  # [4, 2] weight's rows 0-1 are the low nibbles and rows 2-3 the high ones.
  codes = jnp.asarray([[1, 2], [3, 4], [5, 6], [-1, -2]], jnp.int8)
  assert np.asarray(jq.pack(codes, 4)).tolist() == [0x51, 0x62, 0xF3, 0xE4]
  # 2-bit, 5 codes (padded to 8): plane i holds codes 2i, 2i + 1.
  assert np.asarray(jq.pack(jnp.asarray([1, -1, 0, 1, -2], jnp.int8), 2)).tolist() == [
      0b00100001, 0b00000111]
  # `plane` reads one plane back, sign-extended; an index array picks a plane per byte.
  packed = jq.pack(codes, 4)
  np.testing.assert_array_equal(np.asarray(plane(packed, 1, 4)), [5, 6, -1, -2])
  np.testing.assert_array_equal(np.asarray(plane(packed, jnp.asarray([0, 1, 0, 1]), 4)),
                                [1, 6, 3, -2])


CODE_RANGE = {1: [-1, 1], 2: [-2, -1, 0, 1], 4: list(range(-8, 8))}


# jit: one compilation per shape instead of one per eager op and shape.
_pack = jax.jit(jq.pack, static_argnums=1)
_unpack = jax.jit(jq.unpack, static_argnums=(1, 2))


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(bits=st.sampled_from([1, 2, 4]), size=st.sampled_from([1, 3, 7, 8, 13, 64]),
                  rows=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip(bits, size, rows, seed):
  shape = (rows, size)
  codes = np.random.default_rng(seed).choice(CODE_RANGE[bits], size=shape).astype(np.int8)
  packed = _pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (-(-rows * size * bits // 8),)  # ceil(n·bits/8) bytes
  out = _unpack(packed, bits, shape)
  assert out.dtype == jnp.int8 and out.shape == shape
  np.testing.assert_array_equal(np.asarray(out), codes)


def test_pack_round_trips_quantized_codes():
  x = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
  for spec, bits in ((jq.QuantSpec(format="binary"), 1), (jq.QuantSpec(format="ternary"), 2),
                     (jq.QuantSpec(bits=4, symmetric=False), 4), (jq.QuantSpec(bits=2), 2)):
    q = jq.quantize(x, spec, reduce_axes=(0,))
    restored = jq.QTensor(_unpack(_pack(q.values, bits), bits, q.shape), q.scale,
                          q.zero_point)
    np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(q.dequantize()))


@pytest.mark.parametrize("bits", [0, 3, 8])
def test_pack_bad_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    jq.pack(jnp.zeros((4,), jnp.int8), bits)
  with pytest.raises(ValueError, match="bits"):
    jq.unpack(jnp.zeros((4,), jnp.uint8), bits, (4,))
