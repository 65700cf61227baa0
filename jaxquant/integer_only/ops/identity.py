"""'identity': an affine map (scale, offset, clamp) of an already quantized tensor, e.g.
a ReLU after a residual add, or the requantization of the model input.

Program op `identity`: acc = q − zp. The tracer creates these nodes itself (no primitive).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxquant.integer_only.ops.base import GraphOp, Op


def evaluate(node, ins, ctx):
  return ins[0]


def emit(emitter, node):
  """(identity op, accumulator scale, bound): x − zp, for an affine map of a tensor."""
  x = node.inputs[0]
  grid = emitter.natural(x)
  t = emitter.emit(x, grid)
  op = {"op": "identity", "in": [t], "layer": node.layer, "zp": grid.zp}
  return op, grid.scale, float(grid.qmax - grid.qmin)


def kernel(op, arr, x):
  return x.astype(jnp.int32) - jnp.int32(op["zp"])


OP = Op(kind="identity", summary="affine maps of activations",
        graph_ops={"identity": GraphOp(fields=("zp",), kernel=kernel)},
        evaluate=evaluate, emit=emit)

OPS = (OP,)
