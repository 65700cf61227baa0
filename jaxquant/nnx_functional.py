"""The Linen-style functional view of a quantized NNX model, for the pipeline's steps.

`jq.calibrate`, `jq.convert`, `jq.compute_report` and `jq.size_report` are written
against Linen's functional interface: variables as a dict of collections ('params',
'quant', 'quant_stats', ...) and `model.apply(variables, *args, mutable=..., rngs=...)`.
An NNX model quantized by `jq.quantize_model` keeps the same state at the same paths as
NNX variables (`jaxquant.nnx_transform`), so one adapter serves every step:

  `as_functional(model, variables)` -> (`NNXApply` view, Linen-style variables, finish)

where `variables` is the model's `nnx.State` (`nnx.state(model)`) and `finish` turns the
step's Linen-style variables back into an `nnx.State`; a Linen model passes through
unchanged. `NNXApply.apply` runs a copy of the NNX model holding the given variables
(the model itself is never modified), with 'quant_stats' mutable when asked.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from flax import nnx

from jaxquant import nnx_transform as nt
from jaxquant import state


def is_nnx(obj) -> bool:
  """Whether `obj` is an NNX module or the functional view of one."""
  return isinstance(obj, (nnx.Module, NNXApply))


def linen_variables(nnx_state) -> Dict[str, Any]:
  """An `nnx.State` (or module) as Linen variables: {collection: nested dict}, with
  collections 'params', 'quant', 'quant_stats', 'batch_stats' (others by type name;
  PRNG stream state is left out)."""
  if isinstance(nnx_state, nnx.Module):
    nnx_state = nnx.state(nnx_state)
  out: Dict[str, Any] = {}
  for path, var in nnx_state.flat_state():
    if isinstance(var, nnx.RngState):  # PRNG streams: Linen passes keys as rngs instead
      continue
    node = out.setdefault(nt.collection_of(var), {})
    for part in path[:-1]:
      node = node.setdefault(str(part), {})
    node[str(path[-1])] = nt.variable_value(var)
  return out


def _child(node, part: str):
  if isinstance(node, (list, tuple)) or (hasattr(node, "__getitem__")
                                         and not hasattr(node, part)):
    return node[int(part) if part.isdigit() else part]
  return getattr(node, part)


def _holders(tree, prefix=()):
  """(path of the holding module, {name: value}) for every dict of leaves in a tree."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
  if leaves:
    yield prefix, leaves
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _holders(v, prefix + (k,))


def _lookup(variables, col: str, path):
  node = variables.get(col, {})
  for part in path:
    if not isinstance(node, dict) or str(part) not in node:
      return _MISSING
    node = node[str(part)]
  return node


_MISSING = object()


def with_variables(model: nnx.Module, variables: Dict[str, Any]) -> nnx.Module:
  """A new copy of `model` holding `variables` (Linen-style; works inside a jax trace).
  Its 'quant' / 'quant_stats' entries are exactly the given ones: missing ones are
  created, others removed."""
  graphdef, nnx_state = nnx.split(model)
  flat, drop = [], []
  for path, var in nnx_state.flat_state():
    col = nt.collection_of(var)
    value = _lookup(variables, col, path)
    if value is _MISSING:
      if col in state.COLLECTIONS:
        drop.append(path)
      flat.append((path, var.replace(nt.variable_value(var))))
    else:
      flat.append((path, var.replace(value)))
  model = nnx.merge(graphdef, nnx.State.from_flat_path(flat))
  for path in drop:
    holder = model
    for part in path[:-1]:
      holder = _child(holder, str(part))
    delattr(holder, str(path[-1]))
  for col in state.COLLECTIONS:
    for path, leaves in _holders(variables.get(col, {})):
      holder = model
      for part in path:
        holder = _child(holder, part)
      for name, value in leaves.items():
        if not isinstance(getattr(holder, name, None), nnx.Variable):
          nt.set_variable(holder, name, col, value)
  return model


@dataclasses.dataclass(frozen=True)
class NNXApply:
  """A quantized NNX model seen as a Linen model: `apply(variables, *args, ...)`."""
  model: nnx.Module
  run: nt.Run = nt.Run()

  @property
  def rules(self):
    """The rules `jq.quantize_model` gave the model."""
    return nt.rules_of(self.model)

  def with_run(self, **changes) -> "NNXApply":
    """The same view with other observers, mask or float forward (`jq.calibrate`)."""
    return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

  def apply(self, variables, *args, mutable=False, rngs=None, method: Optional[str] = None,
            **kwargs):
    """Runs a copy of the model holding `variables`; with `mutable` (a collection name,
    a list of them, or True), also returns the updated collections."""
    model = with_variables(self.model, state.mutable_copy(variables))
    cols = ([mutable] if isinstance(mutable, str) else list(mutable)
            if isinstance(mutable, (list, tuple)) else list(state.COLLECTIONS) if mutable
            else [])
    run = dataclasses.replace(self.run, rngs=rngs,
                              tracking=bool(self.run.tracking) or state.QUANT_STATS in cols)
    with nt.running(run):
      out = (getattr(model, method) if method else model)(*args, **kwargs)
    if not cols:
      return out
    new = linen_variables(model)
    return out, {c: new.get(c, {}) for c in cols}


def as_functional(qmodel, variables):
  """(model, variables, finish) for a pipeline step: a quantized NNX model with its
  `nnx.State` becomes an `NNXApply` view, Linen-style variables, and a `finish` that
  makes the step's result an `nnx.State` again; a Linen model passes unchanged."""
  if not isinstance(qmodel, nnx.Module):
    return qmodel, variables, lambda v: v
  if nt.rules_of(qmodel) is None:
    raise ValueError(f"{type(qmodel).__name__} is an nnx.Module that jq.quantize_model did "
                     "not quantize; use jaxquant.quantize_model(model, rules) first")
  if variables is None:
    variables = nnx.state(qmodel)
  if not isinstance(variables, (nnx.State, nnx.Module)):
    raise ValueError(f"variables={type(variables).__name__}: for an nnx model pass its "
                     "nnx.State (nnx.state(model))")
  view = NNXApply(qmodel)
  return view, linen_variables(variables), lambda v: nnx.state(with_variables(qmodel, v))
