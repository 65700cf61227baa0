"""Grouped / depthwise convolutions and transposed convolutions (nn.ConvTranspose): the
conv op with feature_group_count and lhs_dilation against float convolutions of the
centered codes, in both runtimes; a MobileNet-style block (depthwise + pointwise +
ReLU6) and a small ConvTranspose decoder through to_integer, bit-exact in the numpy
runtime and close to the model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from jaxquant.integer_only import to_integer
from tests.integer_only.int_helpers import (assert_runtime_exact_and_close, ema_as_static,
                                            numpy_runtime, qat_forward_ranges, rules)
from tests.integer_only.test_ops import _both, _codes, _program, _to_int32

NR = numpy_runtime()
RNG = np.random.default_rng(4)
NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

CASES = {  # name: (input, kernel, strides, padding, lhs_dilation, groups)
    "depthwise": ((2, 6, 5, 4), (3, 3, 1, 4), [1, 2], [[1, 1], [0, 2]], [1, 1], 4),
    "grouped_2": ((2, 5, 5, 6), (3, 2, 3, 4), [2, 1], [[1, 0], [1, 1]], [1, 1], 2),
    "transposed_s2": ((2, 4, 3, 3), (3, 3, 3, 5), [1, 1], [[2, 2], [1, 2]], [2, 2], 1),
    "transposed_grouped": ((1, 3, 4, 4), (2, 3, 2, 6), [1, 2], [[1, 1], [2, 0]], [3, 2], 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_and_dilated_conv_op(case, tmp_path):
  xs, ws, strides, padding, lhs_dil, groups = CASES[case]
  zp = -6
  x, w = _codes(xs), _codes(ws)
  conv = {"op": "conv", "in": ["input"], "out": "c", "layer": "conv", "zp": zp, "w": "c.w",
          "strides": strides, "padding": padding, "rhs_dilation": [1, 1],
          "lhs_spec": list(NHWC[0]), "rhs_spec": list(NHWC[1]), "out_spec": list(NHWC[2]),
          "lhs_dilation": lhs_dil, "feature_group_count": groups}
  req, arrays = _to_int32("c", "out", 4)
  got = _both(_program(xs[1:], [conv, req], {"c.w": w, **arrays}, "out", zp=zp), x, tmp_path)
  ref = lax.conv_general_dilated(  # float32 is exact here: |sums| < 2^24
      jnp.asarray(x, jnp.float32) - zp, jnp.asarray(w, jnp.float32), strides,
      [tuple(p) for p in padding], lhs_dilation=lhs_dil, feature_group_count=groups,
      dimension_numbers=lax.ConvDimensionNumbers(*NHWC))
  np.testing.assert_array_equal(got, np.asarray(ref).astype(np.int64))


class MobileNetBlock(nn.Module):
  """Depthwise 3×3 (stride 2) → ReLU6 → pointwise 1×1 → ReLU6 → grouped 3×3 → mean →
  Dense (MobileNet v1's block, plus a grouped conv)."""
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), name="stem")(x)
    h = nn.Conv(8, (3, 3), strides=(2, 2), feature_group_count=8, name="dw")(h)
    h = jnp.minimum(nn.relu(h), 6.0)
    h = jnp.minimum(nn.relu(nn.Conv(12, (1, 1), name="pw")(h)), 6.0)
    h = nn.relu(nn.Conv(12, (3, 3), feature_group_count=3, name="grouped")(h))
    return nn.Dense(4, name="head")(jnp.mean(h, axis=(1, 2)))


class Decoder(nn.Module):
  """Dense → reshape → ConvTranspose (stride 2, SAME) → ReLU → ConvTranspose (VALID)."""
  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(4 * 4 * 6, name="dense_0")(z)).reshape(z.shape[0], 4, 4, 6)
    h = nn.relu(nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME", name="up_0")(h))
    return nn.ConvTranspose(2, (2, 2), strides=(2, 2), padding="VALID", name="head")(h)


MODELS = {"mobilenet": (MobileNetBlock(), (10, 10, 3)), "decoder": (Decoder(), (6,))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float_model_bit_exact_and_close(name, tmp_path):
  model, shape = MODELS[name]
  x = RNG.normal(size=(16,) + shape).astype(np.float32)
  # Jitted init: one compile instead of one per op.
  variables = jax.tree.map(np.asarray, dict(jax.jit(model.init)(jax.random.key(0), x)))
  program = to_integer(model, variables, [x])  # a float model: W8A8, calibrated
  convs = [op for op in program.graph.ops if op["op"] == "conv"]
  if name == "mobilenet":
    assert sorted(op.get("feature_group_count", 1) for op in convs) == [1, 1, 3, 8]
  else:
    assert [op.get("lhs_dilation") for op in convs] == [[2, 2], [2, 2]]
  assert_runtime_exact_and_close(model, variables, program, x, tmp_path, 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qat_model_bit_exact_and_close(name, tmp_path):
  """W8A8 first / last layers, 4-bit LSQ in between; QAT's EMA ranges as the grids."""
  model, shape = MODELS[name]
  x = RNG.normal(size=(32,) + shape).astype(np.float32)
  batches = [x[:16], x[16:]]
  qm, variables = qat_forward_ranges(model, rules(bits=4, first="stem|dense_0"), batches)
  variables = ema_as_static(variables)
  program = to_integer(qm, variables, batches)
  assert_runtime_exact_and_close(qm, variables, program, x, tmp_path, 0.1)
