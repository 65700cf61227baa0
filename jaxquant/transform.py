"""quantize_model for Flax Linen: rules over module paths, through Flax's interception API.

`quantize_model(model, rules)` returns an instance of a subclass of the model's own class
whose public methods run under `flax.linen.intercept_methods`. The interceptor sees every
`nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum` call (and `nn.Embed`'s
`__call__` / `attend`: its table is quantized per row, see `_EmbedCall`), matches the layer's
'/'-joined path against the rules (first full match wins) and runs a copy of the layer,
bound to the layer's own scope, whose `dot_general` / `conv_general_dilated` argument is
jaxquant's contraction (`nn.Einsum`, which takes none, runs its two-line computation
with `jq.einsum`). No jax function is patched and no module is mutated.

The layer's kernel decides QAT or serving: a float kernel is quantized on the fly
(`jq.quantize_weight` inside the contraction); a `QTensor` kernel, as `jq.convert`
stores it, is used as it is. Both run the same contraction code.

Variables: 'params' is exactly the float model's tree (after `convert`, quantized kernels
are `QTensor`s at the same paths). Quantization state lives beside it, in the
collections and under the keys `jaxquant.state` names: learned LSQ / PACT quantities in
'quant' (trainable); in 'quant_stats' the kernel's recorded layout, the observers'
states (by default the EMA of the activation range, updated while 'quant_stats' is
mutable) and, after `calibrate`, the static range a layer then uses instead of the
batch's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant.einsum import einsum_compiled, einsum_dimension_numbers
from jaxquant import formats
from jaxquant import layout
from jaxquant import nnx_transform
from jaxquant import numerics
from jaxquant import observers as obs
from jaxquant import state
from jaxquant import fake_quant as fake_quant_lib
from jaxquant.fake_quant import OperandState
from jaxquant.qtensor import QTensor, plane
from jaxquant.spec import DotSpec, Rule

QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
DEFAULT_OBSERVERS = ((state.EMA, obs.ema_range()),)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What a quantized model class carries: its rules, the observers it runs and, for one
  calibration step, the token mask its observers apply (`jq.calibrate(masks=...)`)."""
  rules: Tuple[Rule, ...]
  observers: Tuple[Tuple[str, obs.ObserverFactory], ...] = DEFAULT_OBSERVERS
  mask: Any = dataclasses.field(default=None, compare=False)
  float_forward: bool = False  # calibration: observers see the float model's activations

  def match(self, path: str) -> Optional[int]:
    """Index of the first rule matching `path`, or None."""
    for i, rule in enumerate(self.rules):
      if rule.matches(path):
        return i
    return None

  def rule_for(self, path: str) -> Optional[Rule]:
    i = self.match(path)
    return None if i is None else self.rules[i]


def check_rules(rules) -> Tuple[Rule, ...]:
  """Rules as a tuple, each a `jq.Rule` (which validated itself)."""
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  for i, rule in enumerate(rules):
    if not isinstance(rule, Rule):
      raise ValueError(f"rules[{i}]={rule!r} must be a jaxquant.Rule")
  return rules


def _module_fields(module: nn.Module) -> Dict[str, Any]:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in ("parent", "name")}


_ACTIVE = threading.local()  # configs whose interceptor is installed on this thread


def _public_methods(base) -> Tuple[str, ...]:
  """Methods a user can `apply(..., method=...)` or call from a parent: `__call__` and
  every public function defined by the model's own classes (not Flax's Module API)."""
  names = {"__call__"}
  for klass in base.__mro__:
    if klass in (nn.Module, object) or not issubclass(klass, nn.Module):
      continue
    for name, value in vars(klass).items():
      if not name.startswith("_") and name != "setup" and callable(value) \
          and not isinstance(value, (type, staticmethod, classmethod)):
        names.add(name)
  return tuple(sorted(names))


def _make_view(model: nn.Module, config: QuantConfig) -> nn.Module:
  """An instance of a subclass of type(model) whose methods run under the interceptor."""
  base = float_class(model)

  def wrap(name):
    def method(self, *args, **kwargs):
      fn = getattr(base, name)
      cfg = type(self)._jq_config
      active = _ACTIVE.__dict__.setdefault("configs", set())
      if id(cfg) in active:  # a method calling another: one interceptor is enough
        return fn(self, *args, **kwargs)
      active.add(id(cfg))
      interceptor = _Interceptor(cfg)
      try:
        with nn.intercept_methods(interceptor):
          out = fn(self, *args, **kwargs)
      finally:
        active.discard(id(cfg))
      if name == "__call__" or self.is_initializing():
        interceptor.warn_unused()
      return out
    method.__name__ = name
    method.__doc__ = getattr(getattr(base, name), "__doc__", None)
    return method

  namespace = {name: wrap(name) for name in _public_methods(base)}
  namespace.update(_jq_config=config, __module__=base.__module__)
  cls = type(f"Quantized{base.__name__}", (base,), namespace)
  return cls(**_module_fields(model), name=model.name)


