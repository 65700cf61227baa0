"""`to_integer`: a QAT model (or a float one) → an integer-only program.

1. trace.py turns the float model's forward pass into an IR of core ops (contractions,
   adds, sums, normalizations) with folded affine maps and clamps (biases, BatchNorm,
   ReLU / ReLU6, 1/n of a mean).
2. Each layer (an op with weights: `Op.layer`, ops/contract.py) gets its QAT weight
   codes (`qat_view.weight_codes`: jq.quantize with the rule's weight spec, learned LSQ
   steps included) and its QAT input grid (learned LSQ / PACT, jq.calibrate's static
   range, else the training EMA). Layers no rule quantizes get per-channel int8 weights
   and a calibrated input grid.
3. measure.py evaluates the IR on `calibration_batches` as QAT computes it and records
   the range of every tensor that QAT gives no grid: int8 asymmetric per-tensor grids.
4. emit.py writes the graph: requantization points, accumulators, the int32 output
   (with residual_bits=16, the residual paths into normalizations as int16 codes).
Every int32 intermediate is bounded at conversion time; a bound at or past 2^31 raises
IntegerOnlyError naming the layer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax
import numpy as np

from jaxquant.integer_only import graph as g
from jaxquant.integer_only import measure
from jaxquant.integer_only import ops
from jaxquant.integer_only import qat_view
from jaxquant.integer_only import trace as tr
from jaxquant.integer_only.emit import OUTPUT, RESIDUAL_BITS, Emitter, Grid, grid_from_spec
from jaxquant.integer_only.ir import IntegerOnlyError
from jaxquant.spec import QuantSpec

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
                apply_kwargs=None, residual_bits: int = 8) -> Tuple[g.Graph, Dict[str, Any]]:
  """(integer graph, info) for `to_integer`; see program.to_integer."""
  if residual_bits not in RESIDUAL_BITS:
    raise ValueError(f"residual_bits={residual_bits!r} must be one of {RESIDUAL_BITS}")
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
                jax.ShapeDtypeStruct(first.shape, first.dtype), apply_kwargs,
                **qat_view.trace_names(float_model))
  layers = {n.id: ops.get(n.kind).layer(n, rules, variables) for n in ir.nodes
            if n.kind not in ("input", "affine") and ops.get(n.kind).layer is not None}
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
  kernel_scale = lambda n, l: ops.get(n.kind).kernel_scale(n, l)
  deq = {cid: (l.codes * kernel_scale(ir.nodes[cid], l)).astype(np.float32)
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
  em = Emitter(ir, layers, demand, ranges, bool(batches), residual_bits)
  em.check_ranges()
  input_grid = em.natural(ir.input)
  out = em.emit(ir.output, OUTPUT)
  if np.dtype(ir.input_dtype) == np.int32:  # token ids, taken as they are
    input_spec = {"shape": list(ir.nodes[ir.input].shape[1:]), "dtype": "int32"}
  else:
    input_spec = {"shape": list(ir.nodes[ir.input].shape[1:]), "scale": input_grid.scale,
                  "inv_scale": float(np.float32(1.0 / input_grid.scale)),
                  "zp": input_grid.zp, "qmin": input_grid.qmin, "qmax": input_grid.qmax}
  graph = g.Graph(
      input=input_spec,
      output={"tensor": out, "scale": em.output_scale},
      ops=tuple(em.ops), arrays=em.arrays)
  g.validate(graph)
  return graph, {"ir": ir, "demand": demand, "ranges": ranges}
