"""An NNX model's float forward as `jq.to_integer` traces it: layers as Linen twins.

`jq.to_integer` reads a model's float forward pass from its jaxpr, each layer found by
its module path in the equations' name stack (`integer_only/trace.py`), as Linen writes
it. NNX modules push no name scopes, so `float_twins(model)` makes a copy of the model
in which every nnx.Linear / LinearGeneral / Conv / Einsum / LayerNorm / GroupNorm,
quantized by `jq.quantize_model` or not, runs its float Linen twin (the twin the
quantized NNX layers run, `jaxquant.nnx_transform`) nested under the layer's own path,
and every other submodule's `__call__` runs under a name scope of its attribute name.
Layer paths, parameter paths and so the integer program are then those of the same
model written in Linen with the same layer names; ops outside the layers are named by
the submodule whose `__call__` runs them (other methods: by the caller).

`FloatView(model).apply(variables, *args)` is that copy, holding Linen-style
`variables`, seen as a Linen model's `apply`.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
from flax import nnx

from jaxquant import nnx_functional
from jaxquant import nnx_transform as nt
from jaxquant import state

NORMS = (nnx.LayerNorm, nnx.GroupNorm)
TWINNED = nt.QUANTIZABLE + NORMS
# The first name-stack scope of a twin's ops, after the enclosing NNX modules' scopes.
NEST_SCOPE = nt._Nest.__name__  # pylint: disable=protected-access


def _norm_twin(layer, name: str) -> nn.Module:
  """The Linen LayerNorm / GroupNorm computing what the NNX one computes."""
  common = dict(epsilon=layer.epsilon, dtype=layer.dtype, param_dtype=layer.param_dtype,
                use_bias=layer.use_bias, use_scale=layer.use_scale,
                reduction_axes=layer.reduction_axes, axis_name=layer.axis_name,
                axis_index_groups=layer.axis_index_groups,
                use_fast_variance=layer.use_fast_variance, name=name)
  if isinstance(layer, nnx.GroupNorm):
    return nn.GroupNorm(num_groups=layer.num_groups, **common)
  return nn.LayerNorm(feature_axes=layer.feature_axes, **common)


# pylint: disable=protected-access (the quantized layers' own twin and nesting)
def _float_call(self, *args, **kwargs):
  """The layer's float forward, run by its Linen twin nested under its NNX path."""
  parts = tuple(self.jq_path.split("/"))
  make = (functools.partial(_norm_twin, self) if isinstance(self, NORMS)
          else functools.partial(nt._twin, self, self.jq_path))
  params = nt._layer_variables(self).get("params", {})
  return nt._Nest(parts, make).apply({"params": nt._nest(parts, params)}, *args, **kwargs)


def _scoped_call(self, *args, **kwargs):
  """The module's own call under a name scope of its attribute name (nested modules
  nest), so the ops it runs carry its path, as a Linen submodule's do."""
  with jax.named_scope(self.jq_scope):
    return super(type(self), self).__call__(*args, **kwargs)


_FLOAT, _SCOPED = {}, {}


def _subclass(cache, cls, prefix, call):
  if cls not in cache:
    cache[cls] = type(f"{prefix}{cls.__name__}", (cls,), {"__call__": call})
  return cache[cls]


def float_twins(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose layers run their float Linen twins under their paths and
  whose other submodules run under name scopes (module docstring); no quantization."""
  graphdef, nnx_state = nnx.split(model)
  model = nnx.merge(graphdef, nnx_state)
  for path, node in list(nnx.iter_graph(model)):
    if not isinstance(node, nnx.Module) or not path:
      if isinstance(node, TWINNED):
        raise ValueError(f"model={type(node).__name__} is a single layer: jq.to_integer "
                         "takes a module that holds its layers")
      continue
    base = type(node)
    if base in nt._SUBCLASSES.values():  # a quantized layer: its NNX class
      base = base.__mro__[1]
    if not isinstance(node, TWINNED):
      node.__class__ = _subclass(_SCOPED, base, "Scoped", _scoped_call)
      node.jq_scope = str(path[-1])
      continue
    name = "/".join(str(p) for p in path)
    if isinstance(node, nt.QUANTIZABLE):
      nt._twin(node, name, "check")  # unsupported configurations fail here, naming it
    node.__class__ = _subclass(_FLOAT, base, "Float", _float_call)
    node.jq_path = name
  return model
# pylint: enable=protected-access


@dataclasses.dataclass(frozen=True)
class FloatView:
  """An NNX model's float forward seen as a Linen model's `apply(variables, *args)`:
  `float_twins` of a copy holding `variables` (Linen-style: 'params', 'batch_stats').
  `root_scope` is the name-stack scope each layer's own path follows; `name` the NNX
  model's class name (for messages)."""
  model: nnx.Module
  root_scope: str = NEST_SCOPE

  @property
  def name(self) -> str:
    """The NNX model's class name."""
    return type(self.model).__name__

  def apply(self, variables, *args, **kwargs):
    """The float forward of a copy of the model holding `variables`, in eval mode
    (`nnx.Module.eval`: BatchNorm on its running statistics, Dropout off), whatever the
    model's own mode: an integer program is an inference program."""
    copy = nnx_functional.with_variables(self.model, state.mutable_copy(variables))
    copy = float_twins(copy)
    copy.eval()
    return copy(*args, **kwargs)