def _shares_batch_range(act) -> bool:
  """Whether a layer computes its activation's batch range once and hands it to both the
  quantizer (as its clip range) and the EMA observer: per-tensor int / fp8 ranges
  calibrated by absmax or percentile, on a grid not learned (LSQ / PACT ignore ranges).
  Both statistics are order-free (min / max, order statistics), so computing them on the
  observers' [B, M, K] view of the input gives the quantizer's values bit for bit. MSE
  sums errors, whose rounding depends on the layout: it keeps its own search."""
  return (act is not None and formats.get(act.format).clip_range
          and act.granularity == "tensor" and act.calibration in ("absmax", "percentile")
          and act.learned is None)


def quantize_model(model, rules: Sequence[Rule], *, observers=DEFAULT_OBSERVERS):
  """Returns `model` with its dense/dense-general/einsum/conv layers quantized by `rules`.

  Args:
    model: a Flax Linen module (any), or an `nnx.Module`.
    rules: ordered `jq.Rule`s; each layer's '/'-joined path (e.g. 'Dense_0',
      'block_0/attn/query') is matched with `re.fullmatch`; the first match wins and a
      layer no rule matches stays float. Rules matching no layer are reported with a
      warning at `init` and at every trace of `__call__`.
    observers: named observer factories (`jaxquant.observers`) run on the input of every
      quantized layer while 'quant_stats' is mutable; the default tracks the EMA of the
      activation range. Linen only.

  The result has the model's call signature and parameter tree. Pass
  `rngs={'quant': key}` to `apply` when a spec uses stochastic rounding, and
  `mutable=['quant_stats']` while training to track activation ranges.
  """
  rules = check_rules(rules)
  if isinstance(model, nnx.Module):
    return nnx_transform.quantize_nnx(model, rules)
  if not isinstance(model, nn.Module):
    raise ValueError(f"model={type(model).__name__} must be a flax.linen.Module or nnx.Module")
  return _make_view(model, QuantConfig(rules, tuple(observers)))


def config_of(qmodel) -> QuantConfig:
  """The `QuantConfig` of a model returned by `quantize_model`."""
  config = getattr(type(qmodel), "_jq_config", None)
  if config is None:
    raise ValueError(f"{type(qmodel).__name__} is not a jaxquant-quantized model; "
                     "use jaxquant.quantize_model first")
  return config


def float_class(model):
  """The user's own Linen class (a quantized model's base class)."""
  cls = type(model)
  return cls.__mro__[1] if getattr(cls, "_jq_config", None) is not None else cls


def with_observers(qmodel, observers, mask=None, float_forward: bool = False) -> nn.Module:
  """The same quantized model running other observers (e.g. calibration statistics),
  optionally with a token `mask` (1 = a real row) that every observer applies: its
  shape must be the leading axes of each quantized layer's input rows (see
  `jq.calibrate`). Build it where the mask lives (inside the jitted step). With
  `float_forward` every matched layer computes in float (its observers still run)."""
  config = dataclasses.replace(config_of(qmodel), observers=tuple(observers), mask=mask,
                               float_forward=bool(float_forward))
  return _make_view(qmodel, config)


# ----------------------------------------------------------------------------- interceptor

class _Interceptor:
  """Called by Flax around every module method during one call of the quantized model;
  it remembers which paths that call met, to report rules that matched none."""

  def __init__(self, config: QuantConfig):
    self.config = config
    self.seen: Dict[str, Optional[int]] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Embed) and context.method_name in _EmbedCall.METHODS:
      path = "/".join(module.path)
      idx = self.config.match(path)
      self.seen[path] = idx
      if idx is None:
        return next_fun(*args, **kwargs)
      call = _EmbedCall(module, path, self.config.rules[idx], self.config)
      return getattr(call, _EmbedCall.METHODS[context.method_name])(next_fun, *args, **kwargs)
    if (context.method_name != "__call__" or not isinstance(module, QUANTIZABLE)
        or _Contraction.carried_by(module)):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    idx = self.config.match(path)
    self.seen[path] = idx
    if idx is None:
      return next_fun(*args, **kwargs)
    return _LayerCall(module, path, self.config.rules[idx], self.config).run(args, kwargs)

  def warn_unused(self) -> None:
    used = set(self.seen.values())
    unused = [r.pattern for i, r in enumerate(self.config.rules) if i not in used]
    if unused:
      warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: "
                    f"{sorted(self.seen)}", stacklevel=3)


