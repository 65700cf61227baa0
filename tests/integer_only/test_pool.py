"""max_pool / window_sum (nn.max_pool, nn.avg_pool): the ops on hand-built graphs against
a brute-force loop over output positions, in both runtimes; and models with pooling
through to_integer, bit-exact in the numpy runtime and close to the float model."""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.integer_only import IntegerOnlyError, to_integer
from jaxquant.integer_only import fixed_point as fp
from tests.integer_only.int_helpers import (assert_runtime_exact_and_close, numpy_runtime,
                                            ref_requantize)
from tests.integer_only.test_ops import _both, _codes, _program, _to_int32

NR = numpy_runtime()
RNG = np.random.default_rng(3)

CASES = {  # name: (input shape, window, strides, padding) over all axes, batch first
    "1d_valid": ((2, 9, 3), (1, 3, 1), (1, 2, 1), ((0, 0), (0, 0), (0, 0))),
    "2d_same_stride2": ((2, 7, 6, 3), (1, 3, 3, 1), (1, 2, 2, 1),
                        ((0, 0), (1, 1), (1, 1), (0, 0))),
    "2d_asym_pad_stride_gt_window": ((1, 8, 5, 2), (1, 2, 3, 1), (1, 3, 2, 1),
                                     ((0, 0), (0, 1), (2, 1), (0, 0))),
    "over_channels_too": ((2, 5, 4), (1, 2, 2), (1, 1, 2), ((0, 0), (1, 0), (0, 1))),
}


def _brute(x, window, strides, padding, reduce, fill):
  """Each output element from its own window, by index arithmetic (taps in padding get
  `fill`)."""
  out_shape = [(n + lo + hi - w) // s + 1
               for n, w, s, (lo, hi) in zip(x.shape, window, strides, padding)]
  out = np.zeros(out_shape, np.int64)
  for o in itertools.product(*map(range, out_shape)):
    vals = []
    for tap in itertools.product(*map(range, window)):
      i = [oi * s + t - lo for oi, s, t, (lo, _) in zip(o, strides, tap, padding)]
      inside = all(0 <= ii < n for ii, n in zip(i, x.shape))
      vals.append(int(x[tuple(i)]) if inside else fill)
    out[o] = reduce(vals)
  return out


def _pool_op(kind, window, strides, padding, zp=None):
  op = {"op": kind, "in": ["input"], "out": "p", "layer": "pool", "window": list(window),
        "strides": list(strides), "padding": [list(p) for p in padding]}
  if zp is not None:
    op["zp"] = zp
  return op


@pytest.mark.parametrize("case", sorted(CASES))
def test_max_pool_and_window_sum_ops(case, tmp_path):
  shape, window, strides, padding = CASES[case]
  x = _codes(shape)
  x.reshape(-1)[:2] = [-128, 127]  # the extreme codes: padding must not beat −128
  prog = _program(shape[1:], [_pool_op("max_pool", window, strides, padding)], {}, "p")
  got = _both(prog, x, tmp_path / "max")
  assert got.dtype == np.int32  # the program's output; the op itself keeps int8 codes
  np.testing.assert_array_equal(got, _brute(x, window, strides, padding, max, -10 ** 9))
  zp = -5
  req, arrays = _to_int32("p", "out", len(shape))
  prog = _program(shape[1:], [_pool_op("window_sum", window, strides, padding, zp), req],
                  arrays, "out", zp=zp)
  got = _both(prog, x, tmp_path / "sum")
  np.testing.assert_array_equal(
      got, _brute(x.astype(np.int64) - zp, window, strides, padding, sum, 0))


