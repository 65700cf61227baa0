"""quantize_model for Flax Linen: rules over module paths, through Flax's interception API.

`quantize_model(model, rules)` returns an instance of a subclass of the model's own class
whose `__call__` runs the model under `flax.linen.intercept_methods`. The interceptor sees
every `nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum` call, matches the layer's
'/'-joined path against the rules (first full match wins) and hands the layer jaxquant's
contraction through the layer's own `dot_general` / `conv_general_dilated` argument (for
`nn.Einsum`, which has none, the layer's two-line computation is run with `jq.einsum`).
No jax function is patched.

Variables: 'params' is exactly the float model's tree. Quantization state lives beside it:
  'quant'        learned quantities, trainable: `weight_lsq` / `act_lsq` (LSQ step sizes),
                 `act_pact` (PACT clip α).
  'quant_stats'  activation ranges, not trainable: `ema_lo`, `ema_hi`, `ema_count` (EMA
                 of the batch range, updated while 'quant_stats' is mutable), and after
                 `calibrate` the static range `act_lo`, `act_hi`, `act_count`; a layer
                 with a static range uses it instead of the dynamic per-batch range.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant import numerics
from jaxquant.qtensor import QTensor, unpack
from jaxquant.spec import QuantSpec, Rule

QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
EMA_DECAY = 0.99


@dataclasses.dataclass
class LayerInfo:
  """What the transform learned about one quantized layer while tracing it."""
  path: str
  kind: str                      # 'dot' | 'conv'
  rule_index: int
  kernel_shape: Tuple[int, ...]
  weight_reduce_axes: Tuple[int, ...]  # axes of the kernel sharing a scale


@dataclasses.dataclass
class Plan:
  """Everything a quantized model class needs; shared by its train/calibrate/serve views."""
  rules: Tuple[Rule, ...]
  phase: str = "train"           # 'train' | 'calibrate' | 'serve'
  layers: Dict[str, LayerInfo] = dataclasses.field(default_factory=dict)
  seen_paths: set = dataclasses.field(default_factory=set)
  warned: bool = False

  def match(self, path: str) -> Optional[int]:
    for i, rule in enumerate(self.rules):
      if rule.matches(path):
        return i
    return None


def _check_rules(rules) -> Tuple[Rule, ...]:
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


_ACTIVE = threading.local()  # plans whose interceptor is installed on this thread


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


def _make_view(model: nn.Module, plan: Plan) -> nn.Module:
  """An instance of a subclass of type(model) whose methods run under the interceptor."""
  base = type(model)
  if getattr(base, "_jq_plan", None) is not None:  # re-quantizing: start from the float class
    base = base.__mro__[1]

  def wrap(name):
    def method(self, *args, **kwargs):
      fn = getattr(base, name)
      plan = type(self)._jq_plan
      active = _ACTIVE.__dict__.setdefault("plans", set())
      if id(plan) in active:  # a method calling another: one interceptor is enough
        return fn(self, *args, **kwargs)
      active.add(id(plan))
      try:
        with nn.intercept_methods(_Interceptor(plan)):
          out = fn(self, *args, **kwargs)
      finally:
        active.discard(id(plan))
      if self.is_initializing():
        _warn_unused(type(self)._jq_plan)
      return out
    method.__name__ = name
    method.__doc__ = getattr(getattr(base, name), "__doc__", None)
    return method

  namespace = {name: wrap(name) for name in _public_methods(base)}
  namespace.update(_jq_plan=plan, __module__=base.__module__)
  cls = type(f"Quantized{base.__name__}", (base,), namespace)
  return cls(**_module_fields(model), name=model.name)


def _warn_unused(plan: Plan) -> None:
  if plan.warned:
    return
  plan.warned = True
  used = {info.rule_index for info in plan.layers.values()}
  used |= {plan.match(p) for p in plan.seen_paths}
  unused = [r.pattern for i, r in enumerate(plan.rules) if i not in used]
  if unused:
    warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: "
                  f"{sorted(plan.seen_paths)}", stacklevel=3)


def quantize_model(model, rules: Sequence[Rule]):
  """Returns `model` with its dense/dense-general/einsum/conv layers quantized by `rules`.

  Args:
    model: a Flax Linen module (any), or an `nnx.Module`.
    rules: ordered `jq.Rule`s; each layer's '/'-joined path (e.g. 'Dense_0',
      'block_0/attn/query') is matched with `re.fullmatch`; the first match wins and a
      layer no rule matches stays float. Rules matching no layer are reported with a
      warning at `init`.

  The result has the model's call signature and parameter tree. Pass
  `rngs={'quant': key}` to `apply` when a spec uses stochastic rounding, and
  `mutable=['quant_stats']` while training to track activation ranges.
  """
  rules = _check_rules(rules)
  try:
    from flax import nnx
    if isinstance(model, nnx.Module):
      from jaxquant import nnx_transform
      return nnx_transform.quantize_nnx(model, rules)
  except ImportError:  # pragma: no cover - nnx ships with flax >= 0.8
    pass
  if not isinstance(model, nn.Module):
    raise ValueError(f"model={type(model).__name__} must be a flax.linen.Module or nnx.Module")
  return _make_view(model, Plan(rules))


def plan_of(qmodel) -> Plan:
  plan = getattr(type(qmodel), "_jq_plan", None)
  if plan is None:
    raise ValueError(f"{type(qmodel).__name__} is not a jaxquant-quantized model; "
                     "use jaxquant.quantize_model first")
  return plan


def with_phase(qmodel, phase: str):
  """The same quantized model, viewed in another phase (shares the plan's layer table)."""
  plan = plan_of(qmodel)
  new_plan = dataclasses.replace(plan, phase=phase)
  new_plan.layers, new_plan.seen_paths, new_plan.warned = plan.layers, plan.seen_paths, True
  return _make_view(qmodel, new_plan)


# ----------------------------------------------------------------------------- interceptor

class _Interceptor:
  """Called by Flax around every module method while the quantized model runs."""

  def __init__(self, plan: Plan):
    self.plan = plan
    self.bypass = False  # True while a serving layer runs its detached copy

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (self.bypass or context.method_name != "__call__"
        or not isinstance(module, QUANTIZABLE)):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    self.plan.seen_paths.add(path)
    idx = self.plan.match(path)
    if idx is None:
      return next_fun(*args, **kwargs)
    layer = _Layer(module, path, idx, self.plan, self)
    if self.plan.phase == "serve":
      return layer.serve(next_fun, args, kwargs)
    return layer.qat_call(next_fun, args, kwargs)


class _Layer:
  """Quantization of one call of one matched layer."""

  def __init__(self, module, path, rule_index, plan: Plan, interceptor: _Interceptor):
    self.module, self.path, self.plan = module, path, plan
    self.interceptor = interceptor
    self.rule = plan.rules[rule_index]
    self.rule_index = rule_index
    self.spec = self.rule.dot_spec()

  # -- state ------------------------------------------------------------------------------
  def _key(self):
    specs = (self.rule.act, self.rule.weight, self.rule.grad)
    if any(s is not None and s.rounding == "stochastic" for s in specs):
      if not self.module.has_rng("quant"):
        raise ValueError(f"layer {self.path!r} uses stochastic rounding: pass "
                         "rngs={'quant': key} to apply")
      return self.module.make_rng("quant")
    return None

  def _act_learned(self, lhs):
    act = self.rule.act
    if act is None or act.ste not in ("lsq", "pact"):
      return None
    name = "act_lsq" if act.ste == "lsq" else "act_pact"
    shape = (1,) * lhs.ndim
    init = lambda: numerics.init_learned(jax.lax.stop_gradient(lhs), act,
                                         tuple(range(lhs.ndim))).reshape(shape)
    return self.module.variable("quant", name, init).value.reshape(shape)

  def _weight_learned(self, rhs, reduce_axes):
    w = self.rule.weight
    if w is None or w.ste not in ("lsq", "pact"):
      return None
    name = "weight_lsq" if w.ste == "lsq" else "weight_pact"
    init = lambda: numerics.init_learned(jax.lax.stop_gradient(rhs), w, reduce_axes)
    return self.module.variable("quant", name, init).value

  def _act_range(self, lhs):
    """The static (lo, hi) once `calibrate` stored one, else None (dynamic ranges).

    Whether a layer is calibrated is structural (the 'act_hi' variable exists), so the
    choice is made at trace time. While 'quant_stats' is mutable the batch range is also
    tracked: an EMA ('ema_lo', 'ema_hi') in training, the calibration statistic
    ('act_lo', 'act_hi': max over batches for absmax, mean of per-batch clips otherwise)
    in the calibrate phase.
    """
    act = self.rule.act
    if act is None or act.format in ("binary", "ternary"):
      return None
    m = self.module
    calibrating = self.plan.phase == "calibrate"
    tracking = m.is_mutable_collection("quant_stats") and not m.is_initializing()
    if tracking or m.is_initializing():
      prefix = "act" if calibrating else "ema"
      zeros = lambda dtype=jnp.float32: jnp.zeros((), dtype)
      lo = m.variable("quant_stats", f"{prefix}_lo", zeros)
      hi = m.variable("quant_stats", f"{prefix}_hi", zeros)
      count = m.variable("quant_stats", f"{prefix}_count", lambda: zeros(jnp.int32))
      if tracking:
        cur_lo, cur_hi = _batch_range(jax.lax.stop_gradient(lhs).astype(jnp.float32), act)
        first = count.value == 0
        n = count.value.astype(jnp.float32)
        if not calibrating:
          d = EMA_DECAY
          lo.value = jnp.where(first, cur_lo, d * lo.value + (1 - d) * cur_lo)
          hi.value = jnp.where(first, cur_hi, d * hi.value + (1 - d) * cur_hi)
        elif act.calibration == "absmax":
          lo.value = jnp.where(first, cur_lo, jnp.minimum(lo.value, cur_lo))
          hi.value = jnp.where(first, cur_hi, jnp.maximum(hi.value, cur_hi))
        else:
          lo.value = (lo.value * n + cur_lo) / (n + 1)
          hi.value = (hi.value * n + cur_hi) / (n + 1)
        count.value = count.value + 1
    if calibrating or not m.has_variable("quant_stats", "act_hi"):
      return None
    shape = (1,) * lhs.ndim
    return (m.get_variable("quant_stats", "act_lo").reshape(shape),
            m.get_variable("quant_stats", "act_hi").reshape(shape))

  def _record(self, kind, kernel_shape, reduce_axes):
    self.plan.layers[self.path] = LayerInfo(self.path, kind, self.rule_index,
                                            tuple(kernel_shape), tuple(reduce_axes))

  # -- the layer computations -------------------------------------------------------------
  def qat_call(self, next_fun, args, kwargs):
    """The layer's own call with jaxquant's contraction (QAT, and serving of layers whose
    weights stayed float)."""
    m = self.module
    if isinstance(m, nn.Einsum):
      return self.einsum_call(*args, **kwargs)
    attr = "conv_general_dilated" if isinstance(m, nn.Conv) else "dot_general"
    if getattr(m, attr + "_cls", None) is not None:
      raise ValueError(f"layer {self.path!r} sets {attr}_cls; jaxquant cannot quantize it")
    fn = self.conv_fn if attr == "conv_general_dilated" else self.dot_fn
    old = getattr(m, attr)
    object.__setattr__(m, attr, fn)  # the layer's own argument, for this call only
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(m, attr, old)

  def dot_fn(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
             **unused):
    (_, rc), _ = dimension_numbers
    reduce_axes = tuple(int(a) for a in rc)
    self._record("dot", rhs.shape, reduce_axes)
    return qdot.dot_general(
        lhs, rhs, dimension_numbers, self.spec, key=self._key(),
        preferred_element_type=preferred_element_type, lhs_learned=self._act_learned(lhs),
        rhs_learned=self._weight_learned(rhs, reduce_axes), lhs_range=self._act_range(lhs))

  def conv_fn(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    w = self.rule.weight
    out_dim = dn.rhs_spec[0]
    reduce_axes = tuple(range(rhs.ndim)) if (w is not None and w.granularity == "tensor") \
        else tuple(d for d in range(rhs.ndim) if d != out_dim)
    self._record("conv", rhs.shape, reduce_axes)
    learned_w = self._weight_learned(rhs, reduce_axes)
    return qconv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        spec=self.spec, key=self._key(), lhs_learned=self._act_learned(lhs),
        rhs_learned=learned_w, lhs_range=self._act_range(lhs))

  def einsum_call(self, inputs, einsum_str=None):
    """nn.Einsum.__call__ with the contraction through jq.einsum."""
    m = self.module
    einsum_str = nn.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
    bias = None
    if m.use_bias:
      bias_shape, bshape = m._get_bias_shape(einsum_str, inputs, kernel)
      bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
    inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
    y = self.einsum_with(einsum_str, inputs, kernel)
    if bias is not None:
      y = y + jnp.reshape(bias, bshape)
    return y

  def einsum_with(self, einsum_str, inputs, kernel):
    # len(shape): the kernel may be a serving QTensor, which has no ndim.
    dims, perm, lsum, rsum = qdot.einsum_dimension_numbers(einsum_str, inputs.ndim,
                                                           len(kernel.shape))
    if isinstance(kernel, QTensor):
      # jq.einsum takes arrays only; dot_general takes the QTensor (serving path). The
      # glue is jq.einsum's own, so the result matches the QAT forward exactly.
      lhs_range = self._act_range(inputs)
      if lsum:
        inputs = jnp.sum(inputs, axis=lsum)
      y = qdot.dot_general(inputs, kernel, dims, self.spec, key=self._key(),
                           lhs_range=lhs_range, lhs_learned=self._act_learned(inputs))
      return y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)
    if rsum:
      raise ValueError(f"layer {self.path!r}: einsum {einsum_str!r} sums kernel axes away")
    reduce_axes = tuple(dims[0][1])
    self._record("dot", kernel.shape, reduce_axes)
    return qdot.einsum(einsum_str, inputs, kernel, self.spec, key=self._key(),
                       lhs_learned=self._act_learned(inputs),
                       rhs_learned=self._weight_learned(kernel, reduce_axes),
                       lhs_range=self._act_range(inputs))

  # -- serving ----------------------------------------------------------------------------
  def serve(self, next_fun, args, kwargs):
    """Runs the layer on stored codes; layers whose weights stayed float run as in QAT."""
    m = self.module
    info = self.plan.layers.get(self.path)
    if info is None or not m.has_variable("serving", "kernel"):
      return self.qat_call(next_fun, args, kwargs)
    entry = m.get_variable("serving", "kernel")
    q = serving_qtensor(entry, self.rule.weight, info.kernel_shape)
    if isinstance(m, nn.Einsum):
      return self._serve_einsum(q, *args, **kwargs)
    attr = "conv_general_dilated" if isinstance(m, nn.Conv) else "dot_general"
    if attr == "dot_general":
      def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        return qdot.dot_general(lhs, q, dimension_numbers, self.spec, key=self._key(),
                                preferred_element_type=preferred_element_type,
                                lhs_range=self._act_range(lhs),
                                lhs_learned=self._act_learned(lhs))
    else:
      def fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
             precision=None, preferred_element_type=None):
        return qconv.conv_general_dilated(
            lhs, q, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
            spec=self.spec, key=self._key(), lhs_range=self._act_range(lhs),
            lhs_learned=self._act_learned(lhs))
    # A detached copy of the layer computes on a stand-in kernel of the right shape (the
    # int8 codes); `fn` ignores that operand and contracts with `q`, so the stand-in's
    # float conversion is dead code that XLA removes.
    clone = type(m)(**{**_module_fields(m), attr: fn}, parent=None)
    params = dict(m.variables.get("params", {}))
    params["kernel"] = jnp.zeros(info.kernel_shape, jnp.int8)
    self.interceptor.bypass = True  # the copy is not a layer of the model
    try:
      return clone.apply({"params": params}, *args, **kwargs)
    finally:
      self.interceptor.bypass = False

  def _serve_einsum(self, q, inputs, einsum_str=None):
    m = self.module
    einsum_str = nn.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    y = self.einsum_with(einsum_str, inputs, q)
    if m.use_bias:
      bias = m.get_variable("params", "bias")
      _, bshape = m._get_bias_shape(einsum_str, inputs, jnp.zeros(q.shape, jnp.int8))
      y = y + jnp.reshape(bias, bshape).astype(y.dtype)
    return y



