"""Shared helpers of the integer-only tests: the numpy runtime loaded by path, a jaxpr
walker, tiny QAT models trained in-process, and an arbitrary-precision reference of the
fixed-point rules written from their definitions (Python ints and Fractions)."""
import importlib.util
import math
import os
from fractions import Fraction

import jax
import numpy as np
import optax

import jaxquant as jq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_PATH = os.path.join(ROOT, "jaxquant", "deploy", "numpy_runtime.py")


def numpy_runtime():
  """jaxquant/deploy/numpy_runtime.py loaded by path (as a device would)."""
  spec = importlib.util.spec_from_file_location("numpy_runtime_under_test", RUNTIME_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_runtime_exact_and_close(model, variables, program, x, directory, tol):
  """The saved program runs bit for bit in the numpy runtime on x's codes, and its
  dequantized output is within tol · max|model output| of the model's."""
  runtime = numpy_runtime()
  program.save(str(directory))
  codes = np.asarray(program.quantize_input(x))
  np.testing.assert_array_equal(runtime.run(runtime.load(str(directory)), codes),
                                np.asarray(program.run(codes)))
  want = np.asarray(jax.jit(model.apply)(variables, x))  # one compile, not one per op
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - want).max() <= tol * np.abs(want).max()


# ------------------------------------------------------------------ exact references
def ref_srdhm(a: int, b: int) -> int:
  """a·b/2^31 to nearest, ties toward +inf; a = b = −2^31 saturates to 2^31 − 1."""
  if a == b == -2 ** 31:
    return 2 ** 31 - 1
  return math.floor(Fraction(a * b, 2 ** 31) + Fraction(1, 2))


def ref_rdbpot(x: int, n: int) -> int:
  """x/2^n to nearest, ties away from zero."""
  q = Fraction(x, 2 ** n)
  mag = math.floor(abs(q) + Fraction(1, 2))
  return mag if q >= 0 else -mag


def ref_rounding_divide(a: int, d: int) -> int:
  """a/d to nearest, ties away from zero."""
  q = Fraction(a, d)
  mag = math.floor(abs(q) + Fraction(1, 2))
  return mag if q >= 0 else -mag


def ref_requantize(x: int, m0: int, left: int, right: int, offset: int = 0) -> int:
  """RDBPOT(SRDHM(clamp_int32(x·2^left) + offset, m0), right)."""
  shifted = max(-2 ** 31, min(2 ** 31 - 1, x * 2 ** left)) + offset
  return ref_rdbpot(ref_srdhm(shifted, m0), right)


def ref_mbqm(x: int, m0: int, e: int) -> int:
  if e > 0:
    return ref_srdhm(max(-2 ** 31, min(2 ** 31 - 1, x * 2 ** e)), m0)
  return ref_rdbpot(ref_srdhm(x, m0), -e)


# ------------------------------------------------------------------ jaxpr walking
def float_dtypes_in(closed_jaxpr):
  """Every floating dtype of any value (inputs, outputs, constants, literals) of every
  equation, sub-jaxprs included."""
  found = []

  def visit(jaxpr):
    vals = list(jaxpr.invars) + list(jaxpr.constvars) + list(jaxpr.outvars)
    for eqn in jaxpr.eqns:
      vals += list(eqn.invars) + list(eqn.outvars)
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)
      if "new_dtype" in eqn.params and np.issubdtype(np.dtype(eqn.params["new_dtype"]), np.floating):
        found.append((eqn.primitive.name, eqn.params["new_dtype"]))
    for v in vals:
      dtype = getattr(getattr(v, "aval", None), "dtype", None)
      if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.inexact):
        found.append((str(v), dtype))

  visit(closed_jaxpr.jaxpr)
  return found


# ------------------------------------------------------------------ tiny QAT models
A8_SYM = jq.QuantSpec(bits=8, granularity="tensor", ste="clipped")


def act(bits):
  return jq.QuantSpec(bits=bits, symmetric=False, granularity="tensor", ste="clipped")


def rules(bits=8, first="conv_0|stem|dense_0", last="head"):
  """The harness's standard shape: first / last layers W8A8, the rest at `bits` (LSQ)."""
  return [jq.Rule(first, weight=jq.QuantSpec(bits=8), act=A8_SYM),
          jq.Rule(last, weight=jq.QuantSpec(bits=8), act=act(8)),
          jq.Rule(".*", weight=jq.QuantSpec(bits=bits, ste="lsq"), act=act(bits))]


