"""quantize_model for Flax Linen: rules over module paths, through Flax's interception API.

`quantize_model(model, rules)` returns an instance of a subclass of the model's own class
whose public methods run under `flax.linen.intercept_methods`. The interceptor sees every
`nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum` call (and `nn.Embed`'s
`__call__` / `attend`: its table is quantized per row, see `jaxquant.linen_embed`), matches
the layer's '/'-joined path against the rules (first full match wins) and runs a copy of
the layer (`jaxquant.linen_layer`), bound to the layer's own scope, whose `dot_general` /
`conv_general_dilated` argument is jaxquant's contraction (`nn.Einsum`, which takes none,
runs its two-line computation with `jq.einsum`). No jax function is patched and no module is mutated.

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

import dataclasses
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
from flax import nnx

from jaxquant import nnx_functional
from jaxquant import nnx_transform
from jaxquant import observers as obs
from jaxquant import state
from jaxquant.linen_conv_transpose import ConvTransposeCall
from jaxquant.linen_embed import EmbedCall
from jaxquant.linen_layer import Contraction, LayerCall, module_fields
from jaxquant.spec import Rule

QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.ConvTranspose)
WEIGHT_NAMES = ("kernel", "embedding")  # a layer holding one of these has a quantizable weight


class FloatLayersWarning(UserWarning):
  """Layers holding a weight (a 'kernel' or an 'embedding') that no rule matched, so
  they stay float: listed once at `init` and once at `jq.convert`."""


def weight_layers(params, prefix: str = ""):
  """'/'-joined paths of the dicts in a 'params' tree holding a 'kernel' or an
  'embedding' ('' for a model that is itself one layer), in sorted order."""
  if isinstance(params, dict) and any(n in params for n in WEIGHT_NAMES):
    yield prefix
  for k, v in sorted(params.items()) if isinstance(params, dict) else ():
    if isinstance(v, dict):
      yield from weight_layers(v, f"{prefix}/{k}" if prefix else k)


def warn_float_layers(paths, where: str) -> None:
  """One `FloatLayersWarning` listing `paths` (layers with a weight left float)."""
  if paths:
    shown = [p or "<the model itself>" for p in paths]
    warnings.warn(f"jaxquant ({where}): {len(shown)} layer(s) holding a weight matched no "
                  f"rule and stay float: {shown}. To quantize them add a rule whose pattern "
                  f"matches their paths (e.g. jq.Rule({'|'.join(paths)!r}, weight=...), or "
                  "'.*' last); jq.size_report counts them as float bytes",
                  FloatLayersWarning, stacklevel=4)


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
      if name == "setup":  # a top-level nn.Embed's own table and state: nothing to report
        return out
      if name == "__call__" or self.is_initializing():
        interceptor.warn_unused()
      if self.is_initializing():
        interceptor.check_weight_layers(self)
      return out
    method.__name__ = name
    method.__doc__ = getattr(getattr(base, name), "__doc__", None)
    return method

  names = _public_methods(base)
  if issubclass(base, nn.Embed):  # a model that is one nn.Embed: its setup is intercepted too
    names += ("setup",)
  namespace = {name: wrap(name) for name in names}
  namespace.update(_jq_config=config, __module__=base.__module__)
  cls = type(f"Quantized{base.__name__}", (base,), namespace)
  return cls(**module_fields(model), name=model.name)


def quantize_model(model, rules: Sequence[Rule], *, observers=DEFAULT_OBSERVERS, rngs=None):
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
    rngs: NNX only: an `nnx.Rngs` whose 'quant' stream gives stochastic rounding a fresh
      key on every layer call (needed when a rule asks for stochastic rounding).

  The result has the model's call signature and parameter tree. Pass
  `rngs={'quant': key}` to `apply` when a spec uses stochastic rounding, and
  `mutable=['quant_stats']` while training to track activation ranges.
  """
  rules = check_rules(rules)
  if isinstance(model, nnx.Module):
    if tuple(observers) != DEFAULT_OBSERVERS:
      raise ValueError("observers= is for Linen models; quantized NNX layers track the "
                       "default EMA range")
    return nnx_transform.quantize_nnx(model, rules, rngs)
  if not isinstance(model, nn.Module):
    raise ValueError(f"model={type(model).__name__} must be a flax.linen.Module or nnx.Module")
  if rngs is not None:
    raise ValueError("rngs is for nnx models; a Linen model takes its stochastic-rounding "
                     "key at apply: model.apply(variables, x, rngs={'quant': key})")
  return _make_view(model, QuantConfig(rules, tuple(observers)))


def config_of(qmodel) -> QuantConfig:
  """The `QuantConfig` of a model returned by `quantize_model`."""
  if isinstance(qmodel, nnx.Module):  # a quantized NNX model, or its functional view
    qmodel = nnx_functional.NNXApply(qmodel)
  if isinstance(qmodel, nnx_functional.NNXApply) and qmodel.rules is not None:
    return QuantConfig(qmodel.rules)
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
  if isinstance(qmodel, nnx_functional.NNXApply):
    return qmodel.with_run(observers=tuple(observers), mask=mask,
                           float_forward=bool(float_forward))
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
    self.kinds: Dict[str, str] = {}  # path -> class name of every module called

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      self.kinds.setdefault("/".join(module.path), type(module).__name__)
    if isinstance(module, nn.Embed) and context.method_name in EmbedCall.METHODS:
      path = "/".join(module.path)
      idx = self.config.match(path)
      self.seen[path] = idx
      if idx is None:
        return next_fun(*args, **kwargs)
      call = EmbedCall(module, path, self.config.rules[idx], self.config)
      return getattr(call, EmbedCall.METHODS[context.method_name])(next_fun, *args, **kwargs)
    if (context.method_name != "__call__" or not isinstance(module, QUANTIZABLE)
        or Contraction.carried_by(module)):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    idx = self.config.match(path)
    self.seen[path] = idx
    if idx is None:
      return next_fun(*args, **kwargs)
    call = ConvTransposeCall if isinstance(module, nn.ConvTranspose) else LayerCall
    return call(module, path, self.config.rules[idx], self.config).run(args, kwargs)

  def check_weight_layers(self, model) -> None:
    """At init: every layer of `model` holding a weight is quantized, or matched by no
    rule (then listed in one `FloatLayersWarning`); one a rule matched that jaxquant
    cannot quantize is a ValueError naming it."""
    prefix = "/".join(model.path)
    params = state.mutable_copy(model.variables.get("params", {}))
    left_float = []
    for rel in weight_layers(params):
      path = "/".join(p for p in (prefix, rel) if p)
      if self.seen.get(path) is not None:
        continue
      idx = self.config.match(path)
      if idx is not None:
        kind, pattern = self.kinds.get(path, "a module"), self.config.rules[idx].pattern
        raise ValueError(
            f"layer {path!r} ({kind}) holds a weight and rule {pattern!r} matches it, "
            f"but jaxquant quantizes only {[c.__name__ for c in QUANTIZABLE]} "
            "and nn.Embed layers: write the rules so that none matches this layer (e.g. "
            f"a pattern like '(?!{path}$).*'), or build it from those layers")
      left_float.append(path)
    warn_float_layers(left_float, "init")

  def warn_unused(self) -> None:
    used = set(self.seen.values())
    unused = [r.pattern for i, r in enumerate(self.config.rules) if i not in used]
    if unused:
      warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: "
                    f"{sorted(self.seen)}", stacklevel=3)


