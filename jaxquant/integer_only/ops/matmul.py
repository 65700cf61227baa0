"""'matmul': a dot_general of two activations (attention scores Q·Kᵀ, attention·V).

Program op `matmul` (x_a = a − zp_a, x_b = b − zp_b, the centered int8 codes, exact in
int32): acc = dot_general(x_a, x_b) over a's axes `contract_lhs` with b's `contract_rhs`,
batch axes `batch_lhs` / `batch_rhs` (each starting with the batch axis 0); output axes
in lax.dot_general order (batch, a's free, b's free). The accumulator scale is s_a·s_b
(I-BERT's s8×s8→s32 product, Kim et al. 2021). The JAX kernel runs the int8 dot of the
raw codes and adds the zero-point terms (`kernel`).
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


def _sum_over(x, contract, batch, n_other_free, other_first):
  """Σ of int8 codes x over its axes `contract` (int32), laid out to broadcast against
  the dot_general output (batch, a's free, b's free): x's batch axes first, then its free
  axes in order, with `n_other_free` unit axes for the other operand's free axes after
  the batch axes (`other_first`, x = b) or at the end (x = a)."""
  s = jnp.sum(x.astype(jnp.int32), axis=contract)
  kept = [d for d in range(x.ndim) if d not in contract]
  free = [d for d in kept if d not in batch]
  s = jnp.transpose(s, [kept.index(d) for d in list(batch) + free])
  nb = len(batch)
  ones = (1,) * n_other_free
  shape = (s.shape[:nb] + ones + s.shape[nb:]) if other_first else (s.shape + ones)
  return s.reshape(shape)


def kernel(op, arr, a, b):
  """Σ(a − zp_a)(b − zp_b) as an s8×s8→s32 dot_general of the raw int8 codes and the
  exact zero-point terms, Σab − zp_b·Σa − zp_a·Σb + K·zp_a·zp_b: XLA:CPU runs an int8
  dot through its fast library path, an int32 one as a plain loop. The int32 adds and
  products wrap modulo 2^32 and the exact result fits int32 (emit's bound), so the sum
  is exact whatever the intermediate terms. Operands that are not both int8 take the
  int32 dot of the centered codes (|x| ≤ 2^16 − 1 there, with emit's bound)."""
  lc, rc = tuple(op["contract_lhs"]), tuple(op["contract_rhs"])
  lb, rb = tuple(op["batch_lhs"]), tuple(op["batch_rhs"])
  dims = ((lc, rc), (lb, rb))
  za, zb = int(op["zp_a"]), int(op["zp_b"])
  if a.dtype != jnp.int8 or b.dtype != jnp.int8:
    xa = a.astype(jnp.int32) - jnp.int32(za)
    xb = b.astype(jnp.int32) - jnp.int32(zb)
    return lax.dot_general(xa, xb, dims, preferred_element_type=jnp.int32)
  acc = lax.dot_general(a, b, dims, precision=lax.Precision.DEFAULT,
                        preferred_element_type=jnp.int32)
  n_free_a = a.ndim - len(lc) - len(lb)
  n_free_b = b.ndim - len(rc) - len(rb)
  if zb:
    acc = acc - jnp.int32(zb) * _sum_over(a, lc, lb, n_free_b, other_first=False)
  if za:
    acc = acc - jnp.int32(za) * _sum_over(b, rc, rb, n_free_a, other_first=True)
  if za and zb:
    k = int(np.prod([a.shape[d] for d in lc]))
    acc = acc + jnp.int32((k * za * zb + 2 ** 31) % 2 ** 32 - 2 ** 31)
  return acc


OP = Op(
    kind="matmul", summary="products of two activations (attention)",
    graph_ops={"matmul": GraphOp(fields=("zp_a", "zp_b", "contract_lhs", "contract_rhs",
                                         "batch_lhs", "batch_rhs"), arity=2, kernel=kernel)},
    primitives=("dot_general",), trace=trace, evaluate=evaluate, emit=emit)

OPS = (OP,)
