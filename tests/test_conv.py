"""Quantized conv_general_dilated: results against a numpy convolution of the numpy-
dequantized operands (NHWC/HWIO and NCHW/OIHW, strides, padding, feature groups, zero
points), int path == fake path exactly (power-of-two scales), int8 conv in the jaxpr,
gradients through the custom VJP, jit / bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from tests.np_reference import np_quant_keep as np_quant

QS = jq.QuantSpec
DS = jq.DotSpec


def rng_x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_conv_nhwc(x, w, strides, padding, groups=1):
  """Direct 2-D convolution in float64: x [N,H,W,C], w [KH,KW,C/groups,O],
  padding ((top, bottom), (left, right)) of zeros."""
  x = np.pad(x.astype(np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
  w = w.astype(np.float64)
  n, h, wd, c = x.shape
  kh, kw, cg, o = w.shape
  sh, sw = strides
  oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
  og = o // groups
  out = np.zeros((n, oh, ow, o))
  for g in range(groups):
    xs, ws = x[..., g * cg:(g + 1) * cg], w[..., g * og:(g + 1) * og]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
        out[..., g * og:(g + 1) * og] += np.einsum("nhwc,co->nhwo", patch, ws[i, j])
  return out


def same_padding(size, k, s):
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return (total // 2, total - total // 2)


def iter_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(sub, "eqns"):
          yield from iter_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from iter_eqns(sub.jaxpr)


def int8_convs(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == "conv_general_dilated"
          and all(v.aval.dtype == jnp.int8 for v in e.invars)
          and e.outvars[0].aval.dtype == jnp.int32]


def jconv(spec, strides, padding, **kw):
  return jax.jit(lambda a, b: jq.conv_general_dilated(a, b, strides, padding, spec=spec, **kw))


def assert_close_to(out, ref, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol,
                             atol=rtol * np.max(np.abs(ref)))


# ------------------------------------------------------------------ vs numpy

CASES = {
    # name: (lhs NHWC, rhs HWIO, strides, padding, groups, spec)
    "same_sym": ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), "SAME", 1, DS(lhs=QS(), rhs=QS())),
    "stride_asym": ((3, 9, 7, 4), (3, 2, 4, 5), (2, 2), ((1, 0), (2, 1)), 1,
                    DS(lhs=QS(symmetric=False), rhs=QS(bits=4, symmetric=False))),
    "groups_asym_tensor": ((2, 6, 6, 4), (3, 3, 2, 6), (1, 2), ((1, 1), (1, 1)), 2,
                           DS(lhs=QS(symmetric=False, granularity="tensor"), rhs=QS())),
    "depthwise_fake": ((2, 6, 6, 4), (3, 3, 1, 4), (1, 1), "VALID", 4,
                       DS(lhs=QS(bits=6, symmetric=False), rhs=QS(bits=4), mode="fake")),
}


def _matches_numpy_cases():
  """case × layout; the default run keeps every case once, the layouts alternating (two
  cases each in NHWC and NCHW); the other layout of each case is slow."""
  for i, case in enumerate(CASES):
    for j, layout in enumerate(("NHWC", "NCHW")):
      yield pytest.param(case, layout, id=f"{case}-{layout}",
                         marks=() if i % 2 == j else pytest.mark.slow)


@pytest.mark.parametrize("case,layout", list(_matches_numpy_cases()))
def test_conv_matches_numpy(case, layout):
  ls, rs, strides, padding, groups, spec = CASES[case]
  x, w = rng_x(ls, 1), rng_x(rs, 2)
  # Quantize in NHWC/HWIO terms: lhs keeps the batch axis, rhs the output features.
  ref = np_conv_nhwc(np_quant(x, spec.lhs, 0), np_quant(w, spec.rhs, 3), strides,
                     [same_padding(ls[1], rs[0], strides[0]),
                      same_padding(ls[2], rs[1], strides[1])] if padding == "SAME" else
                     ([(0, 0)] * 2 if padding == "VALID" else padding), groups)
  if layout == "NHWC":
    dn = ("NHWC", "HWIO", "NHWC")
    xa, wa = x, w
  else:
    dn = ("NCHW", "OIHW", "NCHW")
    xa, wa = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    ref = ref.transpose(0, 3, 1, 2)
  out = jconv(spec, strides, padding, dimension_numbers=dn, feature_group_count=groups)(xa, wa)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert_close_to(out, ref)


def test_conv_dilation_with_zero_points_matches_float_conv_of_dequantized():
  """lhs/rhs dilation insert zeros that must count as 0.0, not as the zero point."""
  x, w = rng_x((2, 7, 7, 3), 3), rng_x((3, 3, 3, 4), 4)
  spec = DS(lhs=QS(symmetric=False), rhs=QS(symmetric=False))
  kw = dict(lhs_dilation=(2, 1), rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out = jconv(spec, (1, 1), ((2, 1), (0, 2)), **kw)(x, w)
  ref = lax.conv_general_dilated(np_quant(x, spec.lhs, 0), np_quant(w, spec.rhs, 3), (1, 1),
                                 ((2, 1), (0, 2)), precision=lax.Precision.HIGHEST, **kw)
  assert_close_to(out, np.asarray(ref, np.float64))


def test_conv_gradients_identity_ste():
  """Gradients go through the custom VJP (no silent zero gradient): they are the float
  conv's gradients at the dequantized operands."""
  x, w = rng_x((2, 6, 6, 3), 5), rng_x((3, 3, 3, 4), 6)
  g = rng_x((2, 3, 3, 4), 7)
  spec = DS(lhs=QS(symmetric=False), rhs=QS(bits=4))
  dn = ("NHWC", "HWIO", "NHWC")
  f = lambda a, b: jq.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=dn,
                                           spec=spec)
  dx, dw = jax.jit(lambda a, b: jax.vjp(f, a, b)[1](g))(x, w)
  ref_f = lambda a, b: lax.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=dn,
                                                precision=lax.Precision.HIGHEST)
  _, ref_vjp = jax.vjp(ref_f, np_quant(x, spec.lhs, 0), np_quant(w, spec.rhs, 3))
  ref_dx, ref_dw = ref_vjp(g)
  assert_close_to(dx, np.asarray(ref_dx, np.float64))
  assert_close_to(dw, np.asarray(ref_dw, np.float64))
  assert np.abs(np.asarray(dw)).min() > 0