def _batch_range(x, spec: QuantSpec):
  """(lo, hi) of this batch by the spec's calibration method, over the whole tensor."""
  axes = tuple(range(x.ndim))
  tensor_spec = dataclasses.replace(spec, granularity="tensor", group_size=None,
                                    rounding="nearest", ste="identity")
  scale, zp = numerics.calibrate(x, tensor_spec, axes)
  scale = scale.reshape(())
  if spec.format in numerics.FP8_DTYPES:
    hi = scale * numerics.FP8_MAX[spec.format]
    return -hi, hi
  qmin, qmax = numerics.int_range(tensor_spec)
  if zp is None:
    return -scale * qmax, scale * qmax
  zp = zp.reshape(()).astype(jnp.float32)
  return (qmin - zp) * scale, (qmax - zp) * scale


def serving_qtensor(entry: Dict[str, jax.Array], spec: QuantSpec, shape) -> QTensor:
  """Rebuilds the QTensor of a stored serving weight (unpacking sub-byte codes)."""
  if "packed" in entry:
    bits = _storage_bits(spec)
    values = unpack(entry["packed"], bits, tuple(shape))
  else:
    values = entry["values"]
  return QTensor(values, entry["scale"], entry.get("zero_point"))


def _storage_bits(spec: QuantSpec) -> int:
  """Bits per stored code: 1 binary, 2 ternary / int2, 4 for int3–4, else a whole byte."""
  if spec.format == "binary":
    return 1
  if spec.format == "ternary" or (spec.format == "int" and spec.bits == 2):
    return 2
  if spec.format == "int" and spec.bits <= 4:
    return 4
  return 8
