"""JAX execution of an integer program (`graph.Graph`): integer dtypes only.

One function per op of graph.py's op set; `run_graph` threads the tensors. The int8
contractions run as XLA s8×s8→s32 dot / conv (`preferred_element_type=int32`); the input
zero point is handled exactly: a conv input is padded with zp itself (real 0), so every
window holds all taps and Σ(x − zp)·w = Σ x·w − zp·Σ w with Σ w per output feature.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only import graph as g


def _dot(op, arr, x):
  w = arr(op, "w")
  cl, cr = tuple(op["contract_lhs"]), tuple(op["contract_rhs"])
  acc = lax.dot_general(x.astype(jnp.int8), w, ((cl, cr), ((), ())),
                        precision=lax.Precision.DEFAULT,  # not a global 'highest'
                        preferred_element_type=jnp.int32)
  if op["zp"]:
    w_sum = jnp.sum(w.astype(jnp.int32), axis=cr)  # shaped like w's free axes
    n_free = acc.ndim - w_sum.ndim
    acc = acc - op["zp"] * w_sum.reshape((1,) * n_free + w_sum.shape)
  return acc


def _conv(op, arr, x):
  w = arr(op, "w")
  lhs_spec, rhs_spec, out_spec = (tuple(op[k]) for k in ("lhs_spec", "rhs_spec", "out_spec"))
  pads = [(0, 0)] * x.ndim
  for axis, (lo, hi) in zip(lhs_spec[2:], op["padding"]):
    pads[axis] = (lo, hi)
  x = jnp.pad(x.astype(jnp.int8), pads, constant_values=jnp.int8(op["zp"]))
  dn = lax.ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)
  acc = lax.conv_general_dilated(x, w, tuple(op["strides"]), [(0, 0)] * len(lhs_spec[2:]),
                                 rhs_dilation=tuple(op["rhs_dilation"]), dimension_numbers=dn,
                                 precision=lax.Precision.DEFAULT,
                                 preferred_element_type=jnp.int32)
  if op["zp"]:
    w_sum = jnp.sum(w.astype(jnp.int32), axis=tuple(a for a in range(w.ndim) if a != rhs_spec[0]))
    shape = [1] * acc.ndim
    shape[out_spec[1]] = w_sum.shape[0]
    acc = acc - op["zp"] * w_sum.reshape(shape)
  return acc


def _centered(x, zp):
  return x.astype(jnp.int32) - jnp.int32(zp)


def _add(op, arr, a, b):
  out = jnp.int32(0)
  for x, s in ((a, "a"), (b, "b")):
    v = _centered(x, op[f"zp_{s}"]) * jnp.int32(op[f"sign_{s}"] << op["left_shift"])
    out = out + fp.multiply_by_quantized_multiplier(v, jnp.int32(op[f"m0_{s}"]),
                                                    jnp.int32(op[f"e_{s}"]))
  return out


def _sum(op, arr, x):
  return jnp.sum(_centered(x, op["zp"]), axis=tuple(op["axes"]))


def _identity(op, arr, x):
  return _centered(x, op["zp"])


def _norm(op, arr, x):
  p, f, a = op["sigma_bits"], op["mean_bits"], op["pre_shift"]
  groups, axes = op["groups"], tuple(op["reduce"])
  shape = x.shape
  v = _centered(x, op["zp"]).reshape(shape[:-1] + (groups, shape[-1] // groups))
  n = 1
  for ax in axes:
    n *= v.shape[ax]
  s1 = jnp.sum(v, axis=axes, keepdims=True)
  mu = fp.rounding_divide(s1, n)
  s2 = jnp.sum((v - mu) * (v - mu), axis=axes, keepdims=True)
  r = s1 - n * mu
  big_v = s2 - fp.rounding_divide(r * r, n)
  var = (big_v // n) * (1 << 2 * p) + fp.rounding_divide((big_v % n) * (1 << 2 * p), n)
  sigma = jnp.maximum(fp.isqrt(var + op["eps"]), 1)
  inv = lax.div(jnp.int32(1 << 30), sigma)
  x_f = v * (1 << f) - fp.rounding_divide(s1 * (1 << f), n)
  t = fp.srdhm(x_f * (1 << a), inv)
  return t.reshape(shape)


def _requant(op, arr, acc):
  y = fp.requantize(acc, arr(op, "m0"), arr(op, "left"), arr(op, "right"), arr(op, "offset"))
  zp = op["zp"]
  y = jnp.clip(y, op["lo"] - zp, op["hi"] - zp) + jnp.int32(zp)
  return y.astype(jnp.int8 if op["dtype"] == "int8" else jnp.int32)


def _reshape(op, arr, x):
  return x.reshape((x.shape[0],) + tuple(op["shape"]))


def _transpose(op, arr, x):
  return jnp.transpose(x, tuple(op["perm"]))


KERNELS: Dict[str, Callable] = {
    "dot": _dot, "conv": _conv, "add": _add, "sum": _sum, "identity": _identity,
    "norm": _norm, "requant": _requant, "reshape": _reshape, "transpose": _transpose,
}


def run_graph(graph: g.Graph, x_q: jax.Array, arrays: Mapping[str, Any] = None) -> jax.Array:
  """Runs the program on int8 codes `x_q` (batch first); returns the output tensor.

  `arrays` replaces `graph.arrays` (e.g. device arrays passed as jit arguments)."""
  arrays = graph.arrays if arrays is None else arrays
  arr = lambda op, field: None if op.get(field) is None else jnp.asarray(arrays[op[field]])
  env = {"input": x_q}
  for op in graph.ops:
    out = KERNELS[op["op"]](op, arr, *(env[name] for name in op["in"]))
    if op["op"] in g.CORE_OPS:
      sign, bias = arr(op, "sign"), arr(op, "bias")
      if sign is not None:
        out = out * sign
      if bias is not None:
        out = out + bias
    env[op["out"]] = out
  return env[graph.output["tensor"]].astype(jnp.int32)  # the logits are int32
