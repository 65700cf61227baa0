"""'gelu': the exact (erf) GELU, x/2·(1 + erf(x/√2)), as I-BERT's i-GELU.

jax inlines nn.gelu(approximate=False) into mul(½, x), neg, mul(1/√2), erfc, mul; that
sequence on one activation is matched whole (`match`). The input is requantized to a
symmetric int8 grid (zero point 0, codes ±127, scale max |x| / 127 of the measured
range; int16 codes ±32767 in a program built with residual_bits=16, the plan then
rounding them to its working scale); program op `gelu` is `ibert.i_gelu_acc` (Kim et al. 2021, I-ERF by a second-order
polynomial, see ibert_plans.GeluPlan for every constant and rounding rule) with the
plan's integers as fields: in_clamp, shift_in, q_clip, q_b, q_c, q_one. Its int32 result
has scale GeluPlan.acc_scale and is requantized like any accumulator.
"""
from __future__ import annotations

import math
import types

import jax
import numpy as np

from jaxquant.integer_only import ibert
from jaxquant.integer_only import ibert_plans as plans
from jaxquant.integer_only.emit import Grid
from jaxquant.integer_only.ops.base import GraphOp, Op

PLAN_FIELDS = ("in_clamp", "shift_in", "q_clip", "q_b", "q_c", "q_one")
_PATTERN = ("mul", "neg", "mul", "erfc", "mul")


def _literal(v, value):
  val = getattr(v, "val", None)
  return val is not None and np.size(val) == 1 and abs(float(val) - value) < 1e-6


def match(eqns, i):
  """(5, x) when eqns[i:i+5] is nn.gelu(x, approximate=False) as jax inlines it."""
  region = eqns[i:i + len(_PATTERN)]
  if tuple(e.primitive.name for e in region) != _PATTERN:
    return None
  half, neg, scale, erfc, out = region
  x = neg.invars[0]
  ok = (any(a is x for a in half.invars) and any(_literal(a, 0.5) for a in half.invars)
        and scale.invars[0] is neg.outvars[0]
        and _literal(scale.invars[1], 1 / math.sqrt(2.0))
        and erfc.invars[0] is scale.outvars[0]
        and {id(a) for a in out.invars} == {id(half.outvars[0]), id(erfc.outvars[0])})
  return (len(_PATTERN), x) if ok else None


def trace_match(tracer, x, eqns, path, read):
  node = tracer.materialize(x)
  return tracer.core_lazy("gelu", [node], tracer.nodes[node].shape, path)


def evaluate(node, ins, ctx):
  return np.asarray(jax.nn.gelu(ins[0].astype(np.float32), approximate=False))


def emit(emitter, node):
  """(gelu op, GeluPlan.acc_scale, GeluPlan.acc_bound) on a symmetric int8 input grid
  (int16, codes ±32767, when the program is built with residual_bits=16)."""
  x = node.inputs[0]
  lo, hi = emitter.ranges[emitter.root(x)]
  amax = max(abs(lo), abs(hi), 1e-6)
  wide = emitter.residual_bits == 16
  qmax = 2 ** 15 - 1 if wide else 127
  grid = Grid(amax / qmax, 0, -qmax, qmax, "int16" if wide else "int8")
  t = emitter.emit(x, grid)
  plan = plans.gelu_plan(grid.scale, grid.scale, qmax)
  op = {"op": "gelu", "in": [t], "layer": node.layer,
        **{k: int(getattr(plan, k)) for k in PLAN_FIELDS}}
  return op, plan.acc_scale, float(plan.acc_bound)


def int_plan(op):
  """The integer fields of a `gelu` op as the plan `ibert.i_gelu_acc` reads."""
  return types.SimpleNamespace(**{k: op[k] for k in PLAN_FIELDS})


def kernel(op, arr, x):
  return ibert.i_gelu_acc(x, int_plan(op))


OP = Op(
    kind="gelu", summary="exact (erf) GELU (i-GELU)",
    graph_ops={"gelu": GraphOp(fields=PLAN_FIELDS, kernel=kernel)},
    match=match, trace_match=trace_match, evaluate=evaluate, emit=emit)

OPS = (OP,)
