"""`size_report`: the bytes every parameter takes, as trained (float) and as stored.

A serving kernel (`QTensor`) counts its codes, scales and zero points exactly as the
variables hold them (packed codes, a block format's block scales, NVFP4's tensor scale).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import nnx_functional
from jaxquant import state
from jaxquant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class TensorSize:
  """Bytes of one stored tensor (a layer's kernel, bias, ...): as float and as stored."""
  path: str
  float_bytes: int
  quantized_bytes: int

  @property
  def ratio(self) -> float:
    return self.float_bytes / max(1, self.quantized_bytes)


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-tensor and total bytes: float (as trained) vs as stored for serving.

  A quantized kernel's stored bytes count its codes, scales and zero points (a block
  format's 1-byte block scales and NVFP4's 4-byte tensor scale too), so int8 weights
  come out just under 4x, packed int4 just under 8x and packed binary just under 32x;
  MXFP4 is K·N/2 + K·N/32 bytes.
  """
  tensors: Tuple[TensorSize, ...]

  @property
  def total_float_bytes(self) -> int:
    return sum(t.float_bytes for t in self.tensors)

  @property
  def total_quantized_bytes(self) -> int:
    return sum(t.quantized_bytes for t in self.tensors)

  @property
  def ratio(self) -> float:
    return self.total_float_bytes / max(1, self.total_quantized_bytes)

  def layer(self, path: str) -> TensorSize:
    """The row of one tensor, e.g. report.layer('Dense_0/kernel')."""
    for t in self.tensors:
      if t.path == path:
        return t
    raise KeyError(f"{path!r} not in the report; rows: {[t.path for t in self.tensors]}")

  def __str__(self) -> str:
    w = max([len(t.path) for t in self.tensors] + [6])
    rows = [f"{'tensor':<{w}}  {'float B':>12}  {'stored B':>12}  {'ratio':>7}"]
    for t in self.tensors:
      rows.append(f"{t.path:<{w}}  {t.float_bytes:>12,}  {t.quantized_bytes:>12,}  {t.ratio:>7.2f}")
    rows.append(f"{'total':<{w}}  {self.total_float_bytes:>12,}  "
                f"{self.total_quantized_bytes:>12,}  {self.ratio:>7.2f}")
    return "\n".join(rows)


def _nbytes(x) -> int:
  return int(np.prod(np.shape(x))) * np.dtype(jnp.asarray(x).dtype).itemsize


def size_report(variables) -> SizeReport:
  """Bytes of every tensor in 'params' and of every serving kernel: float vs stored.

  `variables` is a Linen variables dict ({'params': ..., other collections ignored}),
  a 'params' tree alone (`variables['params']`), or an NNX model or its `nnx.State`
  (its Params). Float bytes are a parameter's own bytes, and a serving kernel's bytes at
  float32; stored bytes are what the variables actually hold. Works on training
  variables too (then stored == float). Anything else, a tree with no parameter, or a
  leaf that is not an array is refused with a ValueError naming it: never 0 bytes.
  """
  params = _params_tree(variables)
  rows = []

  def visit(tree, prefix):
    for k, v in sorted(tree.items()):
      p = f"{prefix}/{k}" if prefix else k
      if isinstance(v, QTensor):  # a serving kernel: codes, scales, zero points
        rows.append(TensorSize(p, int(np.prod(v.shape)) * 4,
                               sum(_nbytes(x) for x in jax.tree.leaves(v))))
      elif isinstance(v, dict):
        visit(v, p)
      elif _is_array(v):
        rows.append(TensorSize(p, _nbytes(v), _nbytes(v)))
      else:
        raise ValueError(f"size_report: {p!r} is a {type(v).__name__}, not an array or a "
                         "QTensor; pass the model's variables, their 'params' or an "
                         "nnx.State")

  visit(params, "")
  if not rows:
    raise ValueError("size_report: the variables hold no parameter (an empty 'params'); "
                     "pass the model's variables, their 'params' or an nnx.State")
  return SizeReport(tuple(sorted(rows, key=lambda t: t.path)))


# Linen collections other than 'params' (a dict holding one of these but no 'params' is
# variables without parameters, not a 'params' tree).
_OTHER_COLLECTIONS = state.COLLECTIONS + ("batch_stats", "cache", "intermediates")


def _params_tree(variables):
  """The nested dict of parameters that `variables` holds (see `size_report`)."""
  if isinstance(variables, (nnx.State, nnx.Module)):
    variables = nnx_functional.linen_variables(variables)
  if not isinstance(variables, Mapping):
    raise ValueError(f"size_report takes a variables dict, its 'params' or an nnx.State; "
                     f"got {type(variables).__name__}")
  variables = state.mutable_copy(variables)
  if "params" in variables:
    return variables["params"]
  others = sorted(k for k in variables if k in _OTHER_COLLECTIONS)
  if others:
    raise ValueError(f"size_report: the variables hold collections {others} but no "
                     "'params'; pass the variables with their 'params'")
  return variables  # a 'params' tree


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array, np.generic)) and not \
      jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key)
