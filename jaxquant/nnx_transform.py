"""quantize_model for Flax NNX modules: the same rules, paths, state and layer code as Linen.

NNX layers are Python objects, so the transform walks the module graph once and turns
each matched `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum` into an
instance of a small subclass (the module is modified in place and returned; its
parameters are unchanged). That subclass's `__call__` is a bridge to the Linen path: it
runs the layer's Linen twin (`nn.Dense`, `nn.DenseGeneral`, `nn.Conv`, `nn.Einsum` with
the same fields), nested under the layer's own NNX path, through the Linen interceptor
(`jaxquant.linen_layer.LayerCall`), on the NNX layer's variables. Every quantization
feature therefore behaves as in Linen, with no second implementation: weight and
activation specs, LSQ / PACT scales, observers, static ranges, PTQ input scales and
stored `QTensor` kernels.

The quantization state lives on the layer as NNX variables named by `jaxquant.state`:
`QuantParam` for the 'quant' collection (learned LSQ step sizes, PACT α: trainable,
like a Param) and `QuantStat` for 'quant_stats' (the recorded kernel layout, observer
states, static ranges). So `nnx.state(model)` holds what Linen's variables hold, at the
same '/'-joined paths (`jaxquant.nnx_functional` converts one into the other).

A direct call `model(x)` creates learned activation scales on first use (call the model
once on an example before taking gradients, as Linen's `init` does). Statistics follow
NNX's train / eval mode, the one BatchNorm has: each quantized layer carries
`use_running_average`, True (eval) when quantized; after `model.train()` (False) every
call updates its observers (the EMA of the activation range) as a Linen `apply` with
mutable 'quant_stats' does, and static-range specs quantize with the batch's own range;
after `model.eval()` calls update nothing and use the stored ranges. Under `nnx.jit` /
`nnx.grad` the updates come back as NNX state updates. `jq.calibrate` / `jq.convert`
run a copy of the model in the mode they need, whatever the model's, and the serving
model `jq.convert` returns is in eval mode.
Stochastic rounding draws a fresh key on every call of a layer whose rule asks for it,
from the 'quant' stream of the `nnx.Rngs` given to `jq.quantize_model(model, rules,
rngs=nnx.Rngs(quant=seed))` (the layers share that stream, so its count advances as
NNX state, under nnx.jit too); without `rngs` such a rule is refused, naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import unfreeze

from jaxquant import layout
from jaxquant import state
from jaxquant.einsum import einsum_dimension_numbers
from jaxquant.spec import Rule


class QuantParam(nnx.Param):
  """A learned quantization quantity (LSQ step size, PACT α): trainable like a Param;
  Linen's 'quant' collection."""


class QuantStat(nnx.Variable):
  """Quantization statistics (kernel layout, observer states, static ranges): Linen's
  'quant_stats' collection; not trainable."""


QUANTIZABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
RULES_ATTR = "jq_rules"  # the root module's rules, static
# A quantized layer's mode, named as BatchNorm's so that `model.train()` / `model.eval()`
# set it: False (train), its observers update on every call; True (eval, the default).
TRAIN_ATTR = "use_running_average"


@dataclasses.dataclass(frozen=True)
class Run:
  """How the quantized NNX layers of one call run (set by `jaxquant.nnx_functional`):
  whether 'quant_stats' is mutable (observers update), the PRNG keys, and the observer
  overrides of `jq.calibrate` (its observers, token mask, float forward)."""
  tracking: Optional[bool] = None  # None: a direct call (the layers' train / eval mode)
  rngs: Any = None
  observers: Optional[Tuple] = None  # None: the transform's defaults
  mask: Any = None
  float_forward: bool = False


_RUN = threading.local()


def current_run() -> Run:
  """The `Run` of the call in progress (a direct call: the default)."""
  return getattr(_RUN, "run", None) or Run()


class running:
  """Context manager: the NNX layers called inside run as `run` says."""

  def __init__(self, run: Run):
    self.run = run

  def __enter__(self):
    self.saved = getattr(_RUN, "run", None)
    _RUN.run = self.run

  def __exit__(self, *exc):
    _RUN.run = self.saved


# ----------------------------------------------------------------------------- the twin

