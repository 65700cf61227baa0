"""'add': the sum or difference of two activations (residual connections).

Program op `add` (x_a = a − zp_a, x_b = b − zp_b, L = `left_shift`):
  acc = MBQM(x_a·sign_a·2^L, m0_a, e_a) + MBQM(x_b·sign_b·2^L, m0_b, e_b)
with MBQM = fixed_point.multiply_by_quantized_multiplier: each operand rescaled onto a
common accumulator scale 2·max(s_a, s_b)/2^L (Jacob et al. 2018, §2.4; gemmlowp's
rounding rules).

The shift is L = ADD_ACC_BITS − b = 28 − b for inputs stored in at most b bits (b = 8:
L = 20, int8 codes; b = 16: L = 12, the int16 codes of a wide residual path), and the
int32 arithmetic cannot overflow: q and zp both lie in [−2^(b−1), 2^(b−1) − 1], so
|x| ≤ 2^b − 1 and |x·2^L| ≤ (2^b − 1)·2^(28−b) < 2^28 fits int32. Each multiplier is
m = s/(2·max(s_a, s_b)) ≤ 1/2, so `quantize_multiplier` gives e ≤ 0 (M0·2^(e−31) ≤ 1/2,
a rounded-up M0 of 2^31 becoming 2^30 with e + 1 ≤ 0) and MBQM = RDBPOT(SRDHM(v, M0), −e)
never shifts left: |SRDHM(v, M0)| ≤ |v|·M0/2^31 + 1/2 < 2^27 + 1/2, and RDBPOT only
shrinks it, so each term is at most 2^27 and |acc| ≤ 2^28 (the bound `emit` reports,
the same for every b). The sum of two int8 inputs keeps the int8 shift of 20 (its
programs are unchanged).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only.emit import grid_bits
from jaxquant.integer_only.ir import Const
from jaxquant.integer_only.ops.base import GraphOp, Op

ADD_ACC_BITS = 28
ADD_LEFT_SHIFT = ADD_ACC_BITS - 8  # int8 inputs


def left_shift(bits: int) -> int:
  """The fixed-point shift L of an add whose inputs are stored in at most `bits` bits."""
  if not 1 <= bits <= 16:
    raise ValueError(f"an add of {bits}-bit codes: the int32 add takes at most 16-bit inputs")
  return ADD_ACC_BITS - bits


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
  """(add op, accumulator scale, bound) of two activations on their own grids (int16
  grids on a wide residual path, `Emitter.operand`)."""
  a, b = node.inputs
  ga, gb = emitter.operand(node, a), emitter.operand(node, b)
  shift = left_shift(max(grid_bits(ga), grid_bits(gb)))
  ta, tb = emitter.emit(a, ga), emitter.emit(b, gb)
  s_max = max(ga.scale, gb.scale)
  m0_a, e_a = fp.quantize_multiplier(ga.scale / (2 * s_max))
  m0_b, e_b = fp.quantize_multiplier(gb.scale / (2 * s_max))
  op = {"op": "add", "in": [ta, tb], "layer": node.layer, "zp_a": ga.zp, "zp_b": gb.zp,
        "sign_a": 1, "sign_b": int(node.attrs["sign_b"]), "m0_a": m0_a, "e_a": e_a,
        "m0_b": m0_b, "e_b": e_b, "left_shift": shift}
  return op, 2 * s_max / 2.0 ** shift, 2.0 ** ADD_ACC_BITS


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
