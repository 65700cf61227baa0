"""quantize_model for Flax NNX modules: the same rules over the same '/'-joined paths.

NNX layers are Python objects, so the transform walks the module graph once and turns
each matched `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum` into an
instance of a small subclass whose `__call__` hands the layer jaxquant's contraction
through the layer's own `dot_general` / `conv_general_dilated` / `einsum_op` argument.
The module is modified in place and returned; its parameters are unchanged.

Supported in NNX: every weight spec (LSQ / PACT weight scales become `QuantParam`
variables on the layer, initialized from the kernel) and dynamic activation specs.
Not (yet) in NNX: learned activation scales, static activation ranges and stochastic
rounding — these raise a ValueError naming the rule; use the Linen path for them.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import jax
from flax import nnx

from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant.einsum import einsum_compiled, einsum_dimension_numbers
from jaxquant import layout
from jaxquant.fake_quant import OperandState
from jaxquant.spec import Rule


class QuantParam(nnx.Param):
  """A learned quantization quantity (LSQ step size, PACT α): trainable like a Param."""


_SUBCLASSES = {}


def _check_nnx_rule(rule: Rule):
  if rule.act is not None and rule.act.learned:
    raise ValueError(f"Rule({rule.pattern!r}): learned activation scales (act.ste="
                     f"{rule.act.ste!r}) are not supported for nnx modules; use a Linen model")
  for name in ("act", "weight", "grad"):
    s = getattr(rule, name)
    if s is not None and s.rounding == "stochastic":
      raise ValueError(f"Rule({rule.pattern!r}): {name}.rounding='stochastic' is not "
                       "supported for nnx modules; use a Linen model")


def _kernel_layout(layer, kernel) -> layout.WeightLayout:
  """The kernel's layout, as the Linen adapter reads it from the call's dimension numbers."""
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


_ATTR = {nnx.Conv: "conv_general_dilated", nnx.Einsum: "einsum_op"}


def _quantized_call(self, *args, **kwargs):
  """The layer's own `__call__`, with jaxquant's contraction as its contraction argument.

  NNX modules are plain mutable objects and the learned weight scale must be read inside
  the trace, so the argument is set for this call and restored after it.
  """
  spec = self.jq_rule.dot_spec()
  state = OperandState(learned=self.jq_weight_learned[...]) \
      if hasattr(self, "jq_weight_learned") else OperandState()
  attr = next((a for cls, a in _ATTR.items() if isinstance(self, cls)), "dot_general")
  if attr == "conv_general_dilated":
    fn = qconv.make_conv(spec, rhs_state=state)
  elif attr == "einsum_op":
    fn = lambda subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_: \
        einsum_compiled(subscripts=subscripts, lhs=lhs, rhs=rhs, spec=spec,
                        preferred_element_type=preferred_element_type, rhs_state=state)
  else:
    fn = qdot.make_dot_general(spec, rhs_state=state)
  old = getattr(self, attr)
  setattr(self, attr, fn)
  try:
    return type(self).__mro__[1].__call__(self, *args, **kwargs)
  finally:
    setattr(self, attr, old)


def _subclass(cls):
  if cls not in _SUBCLASSES:
    _SUBCLASSES[cls] = type(f"Quantized{cls.__name__}", (cls,), {"__call__": _quantized_call})
  return _SUBCLASSES[cls]


QUANTIZABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


def quantize_nnx(model: nnx.Module, rules: Tuple[Rule, ...]) -> nnx.Module:
  """Quantizes `model`'s matched layers in place (see the module docstring)."""
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
    _check_nnx_rule(rule)
    used.add(idx)
    node.__class__ = _subclass(type(node))
    node.jq_rule = rule
    if rule.weight is not None and rule.weight.learned:
      kernel = node.kernel[...]
      node.jq_weight_learned = QuantParam(
          layout.init_learned_compiled(jax.lax.stop_gradient(kernel), spec=rule.weight,
                                       layout=_kernel_layout(node, kernel)))
  unused = [r.pattern for i, r in enumerate(rules) if i not in used]
  if unused:
    warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: {seen}",
                  stacklevel=3)
  return model
