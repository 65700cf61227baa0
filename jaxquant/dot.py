"""Quantized dot_general: the public entry point of every quantized contraction.

`dot_general` dispatches on its operands:
  * no quantized operand in the spec: `lax.dot_general` itself;
  * float operands: the QAT contraction, one custom VJP for forward and backward
    (`jaxquant.qat_dot`; its integer matmul in `jaxquant.int_matmul`);
  * a stored weight `QTensor` as rhs: the forward-only serving paths
    (`jaxquant.serving_dot`).
Both see the contraction as lhs[B, M, K] · rhs[B, K, N] through `jaxquant.layout`, and
take their tuning choices (which formulation runs, never what it computes) from a
`DotOptions` (`jaxquant.dot_options`).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax

from jaxquant import dot_options
from jaxquant import eager
from jaxquant import fake_quant as fq
from jaxquant.dot_options import DotOptions
from jaxquant.fake_quant import OperandState
from jaxquant.qat_dot import qat_dot
from jaxquant.qtensor import QTensor
from jaxquant.serving_dot import serving_dot
from jaxquant.spec import DotSpec


def dot_general(lhs, rhs, dimension_numbers, spec: Optional[DotSpec] = None, *,
                key=None, preferred_element_type=None, precision=None,
                lhs_state: Optional[OperandState] = None,
                rhs_state: Optional[OperandState] = None,
                options: Optional[DotOptions] = None):
  """`lax.dot_general` with quantized operands (see the module docstring).

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type: as in lax. The
      output dtype is `preferred_element_type` or the operands' result type. `rhs` may be
      a weight `QTensor` from `jq.quantize_weight` (serving): the forward then runs on
      its codes. Its recorded layout must be the contraction's, except that a 2-D
      weight recorded [N, K] (contracting axis 1, as `jq.convert` stores weight-only
      Dense kernels) serves a contraction of axis 0 of a [K, N] weight, as that
      transpose.
    spec: a `DotSpec`; None (or no quantized operand) runs the plain float dot.
    key: PRNG key, required when any spec uses stochastic rounding.
    lhs_state, rhs_state: `OperandState`s: `learned` is the LSQ step size / PACT α,
      shaped like the operand with the contracting axes of length 1 (or the number of
      groups), or a scalar; `range` (lhs only) a static (lo, hi) activation range, shaped
      the same way, used instead of the batch's own range.
    options: a `DotOptions` (which formulation runs: optimization barriers around the
      int8 dots, the rows that take the sliced weight-only dot); None for the defaults.
      Static: a jitted caller is traced again for other options.
  """
  if spec is not None and not isinstance(spec, DotSpec):  # before reading spec.lhs
    raise ValueError(f"spec={spec!r} must be a jaxquant.DotSpec")
  options = dot_options.resolve(options)
  lhs_state, rhs_state = fq.operand_states(lhs_state, rhs_state)
  if isinstance(rhs, QTensor):
    return serving_dot(lhs, rhs, dimension_numbers, spec, key, preferred_element_type,
                       lhs_state, options)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if spec is None or (spec.lhs is None and spec.rhs is None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  out = qat_dot(lhs, rhs, dimension_numbers, spec, key, lhs_state, rhs_state, options)
  return out.astype(out_dtype)


def make_dot_general(spec: Optional[DotSpec], *, key=None,
                     lhs_state: Optional[OperandState] = None,
                     rhs_state: Optional[OperandState] = None, weight=None,
                     options: Optional[DotOptions] = None):
  """A callable with `lax.dot_general`'s signature, for `nn.Dense(dot_general=...)`.

  `weight`, when given (a stored weight `QTensor`), replaces the rhs the layer passes:
  the layer computes on the stored codes instead of its float kernel. `options`: a
  `DotOptions` for every call (None: the defaults).
  """
  def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                   **unused):  # out_sharding: the output follows the operands' sharding
    return dot_general_compiled(lhs, rhs if weight is None else weight,
                                dimension_numbers=dimension_numbers, spec=spec, key=key,
                                precision=precision,
                                preferred_element_type=preferred_element_type,
                                lhs_state=lhs_state, rhs_state=rhs_state,
                                options=options)
  return _dot_general


# `dot_general`, one compiled call when it runs outside a trace (see `jaxquant.eager`):
# what layers call. Static arguments by keyword.
dot_general_compiled = eager.compiled_when_eager(
    dot_general, ("dimension_numbers", "spec", "preferred_element_type", "precision",
                  "options"))
