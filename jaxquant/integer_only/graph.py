"""The integer program's op set and its on-disk format (a JSON graph + an npz of arrays).

A program maps int8 input codes to int32 logits. Every tensor is an integer array whose
axis 0 is the batch; shapes below omit it. Two kinds of value flow between ops:
  codes  int8 (int16 on a wide residual path, or the int32 logits) on a grid:
         real = scale·(code − zp).
  acc    int32 accumulators: real = scale·acc with a per-element (broadcast) scale that
         only the converter knows; it is folded into the requantization multiplier.

Core ops produce `acc = sign·raw + bias` (the epilogue: `sign` ∈ {−1, 0, 1} and `bias`
int32 arrays that broadcast against raw, each optional); raw is the op's own result.
Each op's semantics is written in its module under ops/ (the op set is the registry's
`GRAPH_OPS`): dot / conv (ops/contract.py), add, sum (reduce_sum.py), identity, norm,
reshape / transpose (layout.py). One op belongs to the format itself:
  requant   codes = clamp(RQ(acc), lo − zp, hi − zp) + zp, as `dtype` ('int8',
            'int16' (the wide residual paths into normalizations, which only adds and
            norms read) or 'int32'), RQ(x) = RDBPOT(SRDHM(SaturatingLeftShift(x, left) + offset, m0),
            right) (fixed_point.requantize); m0, left, right and the optional offset (a
            bias in units of 2^-left of acc) are int32 arrays broadcasting against acc.

Files: `graph.json` {"format", "version", "input": {shape, scale, inv_scale, zp, qmin,
qmax}, "output": {tensor, scale}, "ops": [{op, out, in: [...], layer, fields...}]} and
`arrays.npz`, where an array-valued field holds the npz key of its array. The input
boundary (the one float step): codes = clip(round_half_even(x·inv_scale) + zp, qmin,
qmax), float32 product with the stored float32 `inv_scale`; NaN → zp.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from jaxquant.integer_only import ops

FORMAT = "jaxquant.integer_program"
VERSION = 1
REQUANT_FIELDS = ("m0", "left", "right", "zp", "lo", "hi", "dtype")
REQUANT_ARRAYS = ("m0", "left", "right", "offset")
REQUANT_DTYPES = ("int8", "int16", "int32")
CORE_OPS = tuple(name for name, op in ops.GRAPH_OPS.items() if op.core)
# Fields (besides 'op', 'out', 'in', 'layer') each op must have; array fields name npz keys.
FIELDS = {**{name: op.fields for name, op in ops.GRAPH_OPS.items()},
          "requant": REQUANT_FIELDS}
ARRAY_FIELDS = {**{name: op.arrays for name, op in ops.GRAPH_OPS.items() if op.arrays},
                "requant": REQUANT_ARRAYS}
EPILOGUE_FIELDS = ("sign", "bias")  # optional, core ops only
ARITY = {name: op.arity for name, op in ops.GRAPH_OPS.items() if op.arity != 1}


@dataclasses.dataclass(frozen=True)
class Graph:
  """An integer program: ops in execution order and the arrays they reference."""
  input: Mapping[str, Any]
  output: Mapping[str, Any]
  ops: Tuple[Mapping[str, Any], ...]
  arrays: Mapping[str, np.ndarray]

  def array(self, op: Mapping[str, Any], field: str):
    """The array an op's field names, or None when the (optional) field is absent."""
    key = op.get(field)
    return None if key is None else self.arrays[key]


def validate(graph: Graph) -> None:
  """Raises ValueError naming the op (and its layer) that is malformed."""
  defined = {"input"}
  for i, op in enumerate(graph.ops):
    kind = op.get("op")
    where = f"op {i} ({kind!r}, out={op.get('out')!r}, layer={op.get('layer', '')!r})"
    if kind not in FIELDS:
      raise ValueError(f"{where}: unknown op; choose one of {sorted(FIELDS)}")
    missing = [f for f in ("out", "in") + FIELDS[kind] if f not in op]
    if missing:
      raise ValueError(f"{where}: missing fields {missing}")
    if len(op["in"]) != ARITY.get(kind, 1):
      raise ValueError(f"{where}: takes {ARITY.get(kind, 1)} inputs, got {op['in']}")
    for name in op["in"]:
      if name not in defined:
        raise ValueError(f"{where}: input {name!r} is not defined by an earlier op")
    fields = ARRAY_FIELDS.get(kind, ()) + (EPILOGUE_FIELDS if kind in CORE_OPS else ())
    for f in fields:
      if op.get(f) is not None and op[f] not in graph.arrays:
        raise ValueError(f"{where}: array {op[f]!r} (field {f!r}) is not in the arrays")
    if kind == "requant" and op["dtype"] not in REQUANT_DTYPES:
      raise ValueError(f"{where}: dtype {op['dtype']!r} is not one of {REQUANT_DTYPES}")
    if op["out"] in defined:
      raise ValueError(f"{where}: tensor {op['out']!r} is defined twice")
    defined.add(op["out"])
  if graph.output.get("tensor") not in defined:
    raise ValueError(f"output tensor {graph.output.get('tensor')!r} is not defined")


def save(graph: Graph, directory: str) -> None:
  """Writes `graph.json` and `arrays.npz` into `directory` (created if missing)."""
  validate(graph)
  os.makedirs(directory, exist_ok=True)
  doc = {"format": FORMAT, "version": VERSION, "input": dict(graph.input),
         "output": dict(graph.output), "ops": [dict(op) for op in graph.ops]}
  with open(os.path.join(directory, "graph.json"), "w") as f:
    json.dump(doc, f, indent=1)
  np.savez(os.path.join(directory, "arrays.npz"), **{k: np.asarray(v) for k, v in graph.arrays.items()})


def load(directory: str) -> Graph:
  """Reads a directory written by `save`."""
  with open(os.path.join(directory, "graph.json")) as f:
    doc = json.load(f)
  if doc.get("format") != FORMAT or doc.get("version") != VERSION:
    raise ValueError(f"{directory}: not a {FORMAT} v{VERSION} directory "
                     f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
  with np.load(os.path.join(directory, "arrays.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  graph = Graph(doc["input"], doc["output"], tuple(doc["ops"]), arrays)
  validate(graph)
  return graph


def integer_arrays(graph: Graph) -> Dict[str, np.ndarray]:
  """The arrays, checked to be integer (the program holds no float tensor)."""
  for k, v in graph.arrays.items():
    if not np.issubdtype(np.asarray(v).dtype, np.integer):
      raise ValueError(f"array {k!r} has dtype {np.asarray(v).dtype}; programs hold integers only")
  return dict(graph.arrays)
