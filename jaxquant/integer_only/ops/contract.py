"""'contract': a layer (dot_general / conv_general_dilated with a constant kernel).

Program ops (x = q − zp, the centered int8 input codes; w int8 codes):
  dot   Σ_k x·w over x axes `contract_lhs` and w axes `contract_rhs` (lax.dot_general
        order: x's free axes, then w's free axes).
  conv  Σ_window x·w, x padded with real zeros (x = 0, the code zp) by `padding`,
        strides `strides`, kernel dilation `rhs_dilation`, lax dimension numbers
        `lhs_spec`, `rhs_spec`, `out_spec` (batch, feature, spatial... order of each);
        optional `lhs_dilation` (default 1s: a transposed conv, nn.ConvTranspose, is x
        with lhs_dilation − 1 real zeros between its elements) and
        `feature_group_count` (default 1: G groups, input and output features split in
        G consecutive blocks, block g of the output from block g of the input; depthwise
        when G = input features). The lax.conv_general_dilated semantics, all in all.
The weights are the QAT codes of the layer's rule (per-channel or per-tensor,
symmetric), the input grid the rule's activation grid (else measured); the accumulator
scale is s_in·s_w per output channel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant import formats
from jaxquant.integer_only import qat_view
from jaxquant.integer_only.ir import Const, IntegerOnlyError, Layer, Node, snap_to_grid
from jaxquant.integer_only.ops.base import GraphOp, Op
from jaxquant.spec import QuantSpec

DEFAULT_WEIGHT = QuantSpec(bits=8)  # layers no rule quantizes: per-channel int8


# -- trace ----------------------------------------------------------------------------
def trace(tracer, eqn, vals, path):
  """A layer: an activation times a constant kernel; None for anything else."""
  if not isinstance(vals[1], Const) or isinstance(vals[0], Const):
    return None
  p = eqn.params
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb or 0 in tuple(lc):
      return tracer.fail("a dot_general with batch dimensions or over the batch axis", path)
    attrs = dict(op="dot", contract_lhs=tuple(lc), contract_rhs=tuple(rc))
  else:
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1:
      return tracer.fail("a convolution with batch_group_count > 1", path)
    if dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0:
      return tracer.fail("a convolution whose batch axis is not axis 0", path)
    padding = tuple(tuple(int(v) for v in pad) for pad in p["padding"])
    if any(v < 0 for pad in padding for v in pad):
      return tracer.fail("a convolution with negative padding", path)
    attrs = dict(op="conv", strides=tuple(p["window_strides"]), padding=padding,
                 rhs_dilation=tuple(p["rhs_dilation"]), lhs_spec=tuple(dn.lhs_spec),
                 rhs_spec=tuple(dn.rhs_spec), out_spec=tuple(dn.out_spec),
                 lhs_dilation=tuple(p["lhs_dilation"]),
                 feature_group_count=int(p["feature_group_count"]))
  node = tracer.materialize(vals[0])
  return tracer.core_lazy("contract", [node], tuple(eqn.outvars[0].aval.shape), path,
                          w=np.asarray(vals[1].value, np.float32), eqn_params=dict(p),
                          **attrs)


# -- float semantics --------------------------------------------------------------------
def evaluate(node, ins, ctx):
  """The QAT layer: its input on its activation grid, its dequantized kernel."""
  a = ins[0]
  grid = ctx.input_grid(node)
  if grid is not None:
    a = snap_to_grid(a, grid)
  prim = jax.lax.dot_general_p if node.attrs["op"] == "dot" else jax.lax.conv_general_dilated_p
  return np.asarray(prim.bind(a, ctx.weights(node).astype(np.float32),
                              **node.attrs["eqn_params"]))


# -- weights ----------------------------------------------------------------------------
def layer(node: Node, rules, variables) -> Layer:
  """The layer's weight codes and scale (its rule's weight spec, learned LSQ steps
  included) and its activation spec and range source."""
  path = node.layer
  rule = qat_view.rule_for(rules, path)
  w_spec = rule.weight if rule is not None and rule.weight is not None else DEFAULT_WEIGHT
  where = f"layer {path!r}"
  if not w_spec.is_integer:
    raise IntegerOnlyError(f"{where}: weight format {w_spec.format!r} has no integer codes; "
                           "integer programs need int / binary / ternary weights")
  if w_spec.granularity == "group" or not w_spec.symmetric:
    raise IntegerOnlyError(f"{where}: weights with granularity={w_spec.granularity!r}, "
                           f"symmetric={w_spec.symmetric} cannot share one int32 accumulator "
                           "per output; use symmetric per-channel or per-tensor weights")
  a = node.attrs
  w = a["w"]
  if a["op"] == "dot":
    axes = tuple(a["contract_rhs"])
  elif w_spec.granularity == "tensor":
    axes = tuple(range(w.ndim))
  else:
    axes = tuple(d for d in range(w.ndim) if d != a["rhs_spec"][0])
  codes, scale, _ = qat_view.weight_codes(w, w_spec, axes, variables, path)
  rank = len(node.shape)
  if a["op"] == "dot":
    free = [d for d in range(w.ndim) if d not in axes]
    w_scale = np.transpose(scale, axes + tuple(free)).reshape(
        (1,) * (rank - len(free)) + tuple(scale.shape[d] for d in free))
  else:
    shape = [1] * rank
    shape[a["out_spec"][1]] = scale.size
    w_scale = scale.reshape(shape)
  act = None if rule is None else rule.act
  source = None
  if act is not None:
    if not formats.get(act.format).uniform_int or not act.is_integer:
      raise IntegerOnlyError(f"{where}: activation format {act.format!r} (bits={act.bits}) "
                             "has no integer-only lowering; use format='int' activations "
                             "of 2..8 bits")
    source = qat_view.act_range(act, variables, path)
  return Layer(codes, w_scale, act, source)


def kernel_scale(node: Node, layer: Layer) -> np.ndarray:
  """The weight scale in the kernel's own layout (for dequantized calibration weights)."""
  a = node.attrs
  w = layer.codes
  if a["op"] == "conv":
    shape = [1] * w.ndim
    shape[a["rhs_spec"][0]] = layer.w_scale.size
    return layer.w_scale.reshape(shape)
  free = [d for d in range(w.ndim) if d not in a["contract_rhs"]]
  shape = [1] * w.ndim
  s = layer.w_scale.reshape(layer.w_scale.shape[len(layer.w_scale.shape) - len(free):])
  for d, size in zip(free, s.shape):
    shape[d] = size
  return s.reshape(shape)


