"""'softmax': jax.nn.softmax over the last axis, as I-BERT's integer softmax.

jax inlines jax.nn.softmax into reduce_max, max(−inf), broadcast, stop_gradient, sub,
exp, reduce_sum, broadcast, div; that sequence on one activation is matched whole
(`match`). The scores are requantized to int32 codes at a fine scale s_in (the measured
max |score| / 2^16, zero point 0); program op `softmax` is then `ibert.i_softmax` (Kim et
al. 2021, I-EXP with our working-scale refinements, see ibert_plans.ExpPlan /
SoftmaxPlan) over rows of `n` (`masked_softmax`: with the key padding mask
[ids ≠ pad] of its second input, the ids [B, S], over the last axis; masked entries get
0): out = int8 codes of softmax at scale 2^−out_bits, with
the exp plan's integers flattened into fields `exp_<name>` (shift_in, in_floor, q_ln2,
q_b, q_c, out_shift).
"""
from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only import ibert
from jaxquant.integer_only import ibert_plans as plans
from jaxquant.integer_only.emit import Grid
from jaxquant.integer_only.ops import keymask
from jaxquant.integer_only.ops.base import GraphOp, Op

SOFTMAX_OUT_BITS = 7
SOFTMAX_IN_BITS = 16  # int32 score codes: max |score| ↦ 2^16
EXP_FIELDS = ("shift_in", "in_floor", "q_ln2", "q_b", "q_c", "out_shift")
_PATTERN = ("reduce_max", "max", "broadcast_in_dim", "stop_gradient", "sub", "exp",
            "reduce_sum", "broadcast_in_dim", "div")


def match(eqns, i):
  """(9, x) when eqns[i:i+9] is jax.nn.softmax(x, axis=-1) as jax inlines it."""
  region = eqns[i:i + len(_PATTERN)]
  if tuple(e.primitive.name for e in region) != _PATTERN:
    return None
  rmax, _, _, stop, sub, exp, rsum, bcast, div = region
  x = rmax.invars[0]
  last = (len(x.aval.shape) - 1,)
  if tuple(rmax.params["axes"]) != last or tuple(rsum.params["axes"]) != last:
    return None
  flow = (sub.invars[0] is x and sub.invars[1] is stop.outvars[0]
          and exp.invars[0] is sub.outvars[0] and rsum.invars[0] is exp.outvars[0]
          and div.invars[0] is exp.outvars[0] and div.invars[1] is bcast.outvars[0])
  return (len(_PATTERN), x) if flow else None


def trace_match(tracer, x, eqns, path, read):
  """The softmax node; of scores masked by a padding mask (keymask.Masked), the masked
  softmax taking the ids as its second input."""
  if isinstance(x, keymask.Keep):
    return tracer.fail("a softmax of a padding mask", path)
  if isinstance(x, keymask.Masked):
    node = tracer.materialize(x.value)
    rank = len(tracer.nodes[node].shape)
    if tuple(x.keep.axes) != (0, rank - 1):
      return tracer.fail("a softmax masked along axes other than (batch, last)", path)
    return tracer.core_lazy("softmax", [node, x.keep.ids], tracer.nodes[node].shape, path,
                            pad=x.keep.pad)
  node = tracer.materialize(x)
  return tracer.core_lazy("softmax", [node], tracer.nodes[node].shape, path)


def evaluate(node, ins, ctx):
  x = ins[0].astype(np.float64)
  if len(ins) == 2:  # masked: as the float model's finite fill
    keep = keymask.mask_of(ins[1].astype(np.int64), node.attrs["pad"], x.ndim, (0, x.ndim - 1))
    x = np.where(keep, x, np.finfo(np.float32).min)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def emit(emitter, node):
  """(softmax op, accumulator scale 2^−out_bits, bound 128): scores on an int32 grid."""
  x = node.inputs[0]
  lo, hi = emitter.ranges[emitter.root(x)]
  amax = max(abs(lo), abs(hi), 1e-6)
  grid = Grid(amax / 2.0 ** SOFTMAX_IN_BITS, 0, -plans.SOFTMAX_CLAMP, plans.SOFTMAX_CLAMP,
              "int32")
  t = emitter.emit(x, grid)
  plan = plans.softmax_plan(grid.scale, node.shape[-1], SOFTMAX_OUT_BITS)
  op = {"op": "softmax", "in": [t], "layer": node.layer, "n": plan.n,
        "out_bits": plan.out_bits,
        **{f"exp_{k}": int(getattr(plan.exp, k)) for k in EXP_FIELDS}}
  if len(node.inputs) == 2:
    ids = node.inputs[1]
    op.update(op="masked_softmax", pad=int(node.attrs["pad"]))
    op["in"] = [t, emitter.emit(ids, emitter.natural(ids))]
  return op, 2.0 ** -plan.out_bits, 128.0


def int_plan(op):
  """The integer fields of a `softmax` op as the plan `ibert.i_softmax` reads."""
  exp = types.SimpleNamespace(**{k: op[f"exp_{k}"] for k in EXP_FIELDS})
  return types.SimpleNamespace(exp=exp, n=op["n"], out_bits=op["out_bits"])


def kernel(op, arr, x):
  return ibert.i_softmax(x, int_plan(op)).astype(jnp.int32)


def masked_kernel(op, arr, x, ids):
  keep = keymask.mask_of(ids, op["pad"], x.ndim, (0, x.ndim - 1))
  return ibert.i_softmax(x, int_plan(op), keep).astype(jnp.int32)


_FIELDS = ("n", "out_bits") + tuple(f"exp_{k}" for k in EXP_FIELDS)

OP = Op(
    kind="softmax", summary="softmax over the last axis (i-softmax)",
    graph_ops={"softmax": GraphOp(fields=_FIELDS, kernel=kernel),
               "masked_softmax": GraphOp(fields=_FIELDS + ("pad",), arity=2,
                                         kernel=masked_kernel)},
    match=match, trace_match=trace_match, evaluate=evaluate, emit=emit)

OPS = (OP,)
