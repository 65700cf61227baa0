"""One call of one quantized Linen layer: its quantization state, then its contraction.

The transform (`jaxquant.transform`) intercepts a matched `nn.Dense`, `nn.DenseGeneral`,
`nn.Conv` or `nn.Einsum` call and hands it to a `LayerCall`, which runs a copy of the
layer bound to the same scope with jaxquant's contraction (`Contraction`) as its
`dot_general` / `conv_general_dilated` argument (`nn.Einsum`: its computation through
`jq.einsum`). The state it reads and writes beside 'params' (recorded kernel layout,
learned LSQ / PACT quantities, observer states, static ranges, PTQ input scales) is named
by `jaxquant.state`. A float kernel is quantized inside the contraction; a stored
`QTensor` kernel (`jq.convert`) is used as it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant import formats
from jaxquant import layout
from jaxquant import numerics
from jaxquant import observers as obs
from jaxquant import state
from jaxquant.einsum import einsum_compiled, einsum_dimension_numbers
from jaxquant.fake_quant import OperandState
from jaxquant.qtensor import QTensor
from jaxquant.spec import DotSpec, Rule

if TYPE_CHECKING:
  from jaxquant.transform import QuantConfig


def module_fields(module: nn.Module) -> Dict[str, Any]:
  """The dataclass fields a Linen module was constructed with (not parent / name)."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in ("parent", "name")}


def shares_batch_range(act) -> bool:
  """Whether a layer computes its activation's batch range once and hands it to both the
  quantizer (as its clip range) and the EMA observer: per-tensor int / fp8 ranges
  calibrated by absmax or percentile, on a grid not learned (LSQ / PACT ignore ranges).
  Both statistics are order-free (min / max, order statistics), so computing them on the
  observers' [B, M, K] view of the input gives the quantizer's values bit for bit. MSE
  sums errors, whose rounding depends on the layout: it keeps its own search."""
  return (act is not None and formats.get(act.format).clip_range
          and act.granularity == "tensor" and act.calibration in ("absmax", "percentile")
          and act.learned is None)


def promote_keeping_qtensors(promote):
  """The layer's `promote_dtype`, passing stored QTensor kernels through untouched."""
  def promote_dtype(*args, **kwargs):
    arrays = [a for a in args if a is not None and not isinstance(a, QTensor)]
    promoted = iter(promote(*arrays, **kwargs))
    return [a if a is None or isinstance(a, QTensor) else next(promoted) for a in args]
  return promote_dtype


def stored_kernel(module) -> Optional[QTensor]:
  """The layer's kernel when `convert` stored it as a QTensor, else None."""
  if module.has_variable("params", "kernel"):
    value = module.get_variable("params", "kernel")
    if isinstance(value, QTensor):
      return value
  return None


_READING_STORED = {}


def _reading_stored_kernels(cls):
  """A subclass of a layer class whose `param('kernel')` returns a stored QTensor as it
  is (Flax would compare its packed bytes' shape with the float kernel's)."""
  if cls not in _READING_STORED:
    def param(self, name, *args, **kwargs):
      stored = stored_kernel(self) if name == "kernel" else None
      return stored if stored is not None else cls.param(self, name, *args, **kwargs)
    _READING_STORED[cls] = type(cls.__name__, (cls,), {"param": param,
                                                       "__module__": cls.__module__})
  return _READING_STORED[cls]


class _Ref:
  """A variable that already exists, read and written through the module (works in
  methods that are neither `setup` nor `@compact`, e.g. `nn.Embed.attend`)."""

  def __init__(self, module, col: str, name: str):
    self.module, self.col, self.name = module, col, name

  @property
  def value(self):
    return self.module.get_variable(self.col, self.name)

  @value.setter
  def value(self, v):
    self.module.put_variable(self.col, self.name, v)


def state_variable(module, col: str, name: str, init):
  """`module.variable(col, name, init)`, or the existing variable as a `_Ref`."""
  if module.has_variable(col, name):
    return _Ref(module, col, name)
  return module.variable(col, name, init)