class PoolNet(nn.Module):
  """conv → ReLU → max_pool (SAME, stride 2) → conv → avg_pool → Dense."""
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), name="conv_0")(x))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    h = nn.Conv(8, (3, 3), name="conv_1")(h)
    h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding=((1, 0), (0, 1)),
                    count_include_pad=self.count_include_pad)
    return nn.Dense(5, name="head")(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_pooling_model_bit_exact_and_close(count_include_pad, tmp_path):
  model = PoolNet(count_include_pad)
  x = RNG.normal(size=(24, 9, 9, 2)).astype(np.float32)
  # Jitted init: one compile instead of one per op.
  variables = jax.tree.map(np.asarray, dict(jax.jit(model.init)(jax.random.key(0), x)))
  program = to_integer(model, variables, [x])  # a float model: W8A8, calibrated
  kinds = [op["op"] for op in program.graph.ops]
  assert "max_pool" in kinds and "window_sum" in kinds
  assert_runtime_exact_and_close(model, variables, program, x, tmp_path, 0.05)


def test_avg_pool_is_the_window_sum_rounded_once(tmp_path):
  """window_sum, then the converter's requantization by 1/n: every output is the exact
  fixed-point rule applied to the integer window sum (one rounding, to nearest), which is
  within half a code (plus the 31-bit multiplier's error) of the true window mean."""
  shape, window, strides, padding = CASES["2d_same_stride2"]
  n = int(np.prod(window))
  x = _codes(shape)
  sums = _brute(x.astype(np.int64), window, strides, padding, sum, 0)
  m0, left, right = fp.requant_shifts(np.full((1,) * len(shape), 1.0 / n),
                                      float(n * 255))
  req = {"op": "requant", "in": ["p"], "out": "q", "layer": "", "m0": "q.m0",
         "left": "q.l", "right": "q.r", "zp": 0, "lo": -128, "hi": 127, "dtype": "int8"}
  arrays = {"q.m0": m0, "q.l": left, "q.r": right}
  prog = _program(shape[1:], [_pool_op("window_sum", window, strides, padding, 0), req],
                  arrays, "q")
  got = _both(prog, x, tmp_path)
  m, l, r = int(m0.reshape(-1)[0]), int(left.reshape(-1)[0]), int(right.reshape(-1)[0])
  np.testing.assert_array_equal(got, np.vectorize(lambda v: ref_requantize(int(v), m, l, r))(sums))
  err = np.abs(got - sums / n)
  assert err.max() <= 0.5 + 1e-6, err.max()
  assert np.any(np.abs(err - 0.5) < 1e-9) or np.any(err > 0.3)  # rounding happened


def test_max_pool_window_in_padding_refused():
  class Bad(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.max_pool(nn.Dense(4, name="fc")(x), (2,), padding=((2, 0),))
      return h.reshape(x.shape[0], -1)

  x = np.zeros((2, 6, 3), np.float32)
  variables = Bad().init(jax.random.key(0), x)
  with pytest.raises(IntegerOnlyError, match="wholly in the padding"):
    to_integer(Bad(), variables, [x])


@pytest.mark.slow
def test_flax_example_resnet18_lowers_end_to_end(tmp_path):
  """The flax ImageNet example's ResNet-18 (tests/test_third_party.py; 8 filters, 32×32
  inputs): max-pool stem, BatchNorm folds, projections, residual adds and the mean head
  become one integer program, bit-exact in the numpy runtime and close to QAT."""
  from tests.test_third_party import A8, W8, ResNet, ResNetBlock
  model = ResNet(stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock, num_classes=10,
                 num_filters=8)
  x = RNG.normal(size=(4, 32, 32, 3)).astype(np.float32)
  qm = jq.quantize_model(model, [jq.Rule(".*", weight=W8, act=A8)])
  variables = jax.tree.map(np.asarray, dict(jax.jit(qm.init, static_argnames="train")(
      jax.random.key(0), x, train=False)))  # jitted: one compile instead of one per op

  def perturb(path, v):  # non-trivial BatchNorm statistics and scales (no zero γ)
    name, where = str(path[-1].key), jax.tree_util.keystr(path).lower()
    if "norm" not in where and "bn_init" not in where:
      return v
    if name in ("scale", "var"):
      return RNG.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    if name in ("mean", "bias"):
      return RNG.normal(0, 0.1, v.shape).astype(v.dtype)
    return v

  variables = jax.tree_util.tree_map_with_path(perturb, variables)
  program = to_integer(qm, variables, [x], apply_kwargs={"train": False})
  kinds = {op["op"] for op in program.graph.ops}
  assert {"max_pool", "conv", "add", "sum", "dot"} <= kinds
  program.save(str(tmp_path))
  codes = np.asarray(program.quantize_input(x))
  np.testing.assert_array_equal(NR.run(NR.load(str(tmp_path)), codes),
                                np.asarray(program.run(codes)))
  want = np.asarray(jax.jit(qm.apply, static_argnames="train")(variables, x, train=False))
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
