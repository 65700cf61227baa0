"""Quantized dot_general / einsum: results against numpy references of the dequantized
float contraction, int path == fake path exactly (power-of-two scales), the jaxpr really
runs s8×s8→s32 dots (forward and both backward dots), gradients, jit / vmap / bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.np_reference import np_quant

QS = jq.QuantSpec
DS = jq.DotSpec


def rng_x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ numpy references

def np_dot_general(a, b, dims):
  """lax.dot_general semantics through np.einsum, in float64."""
  (lc, rc), (lb, rb) = dims
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  la, ra = [None] * a.ndim, [None] * b.ndim
  for i, j in list(zip(lb, rb)) + list(zip(lc, rc)):
    la[i] = ra[j] = next(letters)
  la = [c or next(letters) for c in la]
  ra = [c or next(letters) for c in ra]
  out = ([la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in lb + lc]
         + [ra[j] for j in range(b.ndim) if j not in rb + rc])
  sub = f"{''.join(la)},{''.join(ra)}->{''.join(out)}"
  return np.einsum(sub, a.astype(np.float64), b.astype(np.float64))


# Every library call below runs under jax.jit (one XLA compilation per case, much cheaper
# than op-by-op dispatch); test_dot_general_jit_grad_dtypes also runs it eagerly.
def jdot(spec, dims, **kw):
  return jax.jit(lambda a, b: jq.dot_general(a, b, dims, spec, **kw))


def jeinsum(subscripts, spec, **kw):
  return jax.jit(lambda a, b: jq.einsum(subscripts, a, b, spec, **kw))


def jvjp(fn):
  """jit of (out, d lhs, d rhs) of fn(lhs, rhs) for a cotangent g."""
  def run(a, b, g):
    out, vjp = jax.vjp(fn, a, b)
    return (out,) + vjp(g)
  return jax.jit(run)


def assert_close_to(out, ref, rtol=1e-5):
  out = np.asarray(out, np.float64)
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.max(np.abs(ref)))


def iter_eqns(jaxpr):
  """All equations of a jaxpr, recursing into sub-jaxprs (custom_vjp, pjit, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        yield from iter_eqns(sub)


def _sub_jaxprs(v):
  if hasattr(v, "eqns"):  # Jaxpr
    yield v
  elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # ClosedJaxpr
    yield v.jaxpr
  elif isinstance(v, (list, tuple)):
    for x in v:
      yield from _sub_jaxprs(x)


def int8_dots(fn, *args, prim="dot_general"):
  """Equations of `prim` whose operands are int8 and whose result is int32."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == prim
          and all(v.aval.dtype == jnp.int8 for v in e.invars)
          and e.outvars[0].aval.dtype == jnp.int32]


def float_dots(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == "dot_general"
          and e.outvars[0].aval.dtype == jnp.float32]


# ------------------------------------------------------------------ vs numpy

DIMS_CASES = {
    # name: (lhs shape, rhs shape, dimension_numbers)
    "dense": ((8, 32), (32, 16), (((1,), (0,)), ((), ()))),
    "rhs_transposed": ((8, 32), (16, 32), (((1,), (1,)), ((), ()))),
    "lhs_transposed": ((32, 8), (32, 16), (((0,), (0,)), ((), ()))),
    "batch": ((3, 8, 32), (3, 32, 16), (((2,), (1,)), ((0,), (0,)))),
    "batch_not_leading": ((8, 3, 32), (32, 16, 3), (((2,), (0,)), ((1,), (2,)))),
    "two_contracting": ((4, 8, 6), (6, 4, 5), (((0, 2), (1, 0)), ((), ()))),
    "batch_and_two_contracting": ((2, 4, 3, 6), (2, 6, 5, 4), (((1, 3), (3, 1)), ((0,), (0,)))),
}
SPEC_CASES = {
    "int8_sym": DS(lhs=QS(), rhs=QS()),
    "asym_lhs_int4_rhs": DS(lhs=QS(symmetric=False), rhs=QS(bits=4)),
    "asym_both_fake": DS(lhs=QS(bits=6, symmetric=False), rhs=QS(bits=5, symmetric=False),
                         mode="fake"),
    "tensor_lhs": DS(lhs=QS(granularity="tensor", symmetric=False), rhs=QS()),
    "binary_rhs": DS(lhs=QS(), rhs=QS(format="binary")),
}


@pytest.mark.parametrize("dims_name,spec_name", [
    ("dense", "int8_sym"), ("dense", "asym_lhs_int4_rhs"),
    ("rhs_transposed", "tensor_lhs"), ("lhs_transposed", "asym_lhs_int4_rhs"),
    ("batch", "asym_both_fake"), ("batch", "asym_lhs_int4_rhs"),
    ("batch_not_leading", "binary_rhs"), ("two_contracting", "asym_lhs_int4_rhs"),
    ("batch_and_two_contracting", "int8_sym")])
def test_dot_general_matches_numpy(dims_name, spec_name):
  ls, rs, dims = DIMS_CASES[dims_name]
  spec = SPEC_CASES[spec_name]
  lhs, rhs = rng_x(ls, 1), rng_x(rs, 2)
  out = jdot(spec, dims)(lhs, rhs)
  (lc, rc), _ = dims
  ref = np_dot_general(np_quant(lhs, spec.lhs, lc), np_quant(rhs, spec.rhs, rc), dims)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert_close_to(out, ref)
  # And quantization did something: the float dot is measurably different.
  assert not np.allclose(np.asarray(out), np_dot_general(lhs, rhs, dims), rtol=1e-4)


@pytest.mark.parametrize("lhs_spec,rhs_spec", [
    (QS(granularity="group", group_size=8), QS(granularity="group", group_size=8)),
    (QS(granularity="group", group_size=8, symmetric=False),
     QS(granularity="group", group_size=8, symmetric=False, bits=4)),
    (QS(granularity="group", group_size=4, symmetric=False), QS()),  # rhs per channel
    (QS(), QS(granularity="group", group_size=16, bits=4)),
])
def test_group_granularity_matches_numpy(lhs_spec, rhs_spec):
  lhs, rhs = rng_x((2, 8, 32), 3), rng_x((2, 32, 12), 4)
  dims = (((2,), (1,)), ((0,), (0,)))
  both = jax.jit(lambda a, b: [jq.dot_general(a, b, dims, DS(lhs=lhs_spec, rhs=rhs_spec,
                                                               mode=mode))
                               for mode in ("int", "fake")])
  ref = np_dot_general(np_quant(lhs, lhs_spec, (2,)), np_quant(rhs, rhs_spec, (1,)), dims)
  for out in both(lhs, rhs):
    assert_close_to(out, ref)


def test_group_sizes_must_agree():
  spec = DS(lhs=QS(granularity="group", group_size=8), rhs=QS(granularity="group", group_size=4))
  with pytest.raises(ValueError, match="group"):
    jax.eval_shape(lambda a, b: jq.dot_general(a, b, (((1,), (0,)), ((), ())), spec),
                   rng_x((4, 32)), rng_x((32, 4)))


@pytest.mark.parametrize("subscripts,ls,rs", [
    ("bij,bjk->bik", (3, 4, 16), (3, 16, 5)),
    ("ij,kj->ki", (4, 16), (5, 16)),  # transposed rhs and output
    ("bhqd,bhkd->bhqk", (2, 3, 4, 8), (2, 3, 5, 8)),  # attention scores
    ("...ij,jk->...ik", (2, 3, 4, 16), (16, 5)),  # ellipsis
    ("...ij,...jk->...ik", (3, 3, 4, 16), (3, 16, 5)),  # ellipsis broadcast from the right
    ("bij,jk->kib", (3, 4, 16), (16, 5)),  # permuted output
])
def test_einsum_matches_numpy(subscripts, ls, rs):
  lhs, rhs = rng_x(ls, 5), rng_x(rs, 6)
  ins, _ = subscripts.split("->")
  l_sub, r_sub = ins.replace("...", "").split(",")
  contracted = [c for c in l_sub if c in r_sub and c not in subscripts.split("->")[1]]
  l_axes = tuple(l_sub.index(c) - len(l_sub) for c in contracted)  # from the right
  r_axes = tuple(r_sub.index(c) - len(r_sub) for c in contracted)
  spec = DS(lhs=QS(symmetric=False), rhs=QS(bits=4))
  out = jeinsum(subscripts, spec)(lhs, rhs)
  ref = np.einsum(subscripts, np_quant(lhs, spec.lhs, l_axes).astype(np.float64),
                  np_quant(rhs, spec.rhs, r_axes).astype(np.float64))
  assert out.shape == ref.shape
  assert_close_to(out, ref)


def test_einsum_rejects_implicit_output():
  with pytest.raises(ValueError, match="subscripts"):
    jq.einsum("ij,jk", rng_x((2, 3)), rng_x((3, 4)), DS(lhs=QS(), rhs=QS()))


def test_one_sided_specs_and_gradients_vs_numpy():
  """Weight-only quantization, identity STE: gradients are the float dot's gradients
  taken at the dequantized operands: dlhs = g·Q(w)ᵀ, dw = xᵀ·g."""
  x, w, g = rng_x((8, 32), 7), rng_x((32, 16), 8), rng_x((8, 16), 9)
  dims = (((1,), (0,)), ((), ()))
  spec = DS(rhs=QS(bits=4))
  out, dx, dw = jvjp(lambda a, b: jq.dot_general(a, b, dims, spec))(x, w, g)
  wq = np_quant(w, spec.rhs, (0,))
  assert_close_to(out, x.astype(np.float64) @ wq)
  assert_close_to(dx, g.astype(np.float64) @ wq.T)
  assert_close_to(dw, x.T.astype(np.float64) @ g)
  # plain float when no operand is quantized
  np.testing.assert_allclose(np.asarray(jdot(DS(), dims)(x, w)), x @ w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jdot(None, dims)(x, w)), x @ w, rtol=1e-5)


def test_clipped_ste_through_dot_masks_lhs_gradient():
  x, w, g = rng_x((8, 64), 10) ** 3, rng_x((64, 16), 11), rng_x((8, 16), 12)
  spec = DS(lhs=QS(calibration="percentile", percentile=90.0, ste="clipped"), rhs=QS())
  dx = jax.jit(jax.grad(lambda a: jnp.sum(jq.einsum("mk,kn->mn", a, w, spec) * g)))(x)
  inside = np.abs(x) <= np.percentile(np.abs(x), 90.0, axis=1, keepdims=True)
  ref = (g.astype(np.float64) @ np_quant(w, spec.rhs, (0,)).T) * inside
  assert 0.05 < 1 - inside.mean() < 0.2
  np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  assert np.all(np.asarray(dx)[~inside] == 0)


@pytest.mark.parametrize("case", ["sym", "asym", "asym_group"])
def test_quantized_backward_is_close_to_exact_backward(case):
  """With `grad` set both backward dots run on integer codes (zero-point terms and groups
  included): still the exact gradient at the dequantized operands, up to 8-bit error of g."""
  x, w, g = rng_x((16, 64), 13), rng_x((64, 32), 14), rng_x((16, 32), 15)
  if case == "sym":
    lspec = rspec = QS()
  else:  # offsets give large zero points
    x, w = x + 1.5, w - 1.0
    gs = 16 if case == "asym_group" else None
    gran = "group" if gs else "channel"
    lspec = QS(symmetric=False, granularity=gran, group_size=gs)
    rspec = QS(symmetric=False, granularity=gran, group_size=gs, bits=6)
  spec = DS(lhs=lspec, rhs=rspec, grad=QS(bits=8))
  dims = (((1,), (0,)), ((), ()))
  _, dx, dw = jvjp(lambda a, b: jq.dot_general(a, b, dims, spec))(x, w, g)
  xq, wq = np_quant(x, spec.lhs, (1,)), np_quant(w, spec.rhs, (0,))
  ref_dx, ref_dw = g.astype(np.float64) @ wq.T, xq.T.astype(np.float64) @ g
  for d, ref in ((dx, ref_dx), (dw, ref_dw)):
    err = np.linalg.norm(np.asarray(d) - ref) / np.linalg.norm(ref)
    assert 1e-5 < err < 2e-2  # really quantized, and 8-bit accurate


def test_bad_calls_raise():
  x, w = rng_x((4, 8)), rng_x((8, 3))
  dims = (((1,), (0,)), ((), ()))
  jq_dot = lambda a, b, dims, spec: jax.eval_shape(  # errors surface while tracing
      lambda a, b: jq.dot_general(a, b, dims, spec), a, b)
  with pytest.raises(ValueError, match="spec"):
    jq.dot_general(x, w, dims, QS())  # a QuantSpec where a DotSpec belongs
  with pytest.raises(ValueError, match="grad"):
    jq_dot(x, w, dims, DS(lhs=QS(), grad=QS()))
  with pytest.raises(ValueError, match="dimension_numbers"):
    jq_dot(x, rng_x((7, 3)), dims, DS(lhs=QS(), rhs=QS()))
  with pytest.raises(ValueError, match="key"):
    jq_dot(x, w, dims, DS(lhs=QS(rounding="stochastic"), rhs=QS()))
  spec = DS(lhs=QS(), rhs=QS(), grad=QS(rounding="stochastic"))
  jq_dot(x, w, dims, spec)  # forward needs no key
  with pytest.raises(ValueError, match="key"):
    jax.eval_shape(jax.grad(lambda a: jnp.sum(jq.dot_general(a, w, dims, spec))), x)


def test_nan_input_is_not_hidden_by_int_dot():
  """NaN rule: integer codes have no NaN, so the int dot must put it back (rows of a NaN
  lhs row, like the fake path)."""
  x, w = rng_x((4, 8)), rng_x((8, 3))
  x[1, 2] = np.nan
  dims = (((1,), (0,)), ((), ()))
  fake = np.asarray(jdot(DS(lhs=QS(), rhs=QS(), mode="fake"), dims)(x, w))
  assert np.all(np.isnan(fake[1])) and not np.any(np.isnan(fake[[0, 2, 3]]))
  out = np.asarray(jdot(DS(lhs=QS(), rhs=QS()), dims)(x, w))
  assert np.all(np.isnan(out[1])) and not np.any(np.isnan(out[[0, 2, 3]]))
  w[5, 2] = np.nan  # and a NaN weight poisons its output column
  out = np.asarray(jdot(DS(lhs=QS(), rhs=QS()), dims)(x, w))
  assert np.all(np.isnan(out[:, 2])) and not np.any(np.isnan(out[[0, 2, 3]][:, :2]))


# ------------------------------------------------------------------ int path == fake path

def pow2_operand(shape, reduce_axis, symmetric, bits, seed):
  """Random values whose per-channel absmax calibration gives power-of-two scales:
  symmetric: max |x| = q_max·2^k; asymmetric: [min, max] = [−100·2^k, 155·2^k] (8-bit),
  so the zero point is a nonzero integer and the scale is exactly 2^k."""
  rng = np.random.default_rng(seed)
  x = np.moveaxis(rng.uniform(-0.9, 0.9, shape).astype(np.float32), reduce_axis, -1).copy()
  k = rng.integers(-6, 2, x.shape[:-1] + (1,)).astype(np.float32)
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    x = x * qmax * 2.0 ** k
    x[..., :1] = qmax * 2.0 ** k
  else:
    assert bits == 8
    x = (x * 100 + 27) * 2.0 ** k  # within [−63, 117]·2^k
    x[..., :1], x[..., 1:2] = -100 * 2.0 ** k, 155 * 2.0 ** k
  return np.moveaxis(x, -1, reduce_axis).astype(np.float32)


EXACT_CASES = {
    "sym": (QS(), QS(), None),
    "sym_grad": (QS(), QS(), QS()),
    "asym": (QS(symmetric=False), QS(symmetric=False), None),
    "asym_grad_stochastic": (QS(symmetric=False), QS(), QS(rounding="stochastic")),
    "asym_rhs_grad_tensor": (QS(), QS(symmetric=False), QS(granularity="tensor")),
}


@pytest.mark.parametrize("case,batched", [
    # sym (slow) is covered by sym_grad (the symmetric forward), asym (no grad spec) and
    # asym_grad_stochastic (unbatched).
    pytest.param("sym", False, marks=pytest.mark.slow), ("sym_grad", True), ("asym", True),
    ("asym_grad_stochastic", False), ("asym_rhs_grad_tensor", True)])
def test_int_path_equals_fake_path_exactly(case, batched):
  lspec, rspec, gspec = EXACT_CASES[case]
  if batched:
    ls, rs, dims, l_red, r_red = (2, 8, 32), (2, 32, 16), (((2,), (1,)), ((0,), (0,))), 2, 1
  else:
    ls, rs, dims, l_red, r_red = (8, 32), (16, 32), (((1,), (1,)), ((), ())), 1, 1
  lhs = pow2_operand(ls, l_red, lspec.symmetric, 8, 16)
  rhs = pow2_operand(rs, r_red, rspec.symmetric, 8, 17)
  g = jnp.asarray(rng_x(ls[:-1] + (16,), 18))
  key = jax.random.key(3)
  results = {}
  for mode in ("int", "fake"):
    spec = DS(lhs=lspec, rhs=rspec, grad=gspec, mode=mode)
    fn = lambda a, b, spec=spec: jq.dot_general(a, b, dims, spec, key=key)
    results[mode] = jvjp(fn)(lhs, rhs, g)
  for a, b in zip(results["int"], results["fake"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # and the forward is the numpy dot of the dequantized operands (exact here)
  ref = np_dot_general(np_quant(lhs, lspec, (l_red,)), np_quant(rhs, rspec, (r_red,)), dims)
  np.testing.assert_array_equal(np.asarray(results["int"][0], np.float64), ref)


def test_int_equals_fake_with_pow2_lsq_steps_and_einsum():
  x, w, g = rng_x((3, 8, 32), 19) * 2, rng_x((32, 16), 20), rng_x((3, 8, 16), 21)
  s_x = jnp.asarray(2.0 ** np.random.default_rng(22).integers(-5, -2, (3, 8, 1)), jnp.float32)
  s_w = jnp.full((1, 16), 2.0 ** -4, jnp.float32)
  lsq = QS(bits=4, ste="lsq")
  outs = {}
  for mode in ("int", "fake"):
    spec = DS(lhs=lsq, rhs=lsq, grad=QS(), mode=mode)
    def loss(x, w, s_x, s_w, spec=spec):
      out = jq.einsum("bmk,kn->bmn", x, w, spec, lhs_state=jq.OperandState(learned=s_x),
                      rhs_state=jq.OperandState(learned=s_w))
      return jnp.sum(out * g), out
    outs[mode] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, w, s_x, s_w)
  for a, b in zip(jax.tree.leaves(outs["int"]), jax.tree.leaves(outs["fake"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (dx, dw, ds_x, ds_w), out = outs["int"]
  assert ds_x.shape == (3, 8, 1) and ds_w.shape == (1, 16)
  assert np.all(np.asarray(ds_w) != 0)
  ref = np.einsum("bmk,kn->bmn", np.clip(np.round(x / s_x), -7, 7) * s_x,
                  np.clip(np.round(w / s_w), -7, 7) * s_w)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ jaxpr: real int8 dots

JAXPR_CASES = {
    "dense": ((8, 32), (32, 16), (((1,), (0,)), ((), ())), DS(lhs=QS(), rhs=QS(), grad=QS())),
    "batched_asym": ((2, 8, 32), (2, 32, 16), (((2,), (1,)), ((0,), (0,))),
                     DS(lhs=QS(symmetric=False), rhs=QS(symmetric=False), grad=QS())),
    "group": ((8, 32), (32, 16), (((1,), (0,)), ((), ())),
              DS(lhs=QS(granularity="group", group_size=8),
                 rhs=QS(granularity="group", group_size=8, bits=4), grad=QS())),
}


@pytest.mark.parametrize("case", list(JAXPR_CASES))
def test_jaxpr_has_int8_dots_forward_and_backward(case):
  ls, rs, dims, spec = JAXPR_CASES[case]
  lhs, rhs = jnp.asarray(rng_x(ls)), jnp.asarray(rng_x(rs))
  fwd = lambda a, b: jq.dot_general(a, b, dims, spec)
  assert len(int8_dots(fwd, lhs, rhs)) == 1
  loss = lambda a, b: jnp.sum(fwd(a, b))
  both = jax.grad(loss, argnums=(0, 1))
  assert len(int8_dots(both, lhs, rhs)) == 3  # forward, d lhs, d rhs
  assert len(int8_dots(jax.grad(loss, argnums=0), lhs, rhs)) >= 2
  # without `grad` the backward dots run in float
  no_grad = DS(lhs=spec.lhs, rhs=spec.rhs)
  loss_f = lambda a, b: jnp.sum(jq.dot_general(a, b, dims, no_grad))
  both_f = jax.grad(loss_f, argnums=(0, 1))
  assert len(int8_dots(both_f, lhs, rhs)) == 1 and len(float_dots(both_f, lhs, rhs)) >= 2
  # fake mode has no int8 dot at all
  fake = DS(lhs=spec.lhs, rhs=spec.rhs, grad=spec.grad, mode="fake")
  assert not int8_dots(jax.grad(lambda a, b: jnp.sum(jq.dot_general(a, b, dims, fake)),
                                argnums=(0, 1)), lhs, rhs)


def test_einsum_jaxpr_has_int8_dot():
  x, w = jnp.asarray(rng_x((2, 4, 16))), jnp.asarray(rng_x((16, 8)))
  f = lambda a, b: jq.einsum("bik,kn->bni", a, b, DS(lhs=QS(), rhs=QS()))
  assert len(int8_dots(f, x, w)) == 1


# ------------------------------------------------------------------ jit / vmap / dtypes

@pytest.mark.parametrize("dtype,use_jit", [
    pytest.param(jnp.float32, False, id="f32-eager"),
    pytest.param(jnp.bfloat16, False, id="bf16-eager", marks=pytest.mark.slow),  # the eager
    pytest.param(jnp.float32, True, id="f32-jit", marks=pytest.mark.slow),  # path and f32
    pytest.param(jnp.bfloat16, True, id="bf16-jit")])  # rtol: f32-eager; jit, grads: bf16-jit
def test_dot_general_jit_grad_dtypes(use_jit, dtype):
  x = jnp.asarray(rng_x((8, 32), 23)).astype(dtype)
  w = jnp.asarray(rng_x((32, 16), 24)).astype(dtype)
  spec = DS(lhs=QS(symmetric=False), rhs=QS(), grad=QS())
  f = lambda a, b: jq.dot_general(a, b, (((1,), (0,)), ((), ())), spec)
  if use_jit:
    f = jax.jit(f)
  out = f(x, w)
  assert out.dtype == dtype and out.shape == (8, 16)
  x32, w32 = np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
  ref = np_quant(x32, spec.lhs, (1,)).astype(np.float64) @ np_quant(w32, spec.rhs, (0,))
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=rtol,
                             atol=rtol * np.abs(ref).max())
  if not use_jit:
    return  # eager gradients: test_fake_quant (op-by-op compilation of the VJP is slow)
  vg = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32)),
                                  argnums=(0, 1)))
  _, (dx, dw) = vg(x, w)
  assert dx.dtype == dtype and dw.dtype == dtype
  assert np.all(np.isfinite(np.asarray(dx.astype(jnp.float32))))
  assert jax.eval_shape(lambda a, b: jq.dot_general(  # traced only: the dtype rule
      a, b, (((1,), (0,)), ((), ())), spec, preferred_element_type=jnp.float32),
                        x, w).dtype == jnp.float32


def test_dot_general_vmap_matches_loop():
  xs, w = rng_x((4, 8, 32), 25), rng_x((32, 16), 26)
  spec = DS(lhs=QS(symmetric=False), rhs=QS(bits=4), grad=QS())
  f = lambda a: jq.dot_general(a, w, (((1,), (0,)), ((), ())), spec)
  f_and_grad = lambda a: (f(a), jax.grad(lambda a: jnp.sum(f(a)))(a))
  out, dxs = jax.jit(jax.vmap(f_and_grad))(xs)
  single = jax.jit(f_and_grad)
  for i in range(4):
    o, d = single(xs[i])
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(o), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dxs[i]), np.asarray(d), rtol=1e-6, atol=1e-6)


def test_make_dot_general_signature():
  x, w = rng_x((4, 16), 27), rng_x((16, 8), 28)
  spec = DS(lhs=QS(), rhs=QS(bits=4))
  dg = jq.make_dot_general(spec)
  dims = (((1,), (0,)), ((), ()))
  out = jax.jit(lambda a, b: dg(a, b, dims, None, None))(x, w)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jdot(spec, dims)(x, w)))
  assert_close_to(out, np_quant(x, spec.lhs, (1,)).astype(np.float64)
                  @ np_quant(w, spec.rhs, (0,)))


def test_quantized_backward_equals_the_numpy_formula_exactly():
  """Both backward contractions of DotSpec.grad against numpy, exactly:
      dlhs = Q(g·s_b)·q_bᵀ   (gradient rows quantized per row after folding s_b in)
      drhs = q_aᵀ·Q(s_a·g)   (gradient columns quantized per column after folding s_a in)
  with identity STEs. Every scale is a power of two (absmax = 127·2^k), so XLA and numpy
  compute the same codes and the integer sums are exact in float32: any change to the
  formula (a scale off by 1%, a wrong fold or transpose) fails."""
  rng = np.random.default_rng(7)
  M, K, N = 6, 12, 5
  def ints(shape):
    v = rng.integers(-127, 128, shape).astype(np.float32)
    v[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = 127.0  # row absmax 127
    return v
  qa = ints((M, K))                              # activation codes, one scale per row
  qb = ints((N, K)).T.copy()                     # weight codes, one scale per column
  g_int = ints((M, N))
  g_int[rng.integers(0, M, N), np.arange(N)] = -127.0  # every column's absmax 127 too
  s_a, s_b, s_g = 2.0 ** -2, 2.0 ** -3, 2.0 ** -5
  x, w, g = qa * s_a, qb * s_b, g_int * s_g
  spec = DS(lhs=QS(bits=8), rhs=QS(bits=8), grad=QS(bits=8), mode="int")
  f = lambda x, w: jnp.sum(jq.dot_general(x, w, (((1,), (0,)), ((), ())), spec) * g)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))

  def q_rows(h):  # symmetric 8-bit, one scale per row, half-to-even
    s = np.abs(h).max(axis=1, keepdims=True) / 127.0
    return np.clip(np.round(h / s), -127, 127), s
  h, sh = q_rows(g * s_b)                     # [M, N] = g · s_b, per row
  dlhs = (h @ qb.T) * sh
  h2, sh2 = q_rows((s_a * g).T)               # per column of s_a · g
  drhs = qa.T @ h2.T * sh2.T
  np.testing.assert_array_equal(np.asarray(dx), dlhs.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(dw), drhs.astype(np.float32))


# ------------------------------------------------------------------ weight-only serving

WEIGHT_ONLY_SPECS = {
    "int8": QS(bits=8), "int4_asym": QS(bits=4, symmetric=False),
    "int4_g16": QS(bits=4, granularity="group", group_size=16),
    "int8_tensor": QS(bits=8, granularity="tensor"), "int2": QS(bits=2),
    "int2_g32": QS(bits=2, granularity="group", group_size=32), "binary": QS(format="binary")}
WEIGHT_ONLY_ROWS = [(1, False), (3, False), (8, False), (11, False), (40, False),
                    (40, True)]  # 40: sliced with AMX only


def _weight_only_cases():
  """Every spec × rows × stored layout; the default run keeps a cross-section: every
  spec on the sliced (11 rows) and the float (40 rows) path, in one stored layout on one
  and the other on the other (alternating by spec), and every row count with a
  per-channel spec stored [K, N] and a grouped one stored [N, K]. The rest of the cross
  product is slow."""
  for rows, amx in WEIGHT_ONLY_ROWS:
    for i, (name, spec) in enumerate(WEIGHT_ONLY_SPECS.items()):
      for j, stored in enumerate(("KN", "NK")):
        quick = ((rows, amx) == (11, False) and j == i % 2
                 or (rows, amx) == (40, False) and j != i % 2
                 or (name, stored) in (("int8", "KN"), ("int2_g32", "NK")))
        yield pytest.param(stored, spec, rows, amx, id=f"{rows}-{amx}-{name}-{stored}",
                           marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("stored, spec, rows, amx", list(_weight_only_cases()))
def test_weight_only_serving_equals_dequantized_dot(stored, spec, rows, amx):
  """Weight-only serving (float activations, stored codes) equals the float dot of the
  dequantized weight up to float32 rounding, for every formulation it picks."""
  options = jq.DotOptions(amx_int8=amx)
  K, N = 64, 24
  w = rng_x((K, N), 31) if stored == "KN" else rng_x((N, K), 31)
  contracting = 0 if stored == "KN" else 1
  # Quantize, pack and dequantize under jit: one compile each instead of one per op.
  q = jax.jit(lambda w: jq.quantize_weight(w, spec, jq.make_layout(2, (contracting,))).pack())(w)
  x = rng_x((rows, K), 32)
  dims = (((1,), (contracting,)), ((), ()))
  out = jax.jit(lambda x, q: jq.dot_general(x, q, dims, options=options))(x, q)
  w_dequantized = np.asarray(jax.jit(lambda q: q.dequantize(jnp.float32))(q), np.float64)
  ref = np_dot_general(np.asarray(x, np.float64), w_dequantized, dims)
  w_kn = w_dequantized
  w_kn = w_kn if stored == "KN" else w_kn.T
  bound = np.abs(np.asarray(x, np.float64)) @ np.abs(w_kn)  # Σ|x||w|: the rounding scale
  assert out.shape == (rows, N) and out.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= 4 * K * 2.0 ** -24 * bound + 1e-30)


def test_weight_only_small_batch_runs_an_int8_dot_of_activation_slices():
  """Up to 32 rows, weight-only serving splits the float rows into three int8 slices
  and runs one s8×s8→s32 dot against the stored codes, [K, N] or [N, K] as stored;
  the float dot of the codes is only the fallback branch for rows holding NaN / Inf."""
  K, N = 64, 24
  x = jnp.asarray(rng_x((2, K), 33))
  for stored, contracting in (((K, N), 0), ((N, K), 1)):
    q = jq.quantize_weight(rng_x(stored, 34), QS(), jq.make_layout(2, (contracting,)))
    dims = (((1,), (contracting,)), ((), ()))
    jaxpr = jax.make_jaxpr(lambda x: jq.dot_general(x, q, dims))(x).jaxpr
    [cond] = [e for e in iter_eqns(jaxpr) if e.primitive.name == "cond"]
    false_branch, true_branch = cond.params["branches"]
    int_dots = [e for e in iter_eqns(true_branch.jaxpr) if e.primitive.name == "dot_general"]
    assert len(int_dots) == 1
    assert [v.aval.dtype for v in int_dots[0].invars] == [jnp.int8, jnp.int8]
    assert int_dots[0].params["preferred_element_type"] == jnp.int32
    assert int_dots[0].invars[0].aval.shape == (8, K)  # 3 x 2 rows, padded to 8
    assert int_dots[0].invars[1].aval.shape == stored  # as stored: no transpose
    assert "dot_general" in [e.primitive.name for e in iter_eqns(false_branch.jaxpr)]


@pytest.mark.parametrize("amx", [False, True])
def test_weight_only_rows_above_32_take_the_sliced_dot_only_with_amx(amx):
  """Above 32 rows the float dot of the codes runs, unless the CPU has AMX int8 units
  (three slices' int8 GEMMs then cost less than one float GEMM): then the sliced dot,
  at any row count for per-channel scales, up to 1024 / groups rows for grouped ones."""
  options = jq.DotOptions(amx_int8=amx)
  K, N = 64, 24
  q = jq.quantize_weight(rng_x((K, N), 34), QS(), jq.make_layout(2, (0,)))
  # Grouped scales (4 groups): with AMX up to 1024 / 4 = 256 rows (one s8 dot per group).
  g4 = jq.quantize_weight(rng_x((K, N), 34), QS(granularity="group", group_size=16),
                          jq.make_layout(2, (0,)))
  for w, rows, sliced_with_amx in ((q, 8, 1), (q, 33, 1), (q, 512, 1),
                                   (g4, 8, 4), (g4, 256, 4), (g4, 257, 0)):
    jaxpr = jax.make_jaxpr(lambda x: jq.dot_general(x, w, (((1,), (0,)), ((), ())),
                                                    options=options))(jnp.zeros((rows, K))).jaxpr
    s8_dots = [e for e in iter_eqns(jaxpr) if e.primitive.name == "dot_general"
               and e.invars[0].aval.dtype == jnp.int8]
    assert len(s8_dots) == (sliced_with_amx if amx else 4 if rows <= 32 and w is g4
                            else 1 if rows <= 32 else 0), rows


def test_a_2d_weight_stored_transposed_serves_a_contraction_of_its_axis_0():
  """A weight recorded [N, K] (contracting axis 1) is used as the transpose of the
  [K, N] weight a Dense layer contracts on axis 0, weight-only and W8A8 alike: the same
  outputs as the call naming axis 1, with no transpose of the codes on the weight-only
  path. Other layout mismatches stay errors."""
  K, N = 64, 24
  w = rng_x((K, N), 40)
  x = rng_x((5, K), 41)
  for spec, dspec in ((QS(bits=4, symmetric=False), None),
                      (QS(bits=8), DS(lhs=QS(bits=8)))):
    q = jq.quantize_weight(jnp.asarray(w.T), spec, jq.make_layout(2, (1,))).pack()
    as_dense = jax.jit(lambda x, q: jq.dot_general(x, q, (((1,), (0,)), ((), ())), dspec))
    as_stored = jax.jit(lambda x, q: jq.dot_general(x, q, (((1,), (1,)), ((), ())), dspec))
    np.testing.assert_array_equal(as_dense(x, q), as_stored(x, q))
    if dspec is None:
      jaxpr = jax.make_jaxpr(as_dense)(x, q).jaxpr
      assert "transpose" not in [e.primitive.name for e in iter_eqns(jaxpr)
                                 if e.outvars[0].aval.size == K * N]
  q_kn = jq.quantize_weight(jnp.asarray(w), QS(), jq.make_layout(2, (0,)))
  with pytest.raises(ValueError, match="would be misread"):
    jq.dot_general(rng_x((5, N), 42), q_kn, (((1,), (1,)), ((), ())))


def test_weight_only_groups_dot_one_by_one_straight_from_their_packed_bytes():
  """Grouped scales: one 2-D s8 dot per group of K (not one dot batched over groups);
  a packed [K, N] weight whose groups lie inside one bit plane gives each group from
  its own bytes, with no unpacked copy of the whole weight."""
  K, N, gs = 64, 24, 16
  q = jq.quantize_weight(rng_x((K, N), 35), QS(bits=4, granularity="group", group_size=gs),
                         jq.make_layout(2, (0,))).pack()
  x = jnp.asarray(rng_x((2, K), 36))
  jaxpr = jax.make_jaxpr(lambda x: jq.dot_general(x, q, (((1,), (0,)), ((), ()))))(x).jaxpr
  [cond] = [e for e in iter_eqns(jaxpr) if e.primitive.name == "cond"]
  sliced = cond.params["branches"][1].jaxpr
  dots = [e for e in iter_eqns(sliced) if e.primitive.name == "dot_general"]
  assert [e.invars[1].aval.shape for e in dots] == [(gs, N)] * (K // gs)
  assert all(e.params["dimension_numbers"][1] == ((), ()) for e in dots)
  whole = [e.primitive.name for e in iter_eqns(sliced) for v in e.outvars
           if v.aval.dtype == jnp.int8 and v.aval.size == K * N]
  assert whole == []  # no int8 array of the whole weight's size


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weight_only_sliced_path_gives_the_float_dots_nan_and_inf(bad):
  """A row holding NaN / ±Inf comes out as the float dot of the dequantized weight
  gives it (the int8 slices cannot carry them); the other rows stay finite."""
  K, N = 32, 8
  q = jq.quantize_weight(rng_x((K, N), 35), QS(), jq.make_layout(2, (0,)))
  x = rng_x((3, K), 36)
  x[1, 5] = bad
  out = np.asarray(jax.jit(lambda x: jq.dot_general(x, q, (((1,), (0,)), ((), ()))))(x))
  with np.errstate(invalid="ignore"):
    ref = x.astype(np.float64) @ np.asarray(q.dequantize(), np.float64)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
  assert np.isfinite(out[[0, 2]]).all()


def test_weight_only_slices_are_as_accurate_as_a_float32_dot():
  """Against a float64 reference, the sliced int8 dot's error is no larger than the
  float32 dequantize-then-dot's own rounding error (measured, K = 2048)."""
  K, N = 2048, 64
  q = jq.quantize_weight(rng_x((K, N), 37), QS(), jq.make_layout(2, (0,)))
  x = rng_x((4, K), 38)
  w = np.asarray(q.dequantize())
  ref = x.astype(np.float64) @ w.astype(np.float64)
  out = np.asarray(jax.jit(lambda x: jq.dot_general(x, q, (((1,), (0,)), ((), ()))))(x))
  f32 = np.asarray(jax.jit(jnp.matmul)(x, w))
  err, err_f32 = np.abs(out - ref).max(), np.abs(f32 - ref).max()
  assert 0 < err <= err_f32, (err, err_f32)


def test_int_dots_keep_default_precision_under_a_global_highest():
  """A user's `jax_default_matmul_precision='highest'` must not reach the s8×s8→s32 dots
  (on XLA:GPU they would stop being integer GEMMs); the int path's s8 dots name DEFAULT
  precision explicitly, and the results stay exact."""
  x, w = rng_x((16, 64), 1), rng_x((64, 32), 2)
  spec = DS(lhs=QS(bits=8), rhs=QS(bits=8))
  dims = (((1,), (0,)), ((), ()))
  fn = jax.jit(lambda a, b: jq.dot_general(a, b, dims, spec))
  with jax.default_matmul_precision("highest"):
    text = fn.lower(x, w).as_text()
    out = fn(x, w)
  s8_dots = [l for l in text.splitlines() if "dot_general" in l and "xi8>" in l]
  assert s8_dots, "no s8 dot in the int path"
  assert not any("HIGHEST" in l for l in s8_dots), s8_dots
  np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(x, w)))