class LayerCall:
  """One call of one matched layer: its quantization state, then its computation."""

  def __init__(self, module, path: str, rule: Rule, config: QuantConfig):
    self.module, self.path, self.rule, self.config = module, path, rule, config
    self.spec = DotSpec() if config.float_forward else rule.dot_spec()

  def run(self, args, kwargs):
    """The layer's call with jaxquant's contraction (the einsum computation for Einsum)."""
    m = self.module
    if isinstance(m, nn.Einsum):
      return self.einsum_call(*args, **kwargs)
    attr = "conv_general_dilated" if isinstance(m, nn.Conv) else "dot_general"
    if getattr(m, attr + "_cls", None) is not None:
      raise ValueError(f"layer {self.path!r} sets {attr}_cls; jaxquant cannot quantize it")
    if getattr(m, "mask", None) is not None and \
        isinstance(m.variables.get("params", {}).get("kernel"), QTensor):
      raise ValueError(f"layer {self.path!r}: a masked conv cannot run on a stored kernel")
    # The same layer, bound to the same scope (same variables), with our contraction.
    fields = {**module_fields(m), attr: Contraction(self),
              "promote_dtype": promote_keeping_qtensors(m.promote_dtype)}
    return _reading_stored_kernels(type(m))(**fields, parent=m.scope)(*args, **kwargs)

  # -- state ------------------------------------------------------------------------------
  def key(self):
    """The PRNG key of stochastic rounding for this call, or None when no spec draws."""
    # A stored (serving) kernel was rounded once at convert: its spec draws nothing.
    stored = isinstance(self.module.variables.get("params", {}).get("kernel"), QTensor)
    specs = (self.rule.act, None if stored else self.rule.weight, self.rule.grad)
    if any(s is not None and s.rounding == "stochastic" for s in specs):
      if not self.module.has_rng(state.RNG):
        raise ValueError(f"layer {self.path!r} uses stochastic rounding: pass "
                         f"rngs={{{state.RNG!r}: key}} to apply")
      return self.module.make_rng(state.RNG)
    return None

  def _tracking(self) -> bool:
    m = self.module
    return m.is_mutable_collection(state.QUANT_STATS) or m.is_initializing()

  def row_mask(self, rows_shape, x_BMK):
    """The config's token mask as [1, M] over this layer's input rows, or None.

    `rows_shape` is the shape of the input's row axes (its free axes, in order, that M
    flattens); the mask must equal their leading axes and is broadcast over the rest."""
    mask = self.config.mask
    if mask is None:
      return None
    mask = jnp.asarray(mask)
    rows_shape = tuple(rows_shape)
    if x_BMK.shape[0] != 1 or mask.shape != rows_shape[:mask.ndim]:
      raise ValueError(f"calibrate: a mask of shape {tuple(mask.shape)} does not match layer "
                       f"{self.path!r}, whose input rows have shape {rows_shape}"
                       + (" and batch axes shared with its weight" if x_BMK.shape[0] != 1
                          else "") + "; the mask must be the leading axes of every "
                       "quantized layer's input (e.g. [batch, tokens])")
    keep = mask.astype(bool).reshape(mask.shape + (1,) * (len(rows_shape) - mask.ndim))
    return jnp.broadcast_to(keep, rows_shape).reshape(1, -1)

  def lhs_state(self, x, x_BMK, rows_shape=None) -> OperandState:
    """The activation's learned quantity and static range; runs the observers (with the
    config's token mask over `rows_shape`, when calibration gave one)."""
    m, act = self.module, self.rule.act
    has_static = m.has_variable(state.QUANT_STATS, state.ACT_HI) and act is not None \
        and act.static is not False
    batch_range = None  # this batch's clip range, computed once for quantizer and observers
    if self._tracking():
      updating = not m.is_initializing()
      mask_BM = None
      if updating and self.config.mask is not None:
        mask_BM = self.row_mask(x_BMK.shape[:-1] if rows_shape is None else rows_shape, x_BMK)
      if updating and mask_BM is None and not has_static and shares_batch_range(act):
        batch_range = numerics.calibrated_range(jax.lax.stop_gradient(x_BMK), act,
                                                tuple(range(x_BMK.ndim)))
      sharing = (contextlib.nullcontext() if batch_range is None
                 else obs.sharing_batch_range(x_BMK, act, batch_range))
      with sharing:
        for name, factory in self.config.observers:
          observer = factory(self.rule)
          if observer is None:
            continue
          init_state = observer.init(x_BMK)
          refs = {k: state_variable(m, state.QUANT_STATS, state.observer_key(name, k),
                               lambda v=v: v) for k, v in init_state.items()}
          if updating:
            old = {k: r.value for k, r in refs.items()}
            new = (observer.update(old, x_BMK) if mask_BM is None
                   else observer.update(old, x_BMK, mask_BM))
            for k, r in refs.items():
              r.value = new[k]
    if act is None:
      return OperandState()
    shape = (1,) * x.ndim
    learned = None
    if act.learned:
      init = lambda: numerics.init_learned_compiled(
          jax.lax.stop_gradient(x), spec=act, reduce_axes=tuple(range(x.ndim))).reshape(shape)
      learned = state_variable(m, state.QUANT, state.learned_key(state.ACT, act.learned),
                          init).value.reshape(shape)
    static = None
    if has_static:
      static = (m.get_variable(state.QUANT_STATS, state.ACT_LO).reshape(shape),
                m.get_variable(state.QUANT_STATS, state.ACT_HI).reshape(shape))
    elif batch_range is not None:  # the batch's own range, as the quantizer would compute it
      static = tuple(r.reshape(shape) for r in batch_range)
    elif act.static and not self._tracking():
      raise ValueError(f"layer {self.path!r}: act spec has static=True but no calibrated "
                       "range in 'quant_stats' (act_lo / act_hi): run jq.calibrate(qmodel, "
                       "variables, batches) first (while 'quant_stats' is mutable, in "
                       "training or calibration, the batch's own range is used)")
    return OperandState(learned=learned, range=static)

  def rhs_state(self, kernel, w_layout: layout.WeightLayout) -> OperandState:
    """Records the kernel's layout; the weight's learned quantity (float kernels only)."""
    m, w = self.module, self.rule.weight
    # A QTensor was grouped when it was quantized (and may be stored [N, K], so the
    # call's layout does not describe its axes): only a float kernel is checked here.
    if w is not None and w.granularity == "group" and not isinstance(kernel, QTensor):
      k = layout.canonical_shape(kernel.shape, w_layout)[1]
      if k % w.group_size:
        raise ValueError(f"layer {self.path!r}: weight group_size={w.group_size} does not "
                         f"divide its {k} contracted input features")
    if self._tracking():
      axes = state.kernel_axes(w_layout)
      state_variable(m, state.QUANT_STATS, state.KERNEL_AXES, lambda: jnp.asarray(axes))
    if w is None or not w.learned or isinstance(kernel, QTensor):
      return OperandState()
    init = lambda: layout.init_learned_compiled(jax.lax.stop_gradient(kernel), spec=w,
                                                layout=w_layout)
    key = state.learned_key(state.WEIGHT, w.learned)
    return OperandState(learned=state_variable(m, state.QUANT, key, init).value)

  # -- nn.Einsum ----------------------------------------------------------------------------
  def einsum_call(self, inputs, einsum_str=None):
    """nn.Einsum.__call__ with the contraction through jq.einsum."""
    m = self.module
    einsum_str = nn.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    kernel = stored_kernel(m)
    if kernel is None:
      kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
    bias = None
    if m.use_bias:
      bias_shape, bshape = m._get_bias_shape(einsum_str, inputs, kernel)  # pylint: disable=protected-access
      bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
    inputs, kernel, bias = promote_keeping_qtensors(m.promote_dtype)(
        inputs, kernel, bias, dtype=m.dtype)
    dims, _, lsum, _ = einsum_dimension_numbers(einsum_str, inputs.ndim, len(kernel.shape))
    if m.has_variable(state.QUANT_STATS, state.INPUT_SCALE):
      raise ValueError(f"layer {self.path!r}: PTQ input scales are supported for "
                       "Dense / DenseGeneral layers, not nn.Einsum")
    kept = inputs if not lsum else jnp.sum(inputs, axis=lsum)
    y = einsum_compiled(subscripts=einsum_str, lhs=inputs, rhs=kernel, spec=self.spec,
                        key=self.key(), **self.states(kept, kernel, dims))
    if bias is not None:
      y = y + jnp.reshape(bias, bshape)
    return y

  def scaled_input(self, lhs, dimension_numbers):
    """lhs / s when `convert` stored a PTQ input scale s [K] (AWQ, SmoothQuant) for this
    layer: its weight rows were multiplied by s."""
    m = self.module
    if not m.has_variable(state.QUANT_STATS, state.INPUT_SCALE):
      return lhs
    (lc, _), _ = dimension_numbers
    lc = tuple(int(a) % lhs.ndim for a in lc)
    s = m.get_variable(state.QUANT_STATS, state.INPUT_SCALE).reshape(
        [lhs.shape[a] for a in lc])
    s = jnp.transpose(s, tuple(int(i) for i in np.argsort(lc)))
    shape = [lhs.shape[a] if a in lc else 1 for a in range(lhs.ndim)]
    return lhs / s.reshape(shape).astype(lhs.dtype)

  def states(self, lhs, rhs, dimension_numbers) -> Dict[str, OperandState]:
    """lhs_state / rhs_state of a dot_general call."""
    (lc, rc), (lb, rb) = dimension_numbers
    w_layout = layout.make_layout(len(rhs.shape), rc, rb)
    used = {int(a) % lhs.ndim for a in tuple(lc) + tuple(lb)}
    rows_shape = tuple(d for a, d in enumerate(lhs.shape) if a not in used)
    return {"rhs_state": self.rhs_state(rhs, w_layout),
            "lhs_state": self.lhs_state(lhs, layout.canonical_lhs(lhs, dimension_numbers),
                                        rows_shape)}


