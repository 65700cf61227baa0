"""'reshape' and 'transpose': codes moved, not changed (the tensor keeps its grid).

Program ops: `reshape` to (batch,) + `shape`; `transpose` by `perm` (perm[0] = 0).
Axis 0 is the batch and must stay so (a reshape or transpose that moves it is refused).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only.ir import Const, Tensor
from jaxquant.integer_only.ops.base import GraphOp, Op


def no_inputs(emitter, node):
  return []


def trace_reshape(tracer, eqn, vals, path):
  acts = [v for v in vals if not isinstance(v, Const)]
  if len(acts) != 1:
    return None
  new_shape = tuple(eqn.outvars[0].aval.shape)
  x = tracer.materialize(acts[0])
  shape = tracer.nodes[x].shape
  if int(np.prod(shape)) != int(np.prod(new_shape)):
    return tracer.fail("a broadcast of an activation", path)
  if new_shape[0] != shape[0]:
    return tracer.fail("a reshape that mixes the batch axis", path)
  return Tensor(tracer.node("reshape", [x], new_shape, path))


def trace_transpose(tracer, eqn, vals, path):
  perm = tuple(eqn.params["permutation"])
  if perm[0] != 0:
    return tracer.fail("a transpose that moves the batch axis", path)
  x = tracer.materialize(vals[0])
  shape = tuple(eqn.outvars[0].aval.shape)
  return Tensor(tracer.node("transpose", [x], shape, path, perm=perm))


def emit_reshape(emitter, node, t):
  return {"op": "reshape", "in": [t], "layer": node.layer, "shape": list(node.shape[1:])}


def emit_transpose(emitter, node, t):
  return {"op": "transpose", "in": [t], "layer": node.layer, "perm": list(node.attrs["perm"])}


RESHAPE = Op(
    kind="reshape", summary="reshapes",
    graph_ops={"reshape": GraphOp(fields=("shape",), core=False,
                                  kernel=lambda op, arr, x: x.reshape(
                                      (x.shape[0],) + tuple(op["shape"])))},
    primitives=("reshape", "broadcast_in_dim", "squeeze", "expand_dims"),
    trace=trace_reshape, evaluate=lambda n, ins, ctx: ins[0].reshape(
        (ins[0].shape[0],) + n.shape[1:]),
    emit=emit_reshape, needs_range=no_inputs, structural=True)

TRANSPOSE = Op(
    kind="transpose", summary="transposes",
    graph_ops={"transpose": GraphOp(fields=("perm",), core=False,
                                    kernel=lambda op, arr, x: jnp.transpose(
                                        x, tuple(op["perm"])))},
    primitives=("transpose",), trace=trace_transpose,
    evaluate=lambda n, ins, ctx: np.transpose(ins[0], n.attrs["perm"]),
    emit=emit_transpose, needs_range=no_inputs, structural=True)

OPS = (RESHAPE, TRANSPOSE)
