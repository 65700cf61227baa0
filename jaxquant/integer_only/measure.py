"""Float evaluation of the IR, to measure activation ranges on calibration batches.

Each IR node is evaluated in float32 as the QAT model computes it: a layer's weights are
its dequantized QAT codes and its input passes through its QAT activation grid (fake
quantization), so the ranges measured downstream (residual sums, normalization outputs,
pooled features) are those of the model that was trained.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import jax
import numpy as np

from jaxquant.integer_only.ir import IR, Node


def snap_to_grid(x: np.ndarray, grid) -> np.ndarray:
  """x rounded onto a per-tensor grid and back: (clip(round(x/s) + zp, qmin, qmax) − zp)·s
  (numpy, the value a QAT input quantizer passes on)."""
  codes = np.clip(np.rint(x / grid.scale) + grid.zp, grid.qmin, grid.qmax)
  return ((codes - grid.zp) * grid.scale).astype(np.float32)


def _norm(x: np.ndarray, node: Node) -> np.ndarray:
  g = node.attrs["groups"]
  v = x.astype(np.float64).reshape(x.shape[:-1] + (g, x.shape[-1] // g))
  axes = node.attrs["reduce"]
  mean = v.mean(axis=axes, keepdims=True)
  var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
  return ((v - mean) / np.sqrt(var + node.attrs["eps"])).reshape(x.shape).astype(np.float32)


def evaluate_float(ir: IR, x: np.ndarray, weights: Callable[[Node], np.ndarray],
             input_grid: Callable[[Node], Optional[object]]) -> Dict[int, np.ndarray]:
  """Float32 values of every IR node for input batch `x`. `weights(node)` gives a contract node's
  (dequantized) kernel and `input_grid(node)` the grid its input is fake-quantized on
  (None: float)."""
  val: Dict[int, np.ndarray] = {}
  for n in ir.nodes:
    ins = [val[i] for i in n.inputs]
    if n.kind == "input":
      out = np.asarray(x, np.float32)
    elif n.kind == "contract":
      a = ins[0]
      grid = input_grid(n)
      if grid is not None:
        a = snap_to_grid(a, grid)
      prim = jax.lax.dot_general_p if n.attrs["op"] == "dot" else jax.lax.conv_general_dilated_p
      out = np.asarray(prim.bind(a, weights(n).astype(np.float32), **n.attrs["eqn_params"]))
    elif n.kind == "add":
      out = ins[0] + n.attrs["sign_b"] * ins[1]
    elif n.kind == "sum":
      out = np.sum(ins[0], axis=n.attrs["axes"])
    elif n.kind == "identity":
      out = ins[0]
    elif n.kind == "norm":
      out = _norm(ins[0], n)
    elif n.kind == "affine":
      a = n.attrs
      out = np.clip(a["mult"] * ins[0] + a["add"], a["lo"], a["hi"]).astype(np.float32)
    elif n.kind == "reshape":
      out = ins[0].reshape((ins[0].shape[0],) + n.shape[1:])
    elif n.kind == "transpose":
      out = np.transpose(ins[0], n.attrs["perm"])
    else:
      raise AssertionError(n.kind)
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