class Contraction:
  """The `dot_general` / `conv_general_dilated` argument a matched layer is run with."""

  def __init__(self, call: LayerCall):
    self.call = call

  @staticmethod
  def carried_by(module) -> bool:
    """Whether `module` already runs with a `Contraction` (the copy `run` made)."""
    attr = "conv_general_dilated" if isinstance(module, nn.Conv) else "dot_general"
    return isinstance(getattr(module, attr, None), Contraction)

  def __call__(self, lhs, rhs, *args, **kwargs):
    c = self.call
    if isinstance(c.module, nn.Conv):
      return self.conv(lhs, rhs, *args, **kwargs)
    dimension_numbers = args[0] if args else kwargs.pop("dimension_numbers")
    lhs = c.scaled_input(lhs, dimension_numbers)
    dot = qdot.make_dot_general(c.spec, key=c.key(), **c.states(lhs, rhs, dimension_numbers))
    return dot(lhs, rhs, dimension_numbers,
               preferred_element_type=kwargs.get("preferred_element_type"))

  def conv(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`'s signature, through `jq.conv_general_dilated`."""
    c = self.call
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    w_layout = qconv.kernel_layout(len(rhs.shape), dn)
    rhs_state = c.rhs_state(rhs, w_layout)
    channels_last = jnp.moveaxis(lhs, dn.lhs_spec[1], -1)
    lhs_state = c.lhs_state(lhs, channels_last.reshape(1, -1, channels_last.shape[-1]),
                            channels_last.shape[:-1])
    conv = qconv.make_conv(c.spec, key=c.key(), lhs_state=lhs_state, rhs_state=rhs_state)
    return conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, precision,
                preferred_element_type)
