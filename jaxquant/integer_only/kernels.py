"""JAX execution of an integer program (`graph.Graph`): integer dtypes only.

Each op's kernel is its `GraphOp.kernel` (ops/; the int8 contractions run as XLA
s8×s8→s32 dot / conv, ops/contract.py); the format's own `requant` is here.
`run_graph` threads the tensors.

Fusion fences. XLA fuses elementwise chains into every consumer that reads them and
duplicates them there when it thinks them cheap, which integer shifts, adds and selects
always are. In an integer program the codes after a normalization are an elementwise
function of its input and its (materialized) row statistics, and the residual add after
it is elementwise too, so without a fence each layer's fusions recompute the whole
residual stream back to the embedding: optimized HLO and compile time grow
quadratically with depth (all-MiniLM-L6-v2 at 2 of its 6 layers: 29k HLO lines, 25 s
compile, 6.6 times the 1-layer program) and so does the run time. XLA does not
duplicate an integer division by a value it cannot see (`xla/service/
instruction_fusion.cc`, `IsExpensive`), so `run_graph` divides each requantized tensor
that an op other than a contraction reads by `one`, a run-time int32 scalar 1 passed
as an argument of the jitted program: the values are unchanged (x / 1 = x), and the
tensor is computed once and stored, as an integer runtime would store it. Tensors only
contractions read need no fence (a dot / conv operand is materialized anyway).
`lax.optimization_barrier` in place of the division does not stop the duplication: with
it, the 6-layer MiniLM program is 177k HLO lines, compiles in 161 s and runs 19x float
at batch 8 (32k lines, 6.6 s and 1.45x with the division; `python -m
experiments.integer_profile --layers=6`, 2-core Intel Xeon).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp
from jax import lax

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


CONTRACTIONS = ("dot", "conv", "matmul")  # ops whose operands XLA materializes


def fenced_tensors(graph: g.Graph) -> frozenset:
  """The requant outputs that an op other than a contraction reads (see the module
  docstring): the tensors `run_graph` fences."""
  readers: Dict[str, set] = {}
  for op in graph.ops:
    for name in op["in"]:
      readers.setdefault(name, set()).add(op["op"])
  return frozenset(op["out"] for op in graph.ops if op["op"] == "requant"
                   and readers.get(op["out"], set()) - set(CONTRACTIONS))


def run_graph(graph: g.Graph, x_q: jax.Array, arrays: Mapping[str, Any] = None,
              one: Any = None) -> jax.Array:
  """Runs the program on int8 codes `x_q` (batch first); returns the output tensor.

  `arrays` replaces `graph.arrays` (e.g. device arrays passed as jit arguments). `one`:
  an int32 scalar equal to 1 at run time, a jit argument (not a constant), through which
  the tensors `fenced_tensors` names are divided: a fusion fence that changes no value
  (module docstring); None: no fences."""
  arrays = graph.arrays if arrays is None else arrays
  arr = lambda op, field: None if op.get(field) is None else jnp.asarray(arrays[op[field]])
  fenced = fenced_tensors(graph) if one is not None else frozenset()
  env = {"input": x_q}
  for op in graph.ops:
    out = KERNELS[op["op"]](op, arr, *(env[name] for name in op["in"]))
    if op["op"] in g.CORE_OPS:
      sign, bias = arr(op, "sign"), arr(op, "bias")
      if sign is not None:
        out = out * sign
      if bias is not None:
        out = out + bias
    if op["out"] in fenced:
      out = lax.div(out, jnp.asarray(one, jnp.int32).astype(out.dtype))
    env[op["out"]] = out
  return env[graph.output["tensor"]].astype(jnp.int32)  # the logits are int32
