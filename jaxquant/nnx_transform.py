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

from typing import Tuple

import jax
from flax import nnx

from jaxquant import conv as qconv
from jaxquant import dot as qdot
from jaxquant import numerics
from jaxquant.spec import Rule


class QuantParam(nnx.Param):
  """A learned quantization quantity (LSQ step size, PACT α): trainable like a Param."""


_SUBCLASSES = {}


def _check_nnx_rule(rule: Rule):
  if rule.act is not None and rule.act.ste in ("lsq", "pact"):
    raise ValueError(f"Rule({rule.pattern!r}): learned activation scales (act.ste="
                     f"{rule.act.ste!r}) are not supported for nnx modules; use a Linen model")
  for name in ("act", "weight", "grad"):
    s = getattr(rule, name)
    if s is not None and s.rounding == "stochastic":
      raise ValueError(f"Rule({rule.pattern!r}): {name}.rounding='stochastic' is not "
                       "supported for nnx modules; use a Linen model")


def _weight_reduce_axes(layer, kernel) -> Tuple[int, ...]:
  w = layer.jq_rule.weight
  if isinstance(layer, nnx.Conv):
    return tuple(range(kernel.ndim)) if w.granularity == "tensor" else tuple(range(kernel.ndim - 1))
  if isinstance(layer, nnx.Einsum):
    # The input's rank is not known here; the kernel's contracting axes do not depend on
    # it, so take the rank the input subscript spells ('...' standing for no axis).
    lhs_sub = layer.einsum_str.replace(" ", "").split("->")[0].split(",")[0]
    lhs_ndim = len(lhs_sub.replace("...", ""))
    dims, _, _, _ = qdot.einsum_dimension_numbers(layer.einsum_str, lhs_ndim, kernel.ndim)
    return tuple(dims[0][1])
  n_in = len(getattr(layer, "in_features", (0,))) if isinstance(
      getattr(layer, "in_features", None), tuple) else 1
  return tuple(range(n_in))


def _quantized_call(self, *args, **kwargs):
  rule: Rule = self.jq_rule
  spec = rule.dot_spec()
  learned = self.jq_weight_learned[...] if hasattr(self, "jq_weight_learned") else None
  if isinstance(self, nnx.Conv):
    attr = "conv_general_dilated"

    def fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None, out_sharding=None):
      return qconv.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type,
          spec=spec, rhs_learned=learned)
  elif isinstance(self, nnx.Einsum):
    attr = "einsum_op"

    def fn(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_unused):
      return qdot.einsum(subscripts, lhs, rhs, spec, preferred_element_type=preferred_element_type,
                         rhs_learned=learned)
  else:
    attr = "dot_general"

    def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
           **_unused):  # out_sharding: the output follows the operands' sharding
      return qdot.dot_general(lhs, rhs, dimension_numbers, spec,
                              preferred_element_type=preferred_element_type,
                              rhs_learned=learned)
  old = getattr(self, attr)
  object.__setattr__(self, attr, fn)
  try:
    return type(self).__mro__[1].__call__(self, *args, **kwargs)
  finally:
    object.__setattr__(self, attr, old)


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
    if rule.weight is not None and rule.weight.ste in ("lsq", "pact"):
      kernel = node.kernel[...]
      node.jq_weight_learned = QuantParam(
          numerics.init_learned(jax.lax.stop_gradient(kernel), rule.weight,
                                _weight_reduce_axes(node, kernel)))
  unused = [r.pattern for i, r in enumerate(rules) if i not in used]
  if unused:
    import warnings
    warnings.warn(f"jaxquant: rules matched no layer: {unused}; layers seen: {seen}",
                  stacklevel=3)
  return model
