"""The integer program's op set and its on-disk format (a JSON graph + an npz of arrays).

A program maps int8 input codes to int32 logits. Every tensor is an integer array whose
axis 0 is the batch; shapes below omit it. Two kinds of value flow between ops:
  codes  int8 (or the int32 logits) on a grid: real = scale·(code − zp).
  acc    int32 accumulators: real = scale·acc with a per-element (broadcast) scale that
         only the converter knows; it is folded into the requantization multiplier.

Core ops produce `acc = sign·raw + bias` (the epilogue: `sign` ∈ {−1, 0, 1} and `bias`
int32 arrays that broadcast against raw, each optional), where raw is:
  dot       Σ_k (x − zp)·w over x axes `contract_lhs` and w axes `contract_rhs`
            (lax.dot_general order: x's free axes, then w's free axes). w: int8.
  conv      Σ_window (x − zp)·w, x padded with zp (real 0) by `padding`, strides
            `strides`, kernel dilation `rhs_dilation`, lax dimension numbers `lhs_spec`,
            `rhs_spec`, `out_spec` (batch, feature, spatial... order of each operand).
  add       MBQM((a − zp_a)·sign_a·2^L, m0_a, e_a) + MBQM((b − zp_b)·sign_b·2^L, m0_b, e_b)
            with L = `left_shift`; MBQM is fixed_point.multiply_by_quantized_multiplier.
  sum       Σ (x − zp) over `axes` (axes removed).
  identity  x − zp.
  norm      the integer group / layer normalization below; output t ≈ 2^T·(x − mean)/σ.
Then
  requant   codes = clamp(RQ(acc), lo − zp, hi − zp) + zp, as `dtype` ('int8' or
            'int32'), RQ(x) = RDBPOT(SRDHM(SaturatingLeftShift(x, left) + offset, m0),
            right) (fixed_point.requantize); m0, left, right and the optional offset (a
            bias in units of 2^-left of acc) are int32 arrays broadcasting against acc.
  reshape   to (batch,) + `shape`.     transpose  by `perm` (perm[0] = 0).

norm (Jacob et al. give none; this follows I-BERT's idea of an integer square root,
Kim et al. 2021, with our own fixed-point layout). The input (B, *S, C) is viewed as
(B, *S, G, C/G) (G = `groups`) and reduced over the view axes `reduce`; n = elements
per group. With x = q − zp, rdiv = division rounding to nearest, ties away from zero,
and P, F, A = `sigma_bits`, `mean_bits`, `pre_shift` (7, 8, 13; T = F + A − P − 1):
  S1 = Σx;  μ = rdiv(S1, n);  S2 = Σ(x − μ)²;  r = S1 − n·μ;  V = S2 − rdiv(r², n)
  var = floor(V / n)·2^(2P) + rdiv((V mod n)·2^(2P), n)          (variance · 2^(2P))
  σ = max(isqrt(var + E), 1)   with E = `eps` = round(ε/s_in²·2^(2P)) clamped to 2^30
  inv = floor(2^30 / σ);  x_F = x·2^F − rdiv(S1·2^F, n);  t = SRDHM(x_F·2^A, inv)
Every intermediate fits int32 for n ≤ 16384 (checked by the converter).

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

FORMAT = "jaxquant.integer_program"
VERSION = 1
NORM_SIGMA_BITS, NORM_MEAN_BITS, NORM_PRE_SHIFT = 7, 8, 13
NORM_OUT_BITS = NORM_MEAN_BITS + NORM_PRE_SHIFT - NORM_SIGMA_BITS - 1  # T = 13
NORM_MAX_GROUP = 16384
ADD_LEFT_SHIFT = 20
CORE_OPS = ("dot", "conv", "add", "sum", "identity", "norm")
# Fields (besides 'op', 'out', 'in', 'layer') each op must have; array fields name npz keys.
FIELDS = {
    "dot": ("zp", "w", "contract_lhs", "contract_rhs"),
    "conv": ("zp", "w", "strides", "padding", "rhs_dilation", "lhs_spec", "rhs_spec",
             "out_spec"),
    "add": ("zp_a", "zp_b", "sign_a", "sign_b", "m0_a", "e_a", "m0_b", "e_b", "left_shift"),
    "sum": ("zp", "axes"),
    "identity": ("zp",),
    "norm": ("zp", "groups", "reduce", "eps", "sigma_bits", "mean_bits", "pre_shift"),
    "requant": ("m0", "left", "right", "zp", "lo", "hi", "dtype"),
    "reshape": ("shape",),
    "transpose": ("perm",),
}
ARRAY_FIELDS = {"dot": ("w",), "conv": ("w",), "requant": ("m0", "left", "right", "offset")}
EPILOGUE_FIELDS = ("sign", "bias")  # optional, core ops only
ARITY = {"add": 2}


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
