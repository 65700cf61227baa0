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
  kind: str  # input contract add sum norm identity | affine | reshape transpose
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