def _twin(layer, path: str, name: str) -> nn.Module:
  """The Linen layer computing what `layer` computes, with the same parameter shapes."""
  common = dict(dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                name=name)
  if isinstance(layer, nnx.Conv):
    return nn.Conv(features=layer.out_features, kernel_size=tuple(layer.kernel_size),
                   strides=layer.strides, padding=layer.padding,
                   input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation,
                   feature_group_count=layer.feature_group_count, use_bias=layer.use_bias,
                   mask=layer.mask, **common)
  if isinstance(layer, nnx.Einsum):
    return nn.Einsum(shape=tuple(layer.kernel_shape), einsum_str=layer.einsum_str,
                     use_bias=layer.bias_shape is not None, **common)
  if isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis:
      raise ValueError(f"layer {path!r}: nnx.LinearGeneral with batch_axis is not supported "
                       "by jaxquant; leave it out of the rules (it then stays float)")
    return nn.DenseGeneral(features=layer.out_features, axis=layer.axis,
                           use_bias=layer.use_bias, **common)
  return nn.Dense(features=layer.out_features, use_bias=layer.use_bias, **common)


class _Nest(nn.Module):
  """Linen scopes named like the NNX path's parts, the twin layer in the innermost, so
  the Linen path (rules, messages, name stacks) is the NNX path."""
  parts: Tuple[str, ...]
  make: Callable[[str], nn.Module]

  @nn.compact
  def __call__(self, *args, **kwargs):
    if len(self.parts) == 1:
      return self.make(self.parts[0])(*args, **kwargs)
    return _Nest(self.parts[1:], self.make, name=self.parts[0])(*args, **kwargs)


def variable_value(var):
  """The value an NNX variable holds."""
  return var.get_value() if hasattr(var, "get_value") else var.value


def collection_of(var) -> str:
  """The Linen collection of an NNX variable."""
  if isinstance(var, QuantParam):
    return state.QUANT
  if isinstance(var, QuantStat):
    return state.QUANT_STATS
  if isinstance(var, nnx.Param):
    return "params"
  if isinstance(var, nnx.BatchStat):
    return "batch_stats"
  return type(var).__name__


def variable_type(collection: str):
  """The NNX variable type that holds a new entry of a jaxquant collection."""
  return {state.QUANT: QuantParam, state.QUANT_STATS: QuantStat}[collection]


def set_variable(module, name: str, collection: str, value) -> None:
  """Sets `module.<name>` (an NNX variable) to `value`, creating it when absent."""
  var = getattr(module, name, None)
  if isinstance(var, nnx.Variable):
    if variable_value(var) is not value:
      var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
  else:
    setattr(module, name, variable_type(collection)(value))


def _layer_variables(layer):
  """The layer's own variables by Linen collection: {'params': {'kernel': ...}, ...}."""
  out = {}
  for name, var in vars(layer).items():
    if isinstance(var, nnx.Variable) and variable_value(var) is not None:
      out.setdefault(collection_of(var), {})[name] = variable_value(var)
  return out


def _nest(parts, tree):
  for part in reversed(parts):
    tree = {part: tree}
  return tree


def _quantized_call(self, *args, **kwargs):
  """The layer's call, run by its Linen twin under the interceptor (module docstring)."""
  from jaxquant import transform  # pylint: disable=import-outside-toplevel (a cycle)
  run = current_run()
  parts = tuple(self.jq_path.split("/"))
  observers = transform.DEFAULT_OBSERVERS if run.observers is None else run.observers
  config = transform.QuantConfig((self.jq_rule,), tuple(observers), run.mask,
                                 run.float_forward)
  variables = {col: _nest(parts, tree) for col, tree in _layer_variables(self).items()}
  tracking = run.tracking
  if tracking is None:  # a direct call: observers update in train mode (`model.train()`)
    tracking = not getattr(self, TRAIN_ATTR, True)
  mutable = [state.QUANT] + ([state.QUANT_STATS] if tracking else [])
  twin = _Nest(parts, functools.partial(_twin, self, self.jq_path))
  interceptor = transform._Interceptor(config)  # pylint: disable=protected-access
  with nn.intercept_methods(interceptor):
    rngs = run.rngs
    if rngs is None and getattr(self, "jq_rng", None) is not None:
      rngs = {state.RNG: self.jq_rng()}  # a fresh key per call (stochastic rounding)
    y, upd = twin.apply(variables, *args, mutable=mutable, rngs=rngs, **kwargs)
  for col, tree in unfreeze(upd).items():
    for name, value in state.node_at(tree, self.jq_path).items():
      set_variable(self, name, col, value)
  return y


def _subclass(cls):
  if cls not in _SUBCLASSES:
    _SUBCLASSES[cls] = type(f"Quantized{cls.__name__}", (cls,), {"__call__": _quantized_call})
  return _SUBCLASSES[cls]


