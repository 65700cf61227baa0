"""'sum': a reduction over non-batch axes (mean pooling once its 1/n folds into the
requantization multiplier).

Program op `sum`: acc = Σ (q − zp) over `axes` (axes removed).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only.ops.base import GraphOp, Op


def trace(tracer, eqn, vals, path):
  axes = tuple(eqn.params["axes"])
  if 0 in axes:
    return tracer.fail("a sum over the batch axis (BatchNorm in training mode?)", path)
  x = tracer.materialize(vals[0])
  return tracer.core_lazy("sum", [x], tuple(eqn.outvars[0].aval.shape), path, axes=axes)


def evaluate(node, ins, ctx):
  return np.sum(ins[0], axis=node.attrs["axes"])


def emit(emitter, node):
  """(sum op, accumulator scale, bound) of a reduction over `axes`."""
  x = node.inputs[0]
  grid = emitter.natural(x)
  t = emitter.emit(x, grid)
  axes = node.attrs["axes"]
  n = int(np.prod([emitter.ir.nodes[x].shape[d] for d in axes]))
  op = {"op": "sum", "in": [t], "layer": node.layer, "zp": grid.zp, "axes": list(axes)}
  return op, grid.scale, float(n) * (grid.qmax - grid.qmin)


def kernel(op, arr, x):
  return jnp.sum(x.astype(jnp.int32) - jnp.int32(op["zp"]), axis=tuple(op["axes"]))


OP = Op(kind="sum", summary="sums and means",
        graph_ops={"sum": GraphOp(fields=("zp", "axes"), kernel=kernel)},
        primitives=("reduce_sum",), trace=trace, evaluate=evaluate, emit=emit)

OPS = (OP,)