def _promote_keeping_qtensors(promote):
  """The layer's `promote_dtype`, passing stored QTensor kernels through untouched."""
  def promote_dtype(*args, **kwargs):
    arrays = [a for a in args if a is not None and not isinstance(a, QTensor)]
    promoted = iter(promote(*arrays, **kwargs))
    return [a if a is None or isinstance(a, QTensor) else next(promoted) for a in args]
  return promote_dtype


def _stored_kernel(module) -> Optional[QTensor]:
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
      stored = _stored_kernel(self) if name == "kernel" else None
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


def _variable(module, col: str, name: str, init):
  """`module.variable(col, name, init)`, or the existing variable as a `_Ref`."""
  if module.has_variable(col, name):
    return _Ref(module, col, name)
  return module.variable(col, name, init)


class _LayerCall:
  """One call of one matched layer: its quantization state, then its computation."""

  def __init__(self, module, path: str, rule: Rule, config: QuantConfig):
    self.module, self.path, self.rule, self.config = module, path, rule, config
    self.spec = DotSpec() if config.float_forward else rule.dot_spec()

  def run(self, args, kwargs):
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
    fields = {**_module_fields(m), attr: _Contraction(self),
              "promote_dtype": _promote_keeping_qtensors(m.promote_dtype)}
    return _reading_stored_kernels(type(m))(**fields, parent=m.scope)(*args, **kwargs)

  # -- state ------------------------------------------------------------------------------
  def key(self):
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
      if updating and mask_BM is None and not has_static and _shares_batch_range(act):
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
          refs = {k: _variable(m, state.QUANT_STATS, state.observer_key(name, k),
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
      learned = _variable(m, state.QUANT, state.learned_key(state.ACT, act.learned),
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
    if w is not None and w.granularity == "group":
      k = layout.canonical_shape(kernel.shape, w_layout)[1]
      if k % w.group_size:
        raise ValueError(f"layer {self.path!r}: weight group_size={w.group_size} does not "
                         f"divide its {k} contracted input features")
    if self._tracking():
      axes = state.kernel_axes(w_layout)
      _variable(m, state.QUANT_STATS, state.KERNEL_AXES, lambda: jnp.asarray(axes))
    if w is None or not w.learned or isinstance(kernel, QTensor):
      return OperandState()
    init = lambda: layout.init_learned_compiled(jax.lax.stop_gradient(kernel), spec=w,
                                                layout=w_layout)
    key = state.learned_key(state.WEIGHT, w.learned)
    return OperandState(learned=_variable(m, state.QUANT, key, init).value)

  # -- nn.Einsum ----------------------------------------------------------------------------
  def einsum_call(self, inputs, einsum_str=None):
    """nn.Einsum.__call__ with the contraction through jq.einsum."""
    m = self.module
    einsum_str = nn.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    kernel = _stored_kernel(m)
    if kernel is None:
      kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
    bias = None
    if m.use_bias:
      bias_shape, bshape = m._get_bias_shape(einsum_str, inputs, kernel)  # pylint: disable=protected-access
      bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
    inputs, kernel, bias = _promote_keeping_qtensors(m.promote_dtype)(
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


class _Contraction:
  """The `dot_general` / `conv_general_dilated` argument a matched layer is run with."""

  def __init__(self, call: _LayerCall):
    self.call = call

  @staticmethod
  def carried_by(module) -> bool:
    attr = "conv_general_dilated" if isinstance(module, nn.Conv) else "dot_general"
    return isinstance(getattr(module, attr, None), _Contraction)

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


EMBED_LAYOUT = layout.make_layout(2, (1,))  # table [V, D]: D contracted, one scale per row


class _EmbedCall(_LayerCall):
  """One call of a matched `nn.Embed`: its table [V, D] is a weight whose contracted
  axis is D (as in `attend`, query · tableᵀ), so per-channel scales are per vocabulary
  row and groups run along D. `__call__` gathers rows of the (fake-)quantized table, or
  of a stored `QTensor` (only the gathered rows are unpacked and dequantized);
  `attend` is a contraction through `jq.dot_general` (the rule's act spec quantizes the
  query: the real s8 dot with per-row = per-output-channel weight scales)."""

  METHODS = {"setup": "setup", "__call__": "gather", "attend": "attend"}

  def __init__(self, module, path: str, rule: Rule, config: QuantConfig):
    super().__init__(module, path, rule, config)
    if rule.ptq is not None:
      raise ValueError(f"layer {path!r} is an nn.Embed: ptq={rule.ptq.method!r} is not "
                       "supported for embedding tables (round-to-nearest per row only)")
    if rule.act is not None and rule.act.learned:
      raise ValueError(f"layer {path!r} is an nn.Embed: act.ste={rule.act.ste!r} (a learned "
                       "activation scale for attend's query) is not supported")

  def setup(self, next_fun, *args, **kwargs):
    """The table, then (nn.Embed is a `setup` module: variables are made only here) the
    quantization state: the recorded layout, a learned weight scale, and the observers'
    states of attend's query. A stored QTensor table is used as it is (Flax's `param`
    would check its packed bytes' shape against the float table's)."""
    m = self.module
    stored = m.get_variable("params", "embedding") if m.has_variable("params", "embedding") \
        else None
    if isinstance(stored, QTensor):
      m.embedding = stored
    else:
      next_fun(*args, **kwargs)
    if self._tracking():
      self.rhs_state(m.embedding, EMBED_LAYOUT)
      probe = jnp.zeros((1, 1, m.features), jnp.float32)  # observers' states: shapes only
      for name, factory in self.config.observers:
        observer = factory(self.rule)
        if observer is not None:
          for k, v in observer.init(probe).items():
            _variable(m, state.QUANT_STATS, state.observer_key(name, k), lambda v=v: v)
    return None

  def _table_state(self):
    table = self.module.embedding
    return table, self.rhs_state(table, EMBED_LAYOUT)

  def gather(self, next_fun, ids):
    """Rows `ids` of the quantized table (Embed.__call__)."""
    m, w = self.module, self.rule.weight
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
      raise ValueError(f"layer {self.path!r}: Embed input must be an integer array")
    if w is None or self.config.float_forward:  # act-only rule: it quantizes attend's query
      return next_fun(ids)
    table, rhs_state = self._table_state()
    if isinstance(table, QTensor):
      return gather_rows(table, ids, m.dtype or jnp.float32)
    (table,) = m.promote_dtype(table, dtype=m.dtype, inexact=False)
    return jnp.take(fake_quant_table(table, w, key=self.key(), learned=rhs_state.learned),
                    ids, axis=0)

  def attend(self, next_fun, query):
    """query · tableᵀ through `jq.dot_general` (Embed.attend)."""
    del next_fun
    m = self.module
    table = m.embedding
    if isinstance(table, QTensor):
      (query,) = m.promote_dtype(query, dtype=m.dtype)
    else:
      query, table = m.promote_dtype(query, table, dtype=m.dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    return qdot.dot_general_compiled(query, table, dimension_numbers=dims, spec=self.spec,
                                     key=self.key(), **self.states(query, table, dims))


def fake_quant_table(table, spec, *, key=None, learned=None):
  """The table [V, D] quantized per row (groups along D) and dequantized, with the
  spec's gradient rule: the codes and scales `jq.quantize_weight(table, spec,
  EMBED_LAYOUT)` stores, so a gather of it equals `gather_rows` of the stored table."""
  w_BKN = layout.canonical(table, EMBED_LAYOUT)
  learned_BGN = layout.canonical_scale(learned, EMBED_LAYOUT)
  deq = fake_quant_lib.fake_quant(w_BKN, spec, reduce_axes=(1,), key=key, learned=learned_BGN)
  return jnp.transpose(deq[0], (1, 0))


def gather_rows(q: QTensor, ids, dtype=jnp.float32):
  """Dequantized rows `ids` of a stored table QTensor [V, D]: only those rows' codes
  are unpacked and dequantized, with their own scales. A packed table whose V is a
  multiple of the codes per byte p holds row v in bit plane v // (V/p), at byte row
  v % (V/p) (`jq.pack`'s bit planes), so a gather reads ids.size rows of D bytes."""
  v, d = q.shape
  ids = jnp.asarray(ids)
  if q.packed and q.int8_codes and v % (8 // q.spec.storage_bits) == 0:
    bits = q.spec.storage_bits
    per_plane = v // (8 // bits)
    rows = jnp.take(q.values.reshape(per_plane, d), ids % per_plane, axis=0)
    codes = plane(rows, (ids // per_plane)[..., None], bits)
  else:
    q = q.unpacked()
    codes = jnp.take(q.values, ids, axis=0)

  def rows_of(t):
    if t is None:
      return None
    if t.shape[0] == 1:  # one scale for the whole table
      return t.reshape((1,) * ids.ndim + t.shape[1:])
    return jnp.take(t, ids, axis=0)
  return QTensor(codes, rows_of(q.scale), rows_of(q.zero_point)).dequantize(dtype)