_SUBCLASSES = {}


def _stochastic(rule: Rule) -> Optional[str]:
  """The name of the rule's first spec with stochastic rounding, or None."""
  return next((name for name in ("act", "weight", "grad")
               if getattr(rule, name) is not None
               and getattr(rule, name).rounding == "stochastic"), None)


def _rng_stream(rule: Rule, rngs) -> Optional[nnx.RngStream]:
  """The PRNG stream a layer quantized by `rule` draws from (None: it draws none)."""
  name = _stochastic(rule)
  if name is None:
    return None
  if not isinstance(rngs, nnx.Rngs):
    raise ValueError(f"Rule({rule.pattern!r}): {name}.rounding='stochastic' needs a PRNG "
                     "stream on an nnx model: pass rngs=nnx.Rngs(quant=seed) to "
                     "jq.quantize_model (each call of the layer draws a fresh key)")
  return rngs[state.RNG]  # the 'quant' stream ('default' when it has none)


def _kernel_layout(layer, kernel) -> layout.WeightLayout:
  """The kernel's layout, as the Linen layer's call would record it."""
  if isinstance(layer, nnx.Conv):
    return layout.make_layout(kernel.ndim, tuple(range(kernel.ndim - 1)))
  if isinstance(layer, nnx.Einsum):
    # The input's rank is not known here; the kernel's contracting axes do not depend on
    # it, so take the rank the input subscript spells ('...' standing for no axis).
    lhs_sub = layer.einsum_str.replace(" ", "").split("->")[0].split(",")[0]
    lhs_ndim = len(lhs_sub.replace("...", ""))
    (_, rc), (_, rb) = einsum_dimension_numbers(layer.einsum_str, lhs_ndim, kernel.ndim)[0]
    return layout.make_layout(kernel.ndim, rc, rb)
  in_features = getattr(layer, "in_features", 0)
  n_in = len(in_features) if isinstance(in_features, tuple) else 1
  return layout.make_layout(kernel.ndim, tuple(range(n_in)))


def eval_mode(model: nnx.Module) -> nnx.Module:
  """Sets `model`'s quantized layers to eval mode (their observers update nothing), as a
  served model's are whatever mode its QAT model was in; returns `model`."""
  for _, node in nnx.iter_graph(model):
    if type(node) in _SUBCLASSES.values():
      setattr(node, TRAIN_ATTR, True)
  return model


def rules_of(model) -> Optional[Tuple[Rule, ...]]:
  """The rules `quantize_nnx` gave `model`, or None for a model it did not quantize."""
  return getattr(model, RULES_ATTR, None)


def quantize_nnx(model: nnx.Module, rules: Tuple[Rule, ...], rngs=None) -> nnx.Module:
  """Quantizes `model`'s matched layers in place (see the module docstring); `rngs`, an
  `nnx.Rngs`, gives stochastic rounding its 'quant' stream."""
  used = set()
  seen = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, QUANTIZABLE) or type(node) in _SUBCLASSES.values():
      continue
    name = "/".join(str(p) for p in path)
    seen.append(name)
    idx = next((i for i, r in enumerate(rules) if r.matches(name)), None)
    if idx is None:
      continue
    rule = rules[idx]
    stream = _rng_stream(rule, rngs)
    if not name:
      raise ValueError(f"Rule({rule.pattern!r}) matched the model itself, an "
                       f"{type(node).__name__}: quantize a module that holds the layer")
    used.add(idx)
    _twin(node, name, "check")  # unsupported configurations fail here, not at the call
    node.__class__ = _subclass(type(node))
    node.jq_rule, node.jq_path = rule, name
    setattr(node, TRAIN_ATTR, True)
    if stream is not None:
      node.jq_rng = stream
    kernel = variable_value(node.kernel)
    w_layout = _kernel_layout(node, kernel)
    set_variable(node, state.KERNEL_AXES, state.QUANT_STATS,
                 jnp.asarray(state.kernel_axes(w_layout)))
    if rule.weight is not None and rule.weight.learned:
      set_variable(node, state.learned_key(state.WEIGHT, rule.weight.learned), state.QUANT,
                   layout.init_learned_compiled(jax.lax.stop_gradient(kernel),
                                                spec=rule.weight, layout=w_layout))
  setattr(model, RULES_ATTR, tuple(rules))
  unused = [r.pattern for i, r in enumerate(rules) if i not in used]
  if unused:
    warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: {seen}",
                  stacklevel=3)
  return model
