"""'add': the sum or difference of two activations (residual connections).

Program op `add` (x_a = a − zp_a, x_b = b − zp_b, L = `left_shift`):
  acc = MBQM(x_a·sign_a·2^L, m0_a, e_a) + MBQM(x_b·sign_b·2^L, m0_b, e_b)
with MBQM = fixed_point.multiply_by_quantized_multiplier: each operand rescaled onto a
common accumulator scale 2·max(s_a, s_b)/2^L (Jacob et al. 2018, §2.4; gemmlowp's
rounding rules).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only.ir import Const
from jaxquant.integer_only.ops.base import GraphOp, Op

ADD_LEFT_SHIFT = 20


def trace(tracer, eqn, vals, path):
  """a ± b of two activations of one shape."""
  acts = [v for v in vals if not isinstance(v, Const)]
  if len(acts) != 2:
    return None
  shapes = [tracer.shape_of(a) for a in acts]
  if shapes[0] != shapes[1]:
    return tracer.fail("an add of activations that broadcast", path)
  a, b = (tracer.materialize(v) for v in acts)
  sign_b = 1 if eqn.primitive.name == "add" else -1
  return tracer.core_lazy("add", [a, b], shapes[0], path, sign_b=sign_b)


def evaluate(node, ins, ctx):
  return ins[0] + node.attrs["sign_b"] * ins[1]


def emit(emitter, node):
  """(add op, accumulator scale, bound) of two activations on their own grids."""
  (a, b), shift = node.inputs, ADD_LEFT_SHIFT
  ga, gb = emitter.natural(a), emitter.natural(b)
  ta, tb = emitter.emit(a, ga), emitter.emit(b, gb)
  s_max = max(ga.scale, gb.scale)
  m0_a, e_a = fp.quantize_multiplier(ga.scale / (2 * s_max))
  m0_b, e_b = fp.quantize_multiplier(gb.scale / (2 * s_max))
  op = {"op": "add", "in": [ta, tb], "layer": node.layer, "zp_a": ga.zp, "zp_b": gb.zp,
        "sign_a": 1, "sign_b": int(node.attrs["sign_b"]), "m0_a": m0_a, "e_a": e_a,
        "m0_b": m0_b, "e_b": e_b, "left_shift": shift}
  return op, 2 * s_max / 2.0 ** shift, 2.0 ** (shift + 8)


def kernel(op, arr, a, b):
  out = jnp.int32(0)
  for x, s in ((a, "a"), (b, "b")):
    v = (x.astype(jnp.int32) - jnp.int32(op[f"zp_{s}"])) * jnp.int32(
        op[f"sign_{s}"] << op["left_shift"])
    out = out + fp.multiply_by_quantized_multiplier(v, jnp.int32(op[f"m0_{s}"]),
                                                    jnp.int32(op[f"e_{s}"]))
  return out


OP = Op(
    kind="add", summary="residual adds",
    graph_ops={"add": GraphOp(fields=("zp_a", "zp_b", "sign_a", "sign_b", "m0_a", "e_a",
                                      "m0_b", "e_b", "left_shift"), arity=2, kernel=kernel)},
    primitives=("add", "sub"), trace=trace, evaluate=evaluate, emit=emit)

OPS = (OP,)