# -- emission ---------------------------------------------------------------------------
def needs_range(emitter, node):
  """The input, unless QAT gives the layer its grid."""
  return [] if node.id in emitter.demand else [node.inputs[0]]


def emit(emitter, node: Node):
  """(dot / conv op, accumulator scale, bound on |acc|) of a layer."""
  layer_ = emitter.layers[node.id]
  x = node.inputs[0]
  grid = emitter.demand.get(node.id) or emitter.natural(x)
  t = emitter.emit(x, grid)
  a = node.attrs
  op = {"op": a["op"], "in": [t], "layer": node.layer, "zp": grid.zp}
  if a["op"] == "dot":
    op.update(contract_lhs=list(a["contract_lhs"]), contract_rhs=list(a["contract_rhs"]))
    k = int(np.prod([layer_.codes.shape[d] for d in a["contract_rhs"]]))
  else:
    op.update(strides=list(a["strides"]), padding=[list(p) for p in a["padding"]],
              rhs_dilation=list(a["rhs_dilation"]), lhs_spec=list(a["lhs_spec"]),
              rhs_spec=list(a["rhs_spec"]), out_spec=list(a["out_spec"]))
    if any(d != 1 for d in a["lhs_dilation"]):  # optional fields, written when not 1
      op["lhs_dilation"] = list(a["lhs_dilation"])
    if a["feature_group_count"] != 1:
      op["feature_group_count"] = a["feature_group_count"]
    k = layer_.codes.size // layer_.codes.shape[a["rhs_spec"][0]]
  emitter.arrays[f"{emitter.name()}.w"] = layer_.codes
  op["w"] = f"{emitter.name()}.w"
  span = max(grid.qmax - grid.zp, grid.zp - grid.qmin)
  bound = float(k) * span * float(np.max(np.abs(layer_.codes), initial=0))
  return op, grid.scale * layer_.w_scale, bound


# -- JAX kernels ------------------------------------------------------------------------
def dot_kernel(op, arr, x):
  """s8×s8→s32 dot_general minus zp·Σw (the zero point handled exactly)."""
  w = arr(op, "w")
  cl, cr = tuple(op["contract_lhs"]), tuple(op["contract_rhs"])
  acc = lax.dot_general(x.astype(jnp.int8), w, ((cl, cr), ((), ())),
                        precision=lax.Precision.DEFAULT,  # not a global 'highest'
                        preferred_element_type=jnp.int32)
  if op["zp"]:
    w_sum = jnp.sum(w.astype(jnp.int32), axis=cr)  # shaped like w's free axes
    n_free = acc.ndim - w_sum.ndim
    acc = acc - op["zp"] * w_sum.reshape((1,) * n_free + w_sum.shape)
  return acc


def conv_kernel(op, arr, x):
  """The conv of the centered codes x − zp (int32), padded with real zeros.

  Its operands are int32 (the int8 codes, widened and centered): XLA on CPU widens s8
  convolutions to s32 itself, except when it swaps the operands of a convolution whose
  (padded) input is smaller than its window, where its native s8 kernel returned wrong
  sums (jax 0.10.2: a 2×2 input, 3×3 kernel, 32 channels, zp = 0); test_ops.py holds
  the case. Centering first also makes a transposed conv's inserted holes real zeros."""
  w = arr(op, "w").astype(jnp.int32)
  lhs_spec, rhs_spec, out_spec = (tuple(op[k]) for k in ("lhs_spec", "rhs_spec", "out_spec"))
  nd = len(lhs_spec) - 2
  x = x.astype(jnp.int8).astype(jnp.int32) - jnp.int32(op["zp"])
  dn = lax.ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)
  return lax.conv_general_dilated(
      x, w, tuple(op["strides"]), [tuple(p) for p in op["padding"]],
      lhs_dilation=tuple(op.get("lhs_dilation", (1,) * nd)),
      rhs_dilation=tuple(op["rhs_dilation"]), dimension_numbers=dn,
      feature_group_count=int(op.get("feature_group_count", 1)),
      precision=lax.Precision.DEFAULT, preferred_element_type=jnp.int32)


OP = Op(
    kind="contract",
    summary="Dense / Conv (grouped, depthwise) / ConvTranspose / DenseGeneral (constant "
            "weights)",
    graph_ops={
        "dot": GraphOp(fields=("zp", "w", "contract_lhs", "contract_rhs"), arrays=("w",),
                       kernel=dot_kernel),
        "conv": GraphOp(fields=("zp", "w", "strides", "padding", "rhs_dilation", "lhs_spec",
                                "rhs_spec", "out_spec"), arrays=("w",), kernel=conv_kernel),
    },
    primitives=("dot_general", "conv_general_dilated"), trace=trace, evaluate=evaluate,
    emit=emit, needs_range=needs_range, layer=layer, kernel_scale=kernel_scale)

OPS = (OP,)