def test_conv_quantized_backward_close_to_float():
  x, w = rng_x((2, 8, 8, 4), 8), rng_x((3, 3, 4, 8), 9)
  g = rng_x((2, 8, 8, 8), 10)
  dn = ("NHWC", "HWIO", "NHWC")
  run = lambda spec: jax.jit(lambda a, b: jax.vjp(
      lambda a, b: jq.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dn,
                                           spec=spec, key=jax.random.key(0)), a, b)[1](g))(x, w)
  exact = run(DS(lhs=QS(), rhs=QS()))
  quant = run(DS(lhs=QS(), rhs=QS(), grad=QS(rounding="stochastic")))
  for d, ref in zip(quant, exact):
    err = np.linalg.norm(np.asarray(d) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert 1e-5 < err < 2e-2


# ------------------------------------------------------------------ int == fake, jaxpr

def pow2_conv_operand(shape, keep_axis, symmetric, seed):
  """Per-`keep_axis` absmax calibration gives scale 2^k exactly (see the dot tests)."""
  rng = np.random.default_rng(seed)
  x = np.moveaxis(rng.uniform(-0.9, 0.9, shape).astype(np.float32), keep_axis, 0).copy()
  k = rng.integers(-5, 2, (x.shape[0],) + (1,) * (x.ndim - 1)).astype(np.float32)
  flat = x.reshape(x.shape[0], -1)
  if symmetric:
    flat[:] = flat * 127
    flat[:, 0] = 127
  else:
    flat[:] = flat * 100 + 27
    flat[:, 0], flat[:, 1] = -100, 155
  x = flat.reshape(x.shape) * 2.0 ** k
  return np.moveaxis(x, 0, keep_axis).astype(np.float32)


@pytest.mark.parametrize("symmetric,grad", [(True, None), (False, QS())])
def test_conv_int_path_equals_fake_path_exactly(symmetric, grad):
  # NCHW / OIHW with stride, padding and feature groups.
  x = pow2_conv_operand((2, 4, 7, 7), 0, symmetric, 11)
  w = pow2_conv_operand((6, 2, 3, 3), 0, symmetric, 12)
  g = rng_x((2, 6, 4, 4), 13)
  results = {}
  for mode in ("int", "fake"):
    spec = DS(lhs=QS(symmetric=symmetric), rhs=QS(symmetric=symmetric), grad=grad, mode=mode)
    f = lambda a, b, spec=spec: jq.conv_general_dilated(
        a, b, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=2, spec=spec)
    def run(a, b, f=f):
      out, vjp = jax.vjp(f, a, b)
      return (out,) + vjp(g)
    results[mode] = jax.jit(run)(x, w)
  for a, b in zip(results["int"], results["fake"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.isfinite(np.asarray(results["int"][1])))


@pytest.mark.parametrize("symmetric", [True, False])
def test_conv_jaxpr_has_int8_conv(symmetric):
  x, w = jnp.asarray(rng_x((2, 6, 6, 3))), jnp.asarray(rng_x((3, 3, 3, 4)))
  dn = ("NHWC", "HWIO", "NHWC")
  f = lambda spec: (lambda a, b: jq.conv_general_dilated(a, b, (1, 1), "SAME",
                                                         dimension_numbers=dn, spec=spec))
  spec = DS(lhs=QS(symmetric=symmetric), rhs=QS(symmetric=symmetric))
  convs = int8_convs(f(spec), x, w)
  assert len(convs) >= 1
  if symmetric:
    assert len(convs) == 1
  assert not int8_convs(f(DS(lhs=spec.lhs, rhs=spec.rhs, mode="fake")), x, w)
  # The gradient jaxpr still holds the int8 forward conv.
  assert int8_convs(jax.grad(lambda a, b: jnp.sum(f(spec)(a, b)), argnums=(0, 1)), x, w)


# ------------------------------------------------------------------ API, dtypes

def test_conv_bad_calls_raise():
  x, w = rng_x((2, 6, 6, 4)), rng_x((3, 3, 4, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  trace = lambda spec, **kw: jax.eval_shape(
      lambda a, b: jq.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dn,
                                           spec=spec, **kw), x, w)
  with pytest.raises(ValueError, match="group"):
    trace(DS(lhs=QS(granularity="group", group_size=2), rhs=QS()))
  with pytest.raises(ValueError, match="batch_group_count"):
    jax.eval_shape(lambda a, b: jq.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        batch_group_count=2, spec=DS(lhs=QS(), rhs=QS())), x, rng_x((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="spec"):
    trace(QS())  # a QuantSpec where a DotSpec belongs
  with pytest.raises(ValueError, match="key"):
    trace(DS(lhs=QS(rounding="stochastic"), rhs=QS()))


@pytest.mark.parametrize("dtype,use_jit", [
    pytest.param(jnp.float32, False, id="f32-eager"),  # the eager path, float32 rtol
    pytest.param(jnp.bfloat16, False, id="bf16-eager", marks=pytest.mark.slow),
    pytest.param(jnp.float32, True, id="f32-jit", marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, True, id="bf16-jit")])  # jit, gradients, dtype kept
def test_conv_jit_and_dtypes(use_jit, dtype):
  x = jnp.asarray(rng_x((2, 5, 5, 3), 14)).astype(dtype)
  w = jnp.asarray(rng_x((3, 3, 3, 4), 15)).astype(dtype)
  spec = DS(lhs=QS(), rhs=QS())
  conv = jq.make_conv(spec)  # flax's nn.Conv calling convention
  f = lambda a, b: conv(a, b, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"), 1)
  if use_jit:
    f = jax.jit(f)
  out = f(x, w)
  assert out.dtype == dtype and out.shape == (2, 5, 5, 4)
  x32, w32 = (np.asarray(v.astype(jnp.float32)) for v in (x, w))
  ref = np_conv_nhwc(np_quant(x32, spec.lhs, 0), np_quant(w32, spec.rhs, 3), (1, 1),
                     [(1, 1), (1, 1)])
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert_close_to(out.astype(jnp.float32), ref, rtol=rtol)
  if not use_jit:
    return  # eager gradients: see test_dot_general_jit_grad_dtypes
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32)), argnums=(0, 1)))
  dx, dw = grad(x, w)
  assert dx.dtype == dtype and dw.dtype == dtype
  assert np.all(np.isfinite(np.asarray(dw.astype(jnp.float32))))


def test_nan_input_is_not_hidden_by_int_conv():
  """NaN rule: integer codes have no NaN, so the int conv must put it back."""
  x, w = rng_x((1, 4, 4, 2), 16), rng_x((1, 1, 2, 3), 17)
  x[0, 1, 2, 0] = np.nan
  dn = ("NHWC", "HWIO", "NHWC")
  fake = np.asarray(jconv(DS(lhs=QS(), rhs=QS(), mode="fake"), (1, 1), "VALID",
                          dimension_numbers=dn)(x, w))
  assert np.all(np.isnan(fake[0, 1, 2])) and np.sum(np.isnan(fake)) == 3
  out = np.asarray(jconv(DS(lhs=QS(), rhs=QS()), (1, 1), "VALID", dimension_numbers=dn)(x, w))
  assert np.all(np.isnan(out[0, 1, 2]))


# ------------------------------------------------------------------ integer backward convs

def _convs(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_conv_grad_spec_runs_all_three_convs_as_s8(symmetric):
  """With grad= set, forward, d input and d kernel are s8×s8→s32 convs; no float conv."""
  x, w = jnp.asarray(rng_x((2, 7, 7, 4))), jnp.asarray(rng_x((3, 3, 2, 6)))
  spec = DS(lhs=QS(symmetric=symmetric), rhs=QS(symmetric=symmetric), grad=QS())
  f = lambda a, b: jnp.sum(jq.conv_general_dilated(
      a, b, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2, spec=spec) ** 2)
  both = jax.grad(f, argnums=(0, 1))
  convs = _convs(both, x, w)
  s8 = int8_convs(both, x, w)
  assert len(s8) == len(convs)  # every conv, zero-point terms included
  # fwd, d input, d kernel; asymmetric: + 3 forward zero-point convs and z_b·1, z_a·1
  assert len(s8) == (3 if symmetric else 8)
  shapes = sorted(tuple(e.outvars[0].aval.shape) for e in s8)
  assert (2, 7, 7, 4) in shapes and (3, 3, 2, 6) in shapes  # d input and d kernel
  # Without grad= the backward convs stay float.
  plain = jax.grad(lambda a, b: jnp.sum(jq.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2, spec=DS(lhs=QS(), rhs=QS()))), argnums=(0, 1))
  assert len(int8_convs(plain, x, w)) == 1 and len(_convs(plain, x, w)) >= 3


@pytest.mark.parametrize("grad_granularity", ["channel", "tensor"])
def test_conv_int_backward_equals_fake_backward_exactly(grad_granularity):
  """Power-of-two scales: int codes and float codes give identical outputs and grads,
  NHWC with stride and kernel dilation, per-example / per-tensor gradient scales."""
  x = pow2_conv_operand((3, 9, 8, 4), 0, True, 21)
  w = pow2_conv_operand((3, 3, 4, 5), 3, True, 22)
  g = rng_x((3, 4, 5, 5), 23) * 2.0 ** np.arange(5)
  results = {}
  for mode in ("int", "fake"):
    spec = DS(lhs=QS(), rhs=QS(), grad=QS(granularity=grad_granularity), mode=mode)
    f = lambda a, b, spec=spec: jq.conv_general_dilated(
        a, b, (2, 2), ((1, 1), (1, 2)), rhs_dilation=(2, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), spec=spec)
    def run(a, b, f=f):
      out, vjp = jax.vjp(f, a, b)
      return (out,) + vjp(jnp.asarray(g, jnp.float32))
    results[mode] = jax.jit(run)(x, w)
  for a, b in zip(results["int"], results["fake"]):
    assert np.any(np.asarray(a) != 0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And both are close to the float conv's gradients at the dequantized operands.
  deq = lambda v, axis: np_quant(v, QS(), axis)
  _, vjp = jax.vjp(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (2, 2), ((1, 1), (1, 2)), rhs_dilation=(2, 1),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"),
      jnp.asarray(deq(x, 0)), jnp.asarray(deq(w, 3)))
  for d, ref in zip(results["int"][1:], vjp(jnp.asarray(g, jnp.float32))):
    err = np.linalg.norm(np.asarray(d) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert err < 2e-2
