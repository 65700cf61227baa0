"""Each op of the integer program format, on hand-built graphs: the JAX kernels and the
numpy runtime agree bit for bit, and both agree with independent references (float
contractions of the centered codes, the exact fixed-point rules, float normalization)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxquant.integer_only import IntegerProgram
from jaxquant.integer_only import graph as g
from jaxquant.integer_only.ops import norm as norm_op
from tests.integer_only.int_helpers import numpy_runtime, ref_mbqm, ref_requantize

NR = numpy_runtime()
RNG = np.random.default_rng(1)
IDENTITY_M0, IDENTITY_LEFT = 2 ** 30, 1  # M = 2^30·2^(1−31) = 1: requant keeps the value


def _program(shape, ops, arrays, out, zp=0):
  graph = g.Graph(input={"shape": list(shape), "scale": 1.0, "inv_scale": 1.0, "zp": zp,
                         "qmin": -128, "qmax": 127},
                  output={"tensor": out, "scale": 1.0}, ops=tuple(ops), arrays=arrays)
  return IntegerProgram(graph)


def _to_int32(src, name, rank):
  """A requant op that passes an int32 accumulator through unchanged (M = 1)."""
  arrays = {f"{name}.m0": np.full((1,) * rank, IDENTITY_M0, np.int32),
            f"{name}.left": np.full((1,) * rank, IDENTITY_LEFT, np.int32),
            f"{name}.right": np.zeros((1,) * rank, np.int32)}
  op = {"op": "requant", "in": [src], "out": name, "layer": "", "m0": f"{name}.m0",
        "left": f"{name}.left", "right": f"{name}.right", "zp": 0, "lo": -2 ** 31,
        "hi": 2 ** 31 - 1, "dtype": "int32"}
  return op, arrays


def _both(prog, codes, tmp_path):
  """(JAX output, numpy-runtime output of the saved program), asserted bit-identical."""
  got = np.asarray(prog.run(jnp.asarray(codes)))
  prog.save(str(tmp_path))
  ref = NR.run(NR.load(str(tmp_path)), codes)
  np.testing.assert_array_equal(got, ref)
  assert got.dtype == ref.dtype
  return got


def _codes(shape):
  return RNG.integers(-128, 128, shape).astype(np.int8)


CONVS = {  # name: (input shape, kernel shape, lhs/rhs/out specs, strides, padding, dilation)
    "nwc_stride_pad_dil": ((3, 11, 4), (3, 4, 5), ((0, 2, 1), (2, 1, 0), (0, 2, 1)),
                           [2], [[2, 1]], [2]),
    "nhwc_same": ((2, 6, 5, 3), (3, 3, 3, 4), ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
                  [1, 2], [[1, 1], [0, 2]], [1, 1]),
    "nchw_oihw": ((2, 3, 5, 6), (4, 3, 2, 3), ((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)),
                  [2, 1], [[1, 0], [1, 1]], [1, 2]),
    # An input smaller than the kernel (a late ResNet stage): with zp = 0 XLA folds the
    # padding into the conv and swaps its operands, where its native s8 conv gave wrong
    # sums under jit (jax 0.10.2, CPU).
    "nhwc_input_smaller_than_kernel": ((3, 2, 3, 40), (3, 3, 40, 32),
                                       ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
                                       [1, 1], [[1, 1], [1, 1]], [1, 1]),
}


@pytest.mark.parametrize("zp", [7, 0])
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_with_zero_point_and_padding(case, zp, tmp_path):
  xs, ws, (lhs, rhs, out_spec), strides, padding, dil = CONVS[case]
  x, w = _codes(xs), _codes(ws)
  conv = {"op": "conv", "in": ["input"], "out": "c", "layer": "conv", "zp": zp, "w": "c.w",
          "strides": strides, "padding": padding, "rhs_dilation": dil, "lhs_spec": list(lhs),
          "rhs_spec": list(rhs), "out_spec": list(out_spec)}
  dn = lax.ConvDimensionNumbers(lhs, rhs, out_spec)
  ref = lax.conv_general_dilated(  # float32 is exact here: |sums| < 2^24
      jnp.asarray(x, jnp.float32) - zp, jnp.asarray(w, jnp.float32), strides,
      [tuple(p) for p in padding], rhs_dilation=dil, dimension_numbers=dn)
  req, arrays = _to_int32("c", "out", len(xs))
  prog = _program(xs[1:], [conv, req], {"c.w": w, **arrays}, "out", zp=zp)
  got = _both(prog, x, tmp_path)
  np.testing.assert_array_equal(got, np.asarray(ref).astype(np.int64))


def test_dot_over_two_axes_with_zero_point(tmp_path):
  x, w = _codes((4, 3, 5, 6)), _codes((5, 6, 2, 7))  # DenseGeneral-like: 2 in, 2 out axes
  dot = {"op": "dot", "in": ["input"], "out": "d", "layer": "fc", "zp": -9, "w": "d.w",
         "contract_lhs": [2, 3], "contract_rhs": [0, 1]}
  req, arrays = _to_int32("d", "out", 4)
  got = _both(_program((3, 5, 6), [dot, req], {"d.w": w, **arrays}, "out"), x, tmp_path)
  ref = np.einsum("abkl,klmn->abmn", x.astype(np.int64) + 9, w.astype(np.int64))
  np.testing.assert_array_equal(got, ref)


def test_requant_saturation_and_negative_ties(tmp_path):
  # Every int8 code through x − zp, then per-channel multipliers: 1/2 and 1/4 (ties, both
  # signs), 1 (a left shift), ~32 (saturates the int8 clamp), 1/4 again with 10 bits of
  # pre-shift, and ~1/3 shifted left into int32 saturation; plus a bias.
  codes = np.repeat(np.arange(-128, 128, dtype=np.int8)[:, None], 6, axis=1)
  m0 = np.array([[2 ** 30, 2 ** 30, 2 ** 30, 2 ** 31 - 1, 2 ** 30, 1431655765]], np.int32)
  left = np.array([[0, 0, 1, 5, 10, 25]], np.int32)
  right = np.array([[0, 1, 0, 0, 11, 26]], np.int32)
  bias = np.array([[-1, 0, 3, 0, 1, 0]], np.int32)
  offset = np.array([[0, 0, 0, 0, -700, 0]], np.int32)  # −0.68 in units of 2^-10
  ident = {"op": "identity", "in": ["input"], "out": "a", "layer": "", "zp": 3, "bias": "a.bias"}
  req = {"op": "requant", "in": ["a"], "out": "q", "layer": "", "m0": "q.m0", "left": "q.l",
         "right": "q.r", "offset": "q.o", "zp": -7, "lo": -128, "hi": 100, "dtype": "int8"}
  arrays = {"a.bias": bias, "q.m0": m0, "q.l": left, "q.r": right, "q.o": offset}
  got = _both(_program((6,), [ident, req], arrays, "q", zp=3), codes, tmp_path)
  acc = codes.astype(np.int64) - 3 + bias
  ref = np.array([[min(max(ref_requantize(int(acc[i, c]), int(m0[0, c]), int(left[0, c]),
                                          int(right[0, c]), int(offset[0, c])), -128 + 7),
                           100 + 7) - 7 for c in range(6)] for i in range(256)])
  np.testing.assert_array_equal(got, ref)
  assert np.sum(got == 100) > 1 and np.sum(got == -128) > 1  # both clamps reached
  assert np.any((acc[:, 0] < 0) & (acc[:, 0] % 2 == 1))  # negative ties of 1/2 exercised


def test_add_sum_transpose_reshape(tmp_path):
  a = _codes((3, 4, 5))
  ops = [
      {"op": "transpose", "in": ["input"], "out": "t", "layer": "", "perm": [0, 2, 1]},
      {"op": "reshape", "in": ["t"], "out": "r", "layer": "", "shape": [4, 5]},
      {"op": "add", "in": ["input", "r"], "out": "s", "layer": "res", "zp_a": 4, "zp_b": -2,
       "sign_a": 1, "sign_b": -1, "m0_a": 1518500250, "e_a": 0, "m0_b": 2 ** 30, "e_b": -1,
       "left_shift": 20},
      {"op": "sum", "in": ["input"], "out": "p", "layer": "pool", "zp": 4, "axes": [1]},
  ]
  req, arrays = _to_int32("s", "out", 3)
  prog = _program((4, 5), ops + [req], arrays, "out")
  got = _both(prog, a, tmp_path)
  b = np.transpose(a, (0, 2, 1)).reshape(3, 4, 5).astype(np.int64)
  ref = np.vectorize(lambda u, v: ref_mbqm(u * 2 ** 20, 1518500250, 0)
                     + ref_mbqm(-v * 2 ** 20, 2 ** 30, -1))(a.astype(np.int64) - 4, b + 2)
  np.testing.assert_array_equal(got, ref)
  req, arrays = _to_int32("p", "out", 2)
  got = _both(_program((4, 5), ops + [req], arrays, "out"), a, tmp_path)
  np.testing.assert_array_equal(got, np.sum(a.astype(np.int64) - 4, axis=1))


@pytest.mark.parametrize("groups,reduce", [(2, [1, 2, 4]), (1, [4])])
def test_norm_matches_float_normalization(groups, reduce, tmp_path):
  x = _codes((3, 4, 5, 6))
  x[0, :, :, :3] = 9  # a constant group: σ = 0 and only ε keeps it finite
  eps_real, scale = 1e-3, 0.05
  eps = int(round(eps_real / scale ** 2 * 2 ** (2 * norm_op.NORM_SIGMA_BITS)))
  norm = {"op": "norm", "in": ["input"], "out": "n", "layer": "gn", "zp": -3, "groups": groups,
          "reduce": reduce, "eps": eps, "sigma_bits": norm_op.NORM_SIGMA_BITS,
          "mean_bits": norm_op.NORM_MEAN_BITS, "pre_shift": norm_op.NORM_PRE_SHIFT}
  req, arrays = _to_int32("n", "out", 4)
  got = _both(_program((4, 5, 6), [norm, req], arrays, "out", zp=-3), x, tmp_path)
  v = (x.astype(np.float64) + 3).reshape(3, 4, 5, groups, 6 // groups)
  mean = v.mean(axis=tuple(reduce), keepdims=True)
  var = v.var(axis=tuple(reduce), keepdims=True)
  want = ((v - mean) / np.sqrt(var + eps_real / scale ** 2)).reshape(x.shape)
  err = np.abs(got / 2.0 ** norm_op.NORM_OUT_BITS - want)
  assert err.max() < 0.02, err.max()  # 13 fractional bits, σ to 7 bits: ~1% at worst


def test_validate_names_the_bad_op():
  op = {"op": "dot", "in": ["nope"], "out": "d", "layer": "fc", "zp": 0, "w": "d.w",
        "contract_lhs": [1], "contract_rhs": [0]}
  graph = g.Graph(input={"shape": [3]}, output={"tensor": "d"}, ops=(op,),
                  arrays={"d.w": np.zeros((3, 2), np.int8)})
  with pytest.raises(ValueError, match=r"op 0 \('dot'.*layer='fc'.*'nope'"):
    g.validate(graph)
