"""What an integer-only op declares: `Op` (one IR node kind) and `GraphOp` (one op of the
program format), each in one place.

An op module (e.g. `ops/reduce_sum.py`) builds one or more `Op` values; `ops/__init__.py`
lists the modules and the pipeline asks the registry for everything op-specific:
  trace.py    `primitives` + `trace`   (or `modules` + `trace_module`): jaxpr → IR node
  measure.py  `evaluate`               its float semantics, for range measurement
  emit.py     `emit`                   the graph op, its accumulator scale, a bound on |acc|
              `needs_range`            which inputs must have a measured grid
  graph.py    `graph_ops[name].fields / arrays / arity / core`   the file format
  kernels.py  `graph_ops[name].kernel` the JAX integer kernel
The numpy runtime (jaxquant/deploy/numpy_runtime.py) keeps its own kernels, keyed by the
graph op's name; it imports nothing from here.

The objects the hooks receive (`tracer`, `emitter`, `ctx`) are documented on the hooks;
they use only the public-looking names listed there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class GraphOp:
  """One op of the integer program format (graph.json).

  Attributes:
    fields: the fields (besides 'op', 'out', 'in', 'layer') every instance must have.
    arrays: the fields that name npz arrays (a subset of `fields`, or optional ones).
    arity: how many input tensors it takes.
    core: True when it yields an int32 accumulator that may carry the epilogue
      `acc = sign·raw + bias` and is then requantized; False for an op that keeps its
      input's codes and grid (reshape, transpose, max pooling).
    kernel: the JAX integer kernel, `kernel(op, arr, *inputs) -> array`, where
      `arr(op, field)` is the jnp array an array field names (None when absent).
  """
  fields: Tuple[str, ...]
  kernel: Callable[..., Any]
  arrays: Tuple[str, ...] = ()
  arity: int = 1
  core: bool = True


def all_inputs(emitter, node) -> List[int]:
  """The default `needs_range`: every input's natural grid is used."""
  return list(node.inputs)


@dataclasses.dataclass(frozen=True)
class Op:
  """One IR node kind: how it is traced, measured, emitted and run.

  Attributes:
    kind: the IR node kind (`ir.Node.kind`).
    summary: a few words for the list of supported ops in refusals.
    graph_ops: {name: GraphOp} of the program ops it emits.
    primitives: the jax primitive names `trace` is offered (an equation with at least
      one activation operand).
    trace: `trace(tracer, eqn, vals, path)` → an IR value (`ir.Tensor` / `ir.Lazy`), an
      `ir.Bad` (refused, with the reason), or None (not this op's case; the next op
      declaring the primitive, then the generic refusal, is tried). `vals` are the
      operands (`ir.Const` for constants). The tracer offers `materialize(v) -> node id`,
      `core_lazy(kind, inputs, shape, layer, **attrs) -> Lazy` (a core node whose
      output gets a requantization), `node(kind, inputs, shape, layer, **attrs) -> id`
      (a tensor node), `shape_of(v)`, `fail(why, layer)`, `nodes` and `params` (the
      float parameters tree).
    modules: Linen module types whose whole `__call__` becomes one node (normalizations,
      recognized by module path in the equations' name stack).
    trace_module: `trace_module(tracer, x, path, module)` for those.
    evaluate: `evaluate(node, inputs, ctx)` → the node's float32 value from its inputs'
      (numpy); `ctx.weights(node)` is a layer's dequantized kernel, `ctx.input_grid(node)`
      the grid its input is fake-quantized on (None: float).
    emit: `emit(emitter, node)` → (graph op dict without 'out', accumulator scale
      (broadcasting against the output), bound on |acc|) for a core op; for a
      grid-keeping op (`structural`), `emit(emitter, node, tensor)` → the op dict that
      maps the input tensor's name to the output on the same grid. The emitter offers
      `natural(i) -> Grid`, `emit(i, grid) -> tensor name`, `demand` ({node: Grid}),
      `layers` ({node: ir.Layer}), `ir`, `arrays`, `name()` (the next op's output name).
    needs_range: `needs_range(emitter, node)` → the input node ids whose natural grid
      (a measured range, unless QAT gives one) the op uses.
    structural: True for an op whose output is its input's codes on the same grid
      (no requantization): max commutes with monotone quantization, reshapes move codes.
    layer: optional `layer(node, rules, variables) -> ir.Layer` for an op with
      weights (its codes, scale and input grid from the QAT rules).
    kernel_scale: optional `kernel_scale(node, layer)`: the weight scale in the kernel's
      own layout (to dequantize it for range measurement).
    match: optional `match(eqns, i)` → (n, x) when equations eqns[i:i+n] are this op's
      multi-primitive pattern (softmax, GELU: functions jax inlines) applied to jaxpr
      variable x, else None; the pattern's inner values must not be used elsewhere.
    trace_match: `trace_match(tracer, x, eqns, path, read)` → the IR value of a matched
      pattern (x the traced value of its input; `read(var)` any other variable's), like
      `trace`.
  """
  kind: str
  summary: str
  graph_ops: Mapping[str, GraphOp]
  evaluate: Callable[..., np.ndarray]
  emit: Callable[..., Any]
  primitives: Tuple[str, ...] = ()
  trace: Optional[Callable[..., Any]] = None
  modules: Tuple[type, ...] = ()
  trace_module: Optional[Callable[..., Any]] = None
  needs_range: Callable[..., List[int]] = all_inputs
  structural: bool = False
  layer: Optional[Callable[..., Any]] = None
  kernel_scale: Optional[Callable[..., Any]] = None
  match: Optional[Callable[..., Any]] = None
  trace_match: Optional[Callable[..., Any]] = None


def check(ops: List[Op]) -> Dict[str, Op]:
  """{kind: op}, with duplicate kinds or graph op names refused."""
  by_kind: Dict[str, Op] = {}
  names = set()
  for op in ops:
    if op.kind in by_kind:
      raise ValueError(f"integer-only op kind {op.kind!r} is declared twice")
    for name in op.graph_ops:
      if name in names:
        raise ValueError(f"graph op {name!r} is declared by two integer-only ops")
      names.add(name)
    if op.modules and op.trace_module is None:
      raise ValueError(f"op {op.kind!r} declares modules but no trace_module")
    if op.primitives and op.trace is None:
      raise ValueError(f"op {op.kind!r} declares primitives but no trace")
    if op.match is not None and op.trace_match is None:
      raise ValueError(f"op {op.kind!r} declares match but no trace_match")
    by_kind[op.kind] = op
  return by_kind
