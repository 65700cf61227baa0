"""'embed': an nn.Embed lookup of the program's int32 token ids.

nn.Embed gathers rows through jnp.take, which jax keeps as a call named `_take`; that
call on the ids input (a constant table) is matched whole. The table is stored as int8
codes with one symmetric absmax scale per column (the accumulator scale must not depend
on the id, so a per-row scale cannot be folded into the requantization after it).
Program op `embed`: acc = table[clip(ids, 0, V − 1)] (int8 rows as int32, shape
ids.shape + (D,)); position / type embeddings added after it are constants and fold
into the requantization's offset.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only.ir import Const, Tensor
from jaxquant.integer_only.ops.base import GraphOp, Op


def table_codes(table: np.ndarray):
  """(int8 codes, per-column scale [D]) of a float table: round(t/s), s = max|t|/127."""
  scale = np.max(np.abs(table), axis=0).astype(np.float64) / 127.0
  scale = np.where(scale > 0, scale, 1.0)
  codes = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
  return codes, scale


def match(eqns, i):
  """(1, ids) for a `_take` call (nn.Embed's lookup) of a table by ids."""
  eqn = eqns[i]
  if eqn.primitive.name not in ("jit", "pjit") or eqn.params.get("name") != "_take":
    return None
  if len(eqn.invars) != 2 or len(eqn.outvars[0].aval.shape) != len(eqn.invars[1].aval.shape) + 1:
    return None
  return 1, eqn.invars[1]


def trace_match(tracer, x, eqns, path, read):
  table = read(eqns[0].invars[0])
  if not isinstance(table, Const) or table.value.ndim != 2:
    return tracer.fail("a lookup in a table that is not a constant matrix", path)
  if not isinstance(x, Tensor) or tracer.nodes[x.node].kind != "input":
    return tracer.fail("an embedding lookup of anything but the int32 ids input", path)
  return tracer.core_lazy("embed", [x.node], tuple(eqns[0].outvars[0].aval.shape), path,
                          table=np.asarray(table.value, np.float32))


def evaluate(node, ins, ctx):
  codes, scale = table_codes(node.attrs["table"])
  ids = np.clip(ins[0].astype(np.int64), 0, codes.shape[0] - 1)
  return (codes[ids] * scale).astype(np.float32)


def needs_range(emitter, node):
  return []


def emit(emitter, node):
  """(embed op, per-column table scale, bound 127); the ids are the program input."""
  ids = node.inputs[0]
  t = emitter.emit(ids, emitter.natural(ids))
  codes, scale = table_codes(node.attrs["table"])
  emitter.arrays[f"{emitter.name()}.table"] = codes
  op = {"op": "embed", "in": [t], "layer": node.layer, "table": f"{emitter.name()}.table"}
  return op, scale.reshape((1,) * (len(node.shape) - 1) + scale.shape), 127.0


def kernel(op, arr, ids):
  table = arr(op, "table")
  return jnp.take(table, jnp.clip(ids, 0, table.shape[0] - 1), axis=0).astype(jnp.int32)


OP = Op(
    kind="embed", summary="nn.Embed lookups of int32 token ids",
    graph_ops={"embed": GraphOp(fields=("table",), arrays=("table",), kernel=kernel)},
    match=match, trace_match=trace_match, evaluate=evaluate, emit=emit,
    needs_range=needs_range)

OPS = (OP,)
