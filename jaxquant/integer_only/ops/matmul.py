"""'matmul': a dot_general of two activations (attention scores Q·Kᵀ, attention·V).

Program op `matmul` (x_a = a − zp_a, x_b = b − zp_b, the centered int8 codes, exact in
int32): acc = dot_general(x_a, x_b) over a's axes `contract_lhs` with b's `contract_rhs`,
batch axes `batch_lhs` / `batch_rhs` (each starting with the batch axis 0); output axes
in lax.dot_general order (batch, a's free, b's free). The accumulator scale is s_a·s_b
(I-BERT's s8×s8→s32 product, Kim et al. 2021, with the zero points subtracted first).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.integer_only.ir import Const
from jaxquant.integer_only.ops.base import GraphOp, Op


def trace(tracer, eqn, vals, path):
  """A product of two activations whose batch axes start with the batch axis."""
  if any(isinstance(v, Const) for v in vals):
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if not lb or lb[0] != 0 or rb[0] != 0:
    return tracer.fail("a product of two activations not batched over axis 0", path)
  a, b = (tracer.materialize(v) for v in vals)
  return tracer.core_lazy("matmul", [a, b], tuple(eqn.outvars[0].aval.shape), path,
                          dims=((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))))


def evaluate(node, ins, ctx):
  return np.asarray(lax.dot_general(ins[0].astype(np.float32), ins[1].astype(np.float32),
                                    node.attrs["dims"],
                                    precision=lax.Precision.HIGHEST))


def emit(emitter, node):
  """(matmul op, accumulator scale s_a·s_b, bound K·span_a·span_b)."""
  a, b = node.inputs
  ga, gb = emitter.natural(a), emitter.natural(b)
  ta, tb = emitter.emit(a, ga), emitter.emit(b, gb)
  (lc, rc), (lb, rb) = node.attrs["dims"]
  shape_a = emitter.ir.nodes[a].shape
  k = int(np.prod([shape_a[d] for d in lc]))
  span = lambda g: max(g.qmax - g.zp, g.zp - g.qmin)
  op = {"op": "matmul", "in": [ta, tb], "layer": node.layer, "zp_a": ga.zp, "zp_b": gb.zp,
        "contract_lhs": list(lc), "contract_rhs": list(rc), "batch_lhs": list(lb),
        "batch_rhs": list(rb)}
  return op, ga.scale * gb.scale, float(k) * span(ga) * span(gb)


def kernel(op, arr, a, b):
  """int32 dot_general of the centered codes (|x| ≤ 255, so the sums are exact)."""
  xa = a.astype(jnp.int32) - jnp.int32(op["zp_a"])
  xb = b.astype(jnp.int32) - jnp.int32(op["zp_b"])
  dims = ((tuple(op["contract_lhs"]), tuple(op["contract_rhs"])),
          (tuple(op["batch_lhs"]), tuple(op["batch_rhs"])))
  return lax.dot_general(xa, xb, dims, preferred_element_type=jnp.int32)


OP = Op(
    kind="matmul", summary="products of two activations (attention)",
    graph_ops={"matmul": GraphOp(fields=("zp_a", "zp_b", "contract_lhs", "contract_rhs",
                                         "batch_lhs", "batch_rhs"), arity=2, kernel=kernel)},
    primitives=("dot_general",), trace=trace, evaluate=evaluate, emit=emit)

OPS = (OP,)
