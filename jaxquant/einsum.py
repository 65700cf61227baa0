"""Two-operand einsum through the quantized `dot_general`.

`einsum_dimension_numbers` turns explicit subscripts ('bthd,hdf->btf') into
`dot_general` dimension numbers, the permutation of its output, and the axes that one
operand sums away before the contraction; `einsum` runs the contraction with
`jq.dot_general`, so it has the same quantizers, VJP and serving path.
"""
from __future__ import annotations

import string
from typing import Optional

import jax.numpy as jnp

from jaxquant import eager
from jaxquant.dot import dot_general
from jaxquant.dot_options import DotOptions
from jaxquant.fake_quant import OperandState
from jaxquant.qtensor import QTensor
from jaxquant.spec import DotSpec


def einsum_dimension_numbers(subscripts: str, lhs_ndim: int, rhs_ndim: int):
  """Parses a two-operand einsum into (dimension_numbers, output permutation, sum-outs)."""
  sub = subscripts.replace(" ", "")
  if "->" not in sub:
    raise ValueError(f"subscripts={subscripts!r} must be explicit ('ab,bc->ac')")
  ins, out = sub.split("->")
  parts = ins.split(",")
  if len(parts) != 2:
    raise ValueError(f"subscripts={subscripts!r} must name exactly two operands")
  used = set(c for c in sub if c.isalpha())
  free = [c for c in string.ascii_letters if c not in used]
  def expand(p, ndim):
    if "..." in p:
      n = ndim - (len(p) - 3)
      p = p.replace("...", "".join(free[n_ell - n:n_ell]))  # broadcast: align from the right
    if len(p) != ndim:
      raise ValueError(f"subscripts={subscripts!r}: '{p}' does not match rank {ndim}")
    return p
  n_ell = max(lhs_ndim - (len(parts[0]) - 3) if "..." in parts[0] else 0,
              rhs_ndim - (len(parts[1]) - 3) if "..." in parts[1] else 0)
  ls, rs = expand(parts[0], lhs_ndim), expand(parts[1], rhs_ndim)
  out = out.replace("...", "".join(free[:n_ell]))
  batch = [c for c in ls if c in rs and c in out]
  contract = [c for c in ls if c in rs and c not in out]
  lsum = tuple(i for i, c in enumerate(ls) if c not in rs and c not in out)
  rsum = tuple(i for i, c in enumerate(rs) if c not in ls and c not in out)
  ls_k = "".join(c for i, c in enumerate(ls) if i not in lsum)
  rs_k = "".join(c for i, c in enumerate(rs) if i not in rsum)
  dims = ((tuple(ls_k.index(c) for c in contract), tuple(rs_k.index(c) for c in contract)),
          (tuple(ls_k.index(c) for c in batch), tuple(rs_k.index(c) for c in batch)))
  lax_out = batch + [c for c in ls_k if c not in batch and c not in contract] + \
      [c for c in rs_k if c not in batch and c not in contract]
  if sorted(lax_out) != sorted(out):
    raise ValueError(f"subscripts={subscripts!r}: output '{out}' is not a permutation of the "
                     f"kept indices '{''.join(lax_out)}'")
  perm = tuple(lax_out.index(c) for c in out)
  return dims, perm, lsum, rsum


def einsum(subscripts: str, lhs, rhs, spec: Optional[DotSpec] = None, *, key=None,
           preferred_element_type=None, precision=None,
           lhs_state: Optional[OperandState] = None,
           rhs_state: Optional[OperandState] = None,
           options: Optional[DotOptions] = None):
  """Two-operand `jnp.einsum` through `dot_general` (explicit '->' output required).

  `rhs` may be a stored weight `QTensor`; a subscript that sums a kernel axis away is
  then refused (the codes cannot be summed before the contraction). `options`: a
  `DotOptions`, as in `dot_general`.
  """
  dims, perm, lsum, rsum = einsum_dimension_numbers(subscripts, jnp.ndim(lhs), len(jnp.shape(rhs)))
  lhs = jnp.asarray(lhs)
  if lsum:
    lhs = jnp.sum(lhs, axis=lsum)
  if rsum:
    if isinstance(rhs, QTensor):
      raise ValueError(f"einsum {subscripts!r} sums axes {rsum} of a stored QTensor away")
    rhs = jnp.sum(jnp.asarray(rhs), axis=rsum)
  out = dot_general(lhs, rhs, dims, spec, key=key, preferred_element_type=preferred_element_type,
                    precision=precision, lhs_state=lhs_state, rhs_state=rhs_state,
                    options=options)
  if perm != tuple(range(len(perm))):
    out = jnp.transpose(out, perm)
  return out


# `einsum`, one compiled call when it runs outside a trace (see `jaxquant.eager`): what
# layers call. Static arguments (`subscripts`, `spec`, ...) by keyword.
einsum_compiled = eager.compiled_when_eager(
    einsum, ("subscripts", "spec", "preferred_element_type", "precision", "options"))
