"""`to_integer`: a QAT model (or a float one) → an integer-only program.

1. trace.py turns the float model's forward pass into an IR of core ops (contractions,
   adds, sums, normalizations) with folded affine maps and clamps (biases, BatchNorm,
   ReLU / ReLU6, 1/n of a mean).
2. Each contraction gets its QAT weight codes (`qat_view.weight_codes`: jq.quantize with
   the rule's weight spec, learned LSQ steps included) and its QAT input grid (learned
   LSQ / PACT, jq.calibrate's static range, else the training EMA). Layers no rule
   quantizes get per-channel int8 weights and a calibrated input grid.
3. measure.py evaluates the IR on `calibration_batches` as QAT computes it and records
   the range of every tensor that QAT gives no grid: int8 asymmetric per-tensor grids.
4. emit.py writes the graph: requantization points, accumulators, the int32 output.
Every int32 intermediate is bounded at conversion time; a bound at or past 2^31 raises
IntegerOnlyError naming the layer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax
import numpy as np

from jaxquant import formats
from jaxquant.integer_only import graph as g
from jaxquant.integer_only import measure
from jaxquant.integer_only import qat_view
from jaxquant.integer_only import trace as tr
from jaxquant.integer_only.emit import OUTPUT, Emitter, Grid, Layer, grid_from_spec
from jaxquant.integer_only.ir import IntegerOnlyError, Node
from jaxquant.spec import QuantSpec

DEFAULT_WEIGHT = QuantSpec(bits=8)  # layers no rule quantizes: per-channel int8


def _resolve_layer(node: Node, rules, variables) -> Layer:
  path = node.layer
  rule = qat_view.rule_for(rules, path)
  w_spec = rule.weight if rule is not None and rule.weight is not None else DEFAULT_WEIGHT
  where = f"layer {path!r}"
  if not w_spec.is_integer:
    raise IntegerOnlyError(f"{where}: weight format {w_spec.format!r} has no integer codes; "
                           "integer programs need int / binary / ternary weights")
  if w_spec.granularity == "group" or not w_spec.symmetric:
    raise IntegerOnlyError(f"{where}: weights with granularity={w_spec.granularity!r}, "
                           f"symmetric={w_spec.symmetric} cannot share one int32 accumulator "
                           "per output; use symmetric per-channel or per-tensor weights")
  a = node.attrs
  w = a["w"]
  if a["op"] == "dot":
    axes = tuple(a["contract_rhs"])
  elif w_spec.granularity == "tensor":
    axes = tuple(range(w.ndim))
  else:
    axes = tuple(d for d in range(w.ndim) if d != a["rhs_spec"][0])
  codes, scale, _ = qat_view.weight_codes(w, w_spec, axes, variables, path)
  rank = len(node.shape)
  if a["op"] == "dot":
    free = [d for d in range(w.ndim) if d not in axes]
    w_scale = np.transpose(scale, axes + tuple(free)).reshape(
        (1,) * (rank - len(free)) + tuple(scale.shape[d] for d in free))
  else:
    shape = [1] * rank
    shape[a["out_spec"][1]] = scale.size
    w_scale = scale.reshape(shape)
  act = None if rule is None else rule.act
  source = None
  if act is not None:
    if not formats.get(act.format).uniform_int or not act.is_integer:
      raise IntegerOnlyError(f"{where}: activation format {act.format!r} (bits={act.bits}) "
                             "has no integer-only lowering; use format='int' activations "
                             "of 2..8 bits")
    source = qat_view.act_range(act, variables, path)
  return Layer(codes, w_scale, act, source)


def _batches(calibration_batches) -> List[np.ndarray]:
  if calibration_batches is None:
    return []
  out = []
  for b in calibration_batches:
    if isinstance(b, dict):
      b = b["x"]
    elif isinstance(b, (tuple, list)):
      b = b[0]
    out.append(np.asarray(b))
  return out


def build_graph(qmodel, variables, calibration_batches, *, example=None,
                apply_kwargs=None) -> Tuple[g.Graph, Dict[str, Any]]:
  """(integer graph, info) for `to_integer`; see program.to_integer."""
  batches = _batches(calibration_batches)
  if example is None and not batches:
    raise IntegerOnlyError("to_integer needs calibration_batches (at least one batch of "
                           "inputs), or example= (an input array) when every tensor has a "
                           "range in the variables")
  first = np.asarray(example) if example is not None else batches[0]
  float_model = qat_view.float_model_of(qmodel)
  rules = qat_view.rules_of(qmodel)
  variables = qat_view.plain(variables)
  if "params" not in variables:
    raise IntegerOnlyError("variables has no 'params' collection")
  ir = tr.trace(float_model, qat_view.float_variables(variables),
                jax.ShapeDtypeStruct(first.shape, first.dtype), apply_kwargs)
  layers = {n.id: _resolve_layer(n, rules, variables) for n in ir.nodes if n.kind == "contract"}
  demand: Dict[int, Grid] = {}
  to_measure: Dict[int, QuantSpec] = {}  # contract id → act spec whose grid is measured
  for cid, layer in layers.items():
    if layer.act_spec is None:
      continue
    if layer.source is None:
      to_measure[cid] = layer.act_spec
    else:
      demand[cid] = grid_from_spec(layer.act_spec, *qat_view.grid_of(layer.act_spec,
                                                                      layer.source))
  deq = {cid: (l.codes * _kernel_scale(ir.nodes[cid], l)).astype(np.float32)
         for cid, l in layers.items()}
  ranges, samples = {}, {}
  if batches:
    keep = tuple(ir.nodes[c].inputs[0] for c in to_measure)
    ranges, samples = measure.measure_ranges(ir, batches, lambda n: deq[n.id],
                                             lambda n: demand.get(n.id), keep)
  for cid, spec in to_measure.items():
    src = ir.nodes[cid].inputs[0]
    if src not in samples:
      raise IntegerOnlyError(f"layer {ir.nodes[cid].layer!r} has an activation spec but "
                             "the variables hold no range for it (no jq.calibrate, no "
                             "training EMA): pass calibration_batches to measure it")
    demand[cid] = grid_from_spec(spec, *qat_view.measured_grid(spec, samples[src]))
  em = Emitter(ir, layers, demand, ranges, bool(batches))
  em.check_ranges()
  input_grid = em.natural(ir.input)
  out = em.emit(ir.output, OUTPUT)
  graph = g.Graph(
      input={"shape": list(ir.nodes[ir.input].shape[1:]), "scale": input_grid.scale,
             "inv_scale": float(np.float32(1.0 / input_grid.scale)), "zp": input_grid.zp,
             "qmin": input_grid.qmin, "qmax": input_grid.qmax},
      output={"tensor": out, "scale": em.output_scale},
      ops=tuple(em.ops), arrays=em.arrays)
  g.validate(graph)
  return graph, {"ir": ir, "demand": demand, "ranges": ranges}


def _kernel_scale(node: Node, layer: Layer) -> np.ndarray:
  """The weight scale in the kernel's own layout (for dequantized calibration weights)."""
  a = node.attrs
  w = layer.codes
  if a["op"] == "conv":
    shape = [1] * w.ndim
    shape[a["rhs_spec"][0]] = layer.w_scale.size
    return layer.w_scale.reshape(shape)
  free = [d for d in range(w.ndim) if d not in a["contract_rhs"]]
  shape = [1] * w.ndim
  s = layer.w_scale.reshape(layer.w_scale.shape[len(layer.w_scale.shape) - len(free):])
  for d, size in zip(free, s.shape):
    shape[d] = size
  return s.reshape(shape)
