"""'max_pool' and 'window_sum': nn.max_pool and nn.avg_pool (lax reduce_window max / sum).

Program ops; `window`, `strides` and `padding` ([lo, hi] per axis) cover every axis of
the tensor, batch included (window 1, stride 1, no padding on axis 0):
  max_pool    the maximum of the input codes over each window, padding taps ignored
              (the input padded with its dtype's minimum). The output keeps the input's
              grid: quantization is monotone, so max(quantize(x)) = quantize(max(x)).
  window_sum  acc = Σ (q − zp) over each window, padding taps real zeros (x = 0).
An average pool is a window_sum whose 1/n (1/window size, or the per-position count of
real taps when count_include_pad=False: a per-element multiplier) folds into the
requantization after it, so the mean is rounded once, by the requantization's
fixed-point rule: acc·M to nearest (SRDHM's ties toward +inf, then the right shift's
ties away from zero), M = s_in / (n·s_out) held as a 31-bit multiplier and a shift.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.integer_only.ir import Tensor
from jaxquant.integer_only.ops.base import GraphOp, Op

FIELDS = ("window", "strides", "padding")


def _window_attrs(tracer, eqn, path, what):
  """{window, strides, padding} of a reduce_window equation, or a refusal."""
  p = eqn.params
  window, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
  padding = tuple(tuple(int(v) for v in pad) for pad in p["padding"])
  if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
    return tracer.fail(f"a {what} with base or window dilation", path)
  if window[0] != 1 or strides[0] != 1 or padding[0] != (0, 0):
    return tracer.fail(f"a {what} over the batch axis", path)
  if any(v < 0 for pad in padding for v in pad):
    return tracer.fail(f"a {what} with negative padding", path)
  return dict(window=window, strides=strides, padding=padding)


def trace_max(tracer, eqn, vals, path):
  """max_pool: a grid-keeping node on the materialized input."""
  attrs = _window_attrs(tracer, eqn, path, "max pool")
  if not isinstance(attrs, dict):
    return attrs
  if any(max(pad) >= w for w, pad in zip(attrs["window"], attrs["padding"])):
    return tracer.fail("a max pool whose window can lie wholly in the padding", path)
  x = tracer.materialize(vals[0])
  return Tensor(tracer.node("max_pool", [x], tuple(eqn.outvars[0].aval.shape), path,
                            **attrs))


def trace_sum(tracer, eqn, vals, path):
  """window_sum: a core node (its 1/n, if any, folds into the affine map after it)."""
  attrs = _window_attrs(tracer, eqn, path, "sum / average pool")
  if not isinstance(attrs, dict):
    return attrs
  x = tracer.materialize(vals[0])
  return tracer.core_lazy("window_sum", [x], tuple(eqn.outvars[0].aval.shape), path,
                          **attrs)


def _lax_params(node):
  a = node.attrs
  ones = (1,) * len(a["window"])
  return dict(window_dimensions=a["window"], window_strides=a["strides"],
              padding=a["padding"], base_dilation=ones, window_dilation=ones)


def evaluate_max(node, ins, ctx):
  return np.asarray(lax.reduce_window_max_p.bind(np.asarray(ins[0], np.float32),
                                                 **_lax_params(node)))


def evaluate_sum(node, ins, ctx):
  return np.asarray(lax.reduce_window_sum_p.bind(np.asarray(ins[0], np.float32),
                                                 **_lax_params(node)))


def _fields(node):
  a = node.attrs
  return dict(window=list(a["window"]), strides=list(a["strides"]),
              padding=[list(p) for p in a["padding"]])


def emit_max(emitter, node, t):
  return {"op": "max_pool", "in": [t], "layer": node.layer, **_fields(node)}


def emit_sum(emitter, node):
  """(window_sum op, accumulator scale s_in, bound n·(qmax − qmin))."""
  x = node.inputs[0]
  grid = emitter.natural(x)
  t = emitter.emit(x, grid)
  n = int(np.prod(node.attrs["window"]))
  op = {"op": "window_sum", "in": [t], "layer": node.layer, "zp": grid.zp, **_fields(node)}
  return op, grid.scale, float(n) * (grid.qmax - grid.qmin)


def max_kernel(op, arr, x):
  low = jnp.iinfo(x.dtype).min
  return lax.reduce_window(x, jnp.array(low, x.dtype), lax.max, tuple(op["window"]),
                           tuple(op["strides"]), [tuple(p) for p in op["padding"]])


def sum_kernel(op, arr, x):
  v = x.astype(jnp.int32) - jnp.int32(op["zp"])
  return lax.reduce_window(v, jnp.int32(0), lax.add, tuple(op["window"]),
                           tuple(op["strides"]), [tuple(p) for p in op["padding"]])


MAX_POOL = Op(
    kind="max_pool", summary="max pooling",
    graph_ops={"max_pool": GraphOp(fields=FIELDS, core=False, kernel=max_kernel)},
    primitives=("reduce_window_max",), trace=trace_max, evaluate=evaluate_max,
    emit=emit_max, needs_range=lambda emitter, node: [], structural=True)

WINDOW_SUM = Op(
    kind="window_sum", summary="average / sum pooling",
    graph_ops={"window_sum": GraphOp(fields=("zp",) + FIELDS, kernel=sum_kernel)},
    primitives=("reduce_window_sum",), trace=trace_sum, evaluate=evaluate_sum,
    emit=emit_sum)

OPS = (MAX_POOL, WINDOW_SUM)
