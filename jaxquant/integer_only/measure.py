"""Float evaluation of the IR, to measure activation ranges on calibration batches.

Each IR node is evaluated in float32 as the QAT model computes it: a layer's weights are
its dequantized QAT codes and its input passes through its QAT activation grid (fake
quantization), so the ranges measured downstream (residual sums, normalization outputs,
pooled features) are those of the model that was trained. Each op's float semantics is
its `Op.evaluate` (ops/); 'input' and 'affine' (the folded maps) are evaluated here.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from jaxquant.integer_only import ops
from jaxquant.integer_only.ir import IR, Node, snap_to_grid  # noqa: F401 (snap_to_grid: re-export)


class _Context:
  """What `Op.evaluate` may ask: a layer's dequantized kernel, its input grid."""

  def __init__(self, weights, input_grid):
    self.weights, self.input_grid = weights, input_grid


def evaluate_float(ir: IR, x: np.ndarray, weights: Callable[[Node], np.ndarray],
             input_grid: Callable[[Node], Optional[object]]) -> Dict[int, np.ndarray]:
  """Float32 values of every IR node for input batch `x`. `weights(node)` gives a contract node's
  (dequantized) kernel and `input_grid(node)` the grid its input is fake-quantized on
  (None: float)."""
  val: Dict[int, np.ndarray] = {}
  ctx = _Context(weights, input_grid)
  for n in ir.nodes:
    ins = [val[i] for i in n.inputs]
    if n.kind == "input":
      out = np.asarray(x, np.float32)
    elif n.kind == "affine":
      a = n.attrs
      out = np.clip(a["mult"] * ins[0] + a["add"], a["lo"], a["hi"]).astype(np.float32)
    else:
      out = ops.get(n.kind).evaluate(n, ins, ctx)
    val[n.id] = out
  return val


def measure_ranges(ir: IR, batches: Iterable[np.ndarray], weights, input_grid,
            keep_samples: Tuple[int, ...] = ()) -> Tuple[Dict[int, Tuple[float, float]],
                                                         Dict[int, np.ndarray]]:
  """({node: (min, max)} over all batches for every node, {node: concatenated values}
  for the nodes in `keep_samples` (those whose grid a percentile / MSE spec measures))."""
  ranges: Dict[int, Tuple[float, float]] = {}
  samples: Dict[int, list] = {i: [] for i in keep_samples}
  for x in batches:
    val = evaluate_float(ir, x, weights, input_grid)
    for i, v in val.items():
      finite = v[np.isfinite(v)]
      lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
      if i in ranges:
        lo, hi = min(lo, ranges[i][0]), max(hi, ranges[i][1])
      ranges[i] = (lo, hi)
      if i in samples:
        samples[i].append(v.reshape(-1))
  return ranges, {i: np.concatenate(s) for i, s in samples.items() if s}
