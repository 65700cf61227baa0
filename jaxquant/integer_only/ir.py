"""The converter's intermediate representation: float-semantics nodes and trace values.

`trace.py` builds an `IR` (nodes in execution order, batch on axis 0) from a model's
jaxpr; `measure.py` evaluates it in float to measure ranges; `lower.py` resolves each
layer's codes and grids and `emit.py` writes the integer program from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


class IntegerOnlyError(ValueError):
  """The model (or its variables / calibration) cannot become an integer-only program;
  the message names the layer(s)."""


@dataclasses.dataclass
class Node:
  id: int
  kind: str  # 'input', 'affine', 'bad', or an op kind of the registry (ops/)
  inputs: Tuple[int, ...]
  shape: Tuple[int, ...]
  layer: str
  attrs: Dict[str, Any]


@dataclasses.dataclass
class IR:
  nodes: List[Node]
  input: int
  output: int
  input_dtype: Any

  def consumers(self) -> Dict[int, List[int]]:
    out: Dict[int, List[int]] = {n.id: [] for n in self.nodes}
    for n in self.nodes:
      for i in n.inputs:
        out[i].append(n.id)
    return out


@dataclasses.dataclass
class Const:
  value: np.ndarray


@dataclasses.dataclass
class Tensor:
  node: int


@dataclasses.dataclass
class Lazy:
  core: int
  mult: np.ndarray
  add: np.ndarray
  lo: float = -np.inf
  hi: float = np.inf
  node: Optional[int] = None  # the affine node once materialized


@dataclasses.dataclass
class Bad:
  why: str
  layer: str


@dataclasses.dataclass
class Layer:
  """A contraction's quantization: int8 codes, scale in output layout, input grid."""
  codes: np.ndarray
  w_scale: np.ndarray  # broadcasts against the contraction output (batch axis 1)
  act_spec: Any  # the rule's activation QuantSpec, or None
  source: Any  # qat_view.act_range result, or None (measure)


def snap_to_grid(x: np.ndarray, grid) -> np.ndarray:
  """x rounded onto a per-tensor grid and back: (clip(round(x/s) + zp, qmin, qmax) − zp)·s
  (numpy, the value a QAT input quantizer passes on)."""
  codes = np.clip(np.rint(x / grid.scale) + grid.zp, grid.qmin, grid.qmax)
  return ((codes - grid.zp) * grid.scale).astype(np.float32)