def train_qat(model, rule_list, x, y, steps=20, batch=16, lr=1e-2, seed=0):
  """QAT for a few steps with 'quant_stats' mutable (EMA ranges); returns (qmodel,
  variables)."""
  qm = jq.quantize_model(model, rule_list)
  variables = dict(jax.jit(qm.init)(jax.random.key(seed), x[:batch]))  # see qat_forward_ranges
  tx = optax.adam(lr)
  train = {k: variables[k] for k in ("params", "quant") if k in variables}
  other = {k: variables[k] for k in variables if k not in train}
  opt = tx.init(train)

  @jax.jit
  def step(train, other, opt, xb, yb):
    def loss(t):
      out, upd = qm.apply({**t, **other}, xb, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean(), upd
    (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(train)
    updates, opt = tx.update(grads, opt, train)
    return optax.apply_updates(train, updates), {**other, **upd}, opt

  n = x.shape[0]
  for i in range(steps):
    lo = (i * batch) % (n - batch + 1)
    train, other, opt = step(train, other, opt, x[lo:lo + batch], y[lo:lo + batch])
  return qm, jax.tree.map(np.asarray, {**train, **other})


def qat_forward_ranges(model, rule_list, batches, seed=0):
  """A QAT model at init whose activation-range EMAs have seen `batches` (forward passes
  with 'quant_stats' mutable; no gradient step: one compile instead of a train step's)."""
  qm = jq.quantize_model(model, rule_list)
  # Jitted: one compile instead of one per op (eager init of a quantized ResNet is ~4x
  # slower on CPU); LSQ steps may differ from eager init's in the last bit.
  variables = dict(jax.jit(qm.init)(jax.random.key(seed), batches[0]))

  @jax.jit
  def update(variables, xb):
    _, upd = qm.apply(variables, xb, mutable=["quant_stats"])
    return {**variables, **upd}

  for xb in batches:
    variables = update(variables, xb)
  return qm, jax.tree.map(np.asarray, variables)


def ema_as_static(variables):
  """The variables with each layer's EMA range also stored as its static range: the QAT
  model then quantizes activations on exactly the grids the integer program uses."""
  def visit(t):
    if not isinstance(t, dict):
      return t
    out = {k: visit(v) for k, v in t.items()}
    if "ema_lo" in t:
      out.update(act_lo=t["ema_lo"], act_hi=t["ema_hi"], act_count=t["ema_count"])
    return out
  return {**variables, "quant_stats": visit(variables["quant_stats"])}


# ------------------------------------------------------------------ no float anywhere
def float_in_program(program, x_q, directory):
  """Every float found in an integer program and in one run of it: (1) the values of the
  jaxpr of `program.run` on `x_q` (sub-jaxprs, literals, casts included); (2) the graph's
  arrays and every field of every op (a float field would be a float constant the op
  computes with); (3) each op the numpy runtime executes on `x_q` from the saved
  `directory`: the dtypes of its inputs and output. The documented boundary floats
  (graph input scale / inv_scale of a float-input program, the output scale used by the
  final dequantization) are not op fields and are not walked. Returns a list of
  descriptions (empty: integer-only)."""
  found = [f"jaxpr: {v} {d}" for v, d in float_dtypes_in(jax.make_jaxpr(program.run)(x_q))]
  graph = program.graph
  for k, v in graph.arrays.items():
    if not np.issubdtype(np.asarray(v).dtype, np.integer):
      found.append(f"array {k}: {np.asarray(v).dtype}")

  def floats(value):
    if isinstance(value, (list, tuple)):
      return any(floats(v) for v in value)
    return isinstance(value, float) or (isinstance(value, np.generic)
                                        and np.issubdtype(value.dtype, np.inexact))

  for op in graph.ops:
    for field, value in op.items():
      if floats(value):
        found.append(f"op {op['out']} ({op['op']}) field {field}={value!r}")
  rt = numpy_runtime()
  kernels = dict(rt.OPS)

  def recorder(name, fn):
    def run(op, arrays, *ins):
      out = fn(op, arrays, *ins)
      for i, t in enumerate(list(ins) + [out]):
        if not np.issubdtype(np.asarray(t).dtype, np.integer):
          found.append(f"numpy runtime {name} {'input' if i < len(ins) else 'output'}: "
                       f"{np.asarray(t).dtype}")
      return out
    return run

  rt.OPS.update({name: recorder(name, fn) for name, fn in kernels.items()})
  out = rt.run(rt.load(directory), np.asarray(x_q))
  if not np.issubdtype(out.dtype, np.integer):
    found.append(f"numpy runtime output: {out.dtype}")
  return found
