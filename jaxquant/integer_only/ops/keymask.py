"""'masked_sum': a key padding mask derived from integer token ids, and what it masks.

A model whose input is token ids (int32) may compute a padding mask `ids != pad` and use
it (as BERT does) to fill masked attention scores before softmax and to zero padded
tokens before a sum over tokens (masked mean pooling). The tracer follows the mask as a
`Keep` value (compares, casts to float, broadcasts and reshapes of it) and the masked
activation as `Masked`; the softmax op (softmax.py: `masked_softmax`) and this module's
`masked_sum` take the ids tensor itself as a second input and recompute the mask.

Program op `masked_sum`: acc = Σ_axes (q − zp)·[ids ≠ pad], the ids [B, T] placed at
the activation's axes `mask_axes` (1 elsewhere), summed over `axes` (removed).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only.ir import Const, Tensor
from jaxquant.integer_only.ops.base import GraphOp, Op

FILL_BELOW = -1e30  # a select's fill at or below this is a masking fill (-inf, finfo.min)


@dataclasses.dataclass
class Keep:
  """The mask ids ≠ pad of the ids input node, viewed with shape `shape`, the ids' two
  axes at `axes` of it (constant along every other axis)."""
  ids: int
  pad: int
  shape: Tuple[int, ...]
  axes: Tuple[int, int]


@dataclasses.dataclass
class Masked:
  """An activation `value` whose entries where `keep` is False are masked out."""
  value: object
  keep: Keep


def _ids_input(tracer, v) -> bool:
  return (isinstance(v, Tensor) and tracer.nodes[v.node].kind == "input"
          and len(tracer.nodes[v.node].shape) == 2)


def _reaxis(keep: Keep, new_shape) -> Keep:
  """The mask viewed with `new_shape` (size-1 axes added or removed), or None."""
  sizes = [keep.shape[a] for a in keep.axes]
  where, start = [], 0
  for size in sizes:
    found = next((j for j in range(start, len(new_shape)) if new_shape[j] == size), None)
    if found is None:
      return None
    where.append(found)
    start = found + 1
  others = [s for j, s in enumerate(new_shape) if j not in where]
  if any(s != 1 for s in others) or int(np.prod(new_shape)) != int(np.prod(sizes)):
    return None
  return Keep(keep.ids, keep.pad, tuple(new_shape), tuple(where))


def trace(tracer, eqn, vals, path):
  """Follows a padding mask; None for equations it is not part of."""
  name, out_shape = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
  keeps = [v for v in vals if isinstance(v, Keep)]
  masked = [v for v in vals if isinstance(v, Masked)]
  if name == "ne" and _ids_input(tracer, vals[0]) and isinstance(vals[1], Const):
    pad = np.asarray(vals[1].value)
    if pad.size == 1:
      return Keep(vals[0].node, int(pad.reshape(-1)[0]), out_shape, (0, 1))
  if name == "gt" and keeps and isinstance(vals[1], Const) and np.all(vals[1].value == 0):
    return dataclasses.replace(vals[0], shape=out_shape)
  if name in ("broadcast_in_dim", "reshape", "expand_dims", "squeeze") and keeps:
    k = vals[0]
    if name == "broadcast_in_dim":
      dims = tuple(eqn.params["broadcast_dimensions"])
      if len(dims) == len(k.shape) and all(out_shape[dims[d]] == k.shape[d] for d in k.axes):
        return Keep(k.ids, k.pad, out_shape, tuple(dims[a] for a in k.axes))
      return tracer.fail("a broadcast of a padding mask", path)
    new = _reaxis(k, out_shape)
    return new if new is not None else tracer.fail("a reshape of a padding mask", path)
  if name == "select_n" and keeps and vals[0] is keeps[0] and len(vals) == 3:
    fill, value = vals[1], vals[2]
    if (isinstance(fill, Const) and np.all(np.asarray(fill.value) <= FILL_BELOW)
        and not isinstance(value, (Const, Keep, Masked))):
      return Masked(value, vals[0])
    return tracer.fail("a select on a padding mask other than a masking fill", path)
  if name == "mul" and keeps and len(keeps) == 1 and not masked:
    other = vals[1] if vals[0] is keeps[0] else vals[0]
    if not isinstance(other, Const):
      return Masked(other, keeps[0])
  if name == "reduce_sum" and masked:
    m = masked[0]
    axes = tuple(eqn.params["axes"])
    if 0 in axes:
      return tracer.fail("a sum over the batch axis", path)
    x = tracer.materialize(m.value)
    shape = tracer.nodes[x].shape
    if len(shape) != len(m.keep.shape) or any(m.keep.shape[a] != shape[a] for a in m.keep.axes):
      return tracer.fail("a masked sum whose mask does not match the activation", path)
    return tracer.core_lazy("masked_sum", [x, m.keep.ids], out_shape, path, axes=axes,
                            mask_axes=m.keep.axes, pad=m.keep.pad)
  if keeps or masked:
    return tracer.fail(f"'{name}' of a padding mask", path)
  return None


def mask_of(ids, pad, rank, axes, xp=np):
  """ids ≠ pad as 0/1 of `rank` axes, the ids' axes at `axes` (1 elsewhere)."""
  shape = [1] * rank
  shape[axes[0]], shape[axes[1]] = ids.shape
  return (ids != pad).reshape(shape)


def evaluate(node, ins, ctx):
  a = node.attrs
  keep = mask_of(ins[1].astype(np.int64), a["pad"], ins[0].ndim, a["mask_axes"])
  return np.sum(ins[0] * keep, axis=a["axes"]).astype(np.float32)


def emit(emitter, node):
  """(masked_sum op, accumulator scale, bound) of a masked sum over `axes`."""
  x, ids = node.inputs
  grid = emitter.natural(x)
  t, t_ids = emitter.emit(x, grid), emitter.emit(ids, emitter.natural(ids))
  a = node.attrs
  n = int(np.prod([emitter.ir.nodes[x].shape[d] for d in a["axes"]]))
  op = {"op": "masked_sum", "in": [t, t_ids], "layer": node.layer, "zp": grid.zp,
        "axes": list(a["axes"]), "mask_axes": list(a["mask_axes"]), "pad": int(a["pad"])}
  return op, grid.scale, float(n) * (grid.qmax - grid.qmin)


def kernel(op, arr, x, ids):
  keep = mask_of(ids, op["pad"], x.ndim, op["mask_axes"]).astype(jnp.int32)
  return jnp.sum((x.astype(jnp.int32) - jnp.int32(op["zp"])) * keep, axis=tuple(op["axes"]))


OP = Op(
    kind="masked_sum", summary="padding masks of token ids (masked sums, masked softmax)",
    graph_ops={"masked_sum": GraphOp(fields=("zp", "axes", "mask_axes", "pad"), arity=2,
                                     kernel=kernel)},
    primitives=("ne", "gt", "broadcast_in_dim", "reshape", "expand_dims", "squeeze",
                "select_n", "mul", "reduce_sum"),
    trace=trace, evaluate=evaluate, emit=emit)

OPS = (OP,)
