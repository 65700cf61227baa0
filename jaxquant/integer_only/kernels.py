"""JAX execution of an integer program (`graph.Graph`): integer dtypes only.

Each op's kernel is its `GraphOp.kernel` (ops/; the int8 contractions run as XLA
s8×s8→s32 dot / conv, ops/contract.py); the format's own `requant` is here.
`run_graph` threads the tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only import graph as g
from jaxquant.integer_only import ops


def _requant(op, arr, acc):
  y = fp.requantize(acc, arr(op, "m0"), arr(op, "left"), arr(op, "right"), arr(op, "offset"))
  zp = op["zp"]
  y = jnp.clip(y, op["lo"] - zp, op["hi"] - zp) + jnp.int32(zp)
  return y.astype({"int8": jnp.int8, "int16": jnp.int16}.get(op["dtype"], jnp.int32))


KERNELS: Dict[str, Callable] = {
    **{name: op.kernel for name, op in ops.GRAPH_OPS.items()}, "requant": _requant}


def run_graph(graph: g.Graph, x_q: jax.Array, arrays: Mapping[str, Any] = None) -> jax.Array:
  """Runs the program on int8 codes `x_q` (batch first); returns the output tensor.

  `arrays` replaces `graph.arrays` (e.g. device arrays passed as jit arguments)."""
  arrays = graph.arrays if arrays is None else arrays
  arr = lambda op, field: None if op.get(field) is None else jnp.asarray(arrays[op[field]])
  env = {"input": x_q}
  for op in graph.ops:
    out = KERNELS[op["op"]](op, arr, *(env[name] for name in op["in"]))
    if op["op"] in g.CORE_OPS:
      sign, bias = arr(op, "sign"), arr(op, "bias")
      if sign is not None:
        out = out * sign
      if bias is not None:
        out = out + bias
    env[op["out"]] = out
  return env[graph.output["tensor"]].astype(jnp.int32)  # the logits are int32