@pytest.mark.parametrize("grad", [None, QS(bits=8)])
def test_gpu_barriers_change_no_value(grad):
  """Off the CPU the s8 dots sit between optimization barriers (a fusion choice on
  XLA:GPU); forced on and off here, the programs differ by the barriers only, and the
  outputs and gradients, vmapped too, are bit-identical."""
  x, w = rng_x((4, 6, 32), 1), rng_x((32, 16), 2)
  spec = DS(lhs=QS(bits=8), rhs=QS(symmetric=False), grad=grad)
  dims = (((1,), (0,)), ((), ()))
  def program(barriers):
    options = jq.DotOptions(int_dot_barriers=barriers)
    f = lambda a, b: jq.dot_general(a, b, dims, spec, key=jax.random.key(0), options=options)
    loss = lambda a, b: jnp.sum(jax.vmap(f, (0, None))(a, b) ** 2)
    return lambda a, b: (jax.vmap(f, (0, None))(a, b), jax.grad(loss, argnums=(0, 1))(a, b))
  barrier_count = lambda fn: [e.primitive.name for e in iter_eqns(
      jax.make_jaxpr(fn)(x, w).jaxpr)].count("optimization_barrier")
  without, with_ = program(False), program(True)
  assert barrier_count(with_) > barrier_count(without)  # around each forward s8 dot
  plain, with_barriers = jax.jit(without)(x, w), jax.jit(with_)(x, w)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_barriers)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float_ste_backward_runs_in_the_operands_dtype():
  """bf16 operands: the STE backward's two dots take bf16 operands (as a bf16 float
  model's backward does; float32 ones ran as TF32 GEMMs on a GPU, ~2x slower), accumulate
  in float32, and the gradients agree with the float32 computation to bf16 rounding."""
  x32, w32 = rng_x((16, 64), 1), rng_x((64, 32), 2)
  x, w = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
  spec = DS(lhs=QS(bits=8), rhs=QS(bits=8))
  dims = (((1,), (0,)), ((), ()))
  loss = lambda a, b: jnp.sum(jq.dot_general(a, b, dims, spec).astype(jnp.float32) ** 2)
  grad = jax.grad(loss, argnums=(0, 1))
  jaxpr = jax.make_jaxpr(grad)(x, w).jaxpr
  float_dots = [e for e in iter_eqns(jaxpr) if e.primitive.name == "dot_general"
                and e.invars[0].aval.dtype != jnp.int8]
  assert len(float_dots) == 2
  assert all(v.aval.dtype == jnp.bfloat16 for e in float_dots for v in e.invars)
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in float_dots)
  dx, dw = jax.jit(grad)(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  rx, rw = jax.jit(grad)(x.astype(jnp.float32), w.astype(jnp.float32))
  for d, r in ((dx, rx), (dw, rw)):
    np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(r), rtol=0.05,
                               atol=0.02 * float(jnp.max(jnp.abs(r))))
