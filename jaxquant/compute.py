"""Compute per forward pass: multiply-accumulates and bit operations of a quantized model.

`compute_report(qmodel, variables, *args)` traces the float model once (no FLOPs run)
and counts, for every `dot_general` and convolution, its multiply-accumulates (MACs):
the output size times the contracted size (for a convolution, the kernel's window times
its input channels per group). Each contraction is attributed to the layer that runs it
(its Flax module path) and takes that layer's bit widths from the first rule matching
the path: the weight spec's and the activation spec's information bits (int b: b,
binary 1, ternary 2, fp8 8; a side the rule leaves float, or a layer no rule matches,
counts 32). Contractions outside a weight layer (attention's q·k and p·v) count 32 × 32.

Bit operations (BOPs) are MACs × weight bits × activation bits, the measure of
Baskin et al. 2018 ("UNIQ") and Louizos et al. 2019 ("Relaxed Quantization") for the
cost of a b_w × b_a multiply; the float model's are MACs × 32 × 32. The accumulator's
additions, elementwise work and quantization overheads are not counted.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Tuple

import jax
import numpy as np
from jax.extend import core as jax_core

from jaxquant import linen_layer
from jaxquant import nnx_functional
from jaxquant import state
from jaxquant import transform

FLOAT_BITS = 32
_CONV = "conv_general_dilated"


@dataclasses.dataclass(frozen=True)
class LayerCompute:
  """MACs of one layer's contractions per forward pass, and the bit widths they run at."""
  path: str
  macs: int
  weight_bits: int
  act_bits: int

  @property
  def bops(self) -> int:
    """Bit operations: MACs × weight bits × activation bits."""
    return self.macs * self.weight_bits * self.act_bits

  @property
  def float_bops(self) -> int:
    return self.macs * FLOAT_BITS * FLOAT_BITS


@dataclasses.dataclass(frozen=True)
class ComputeReport:
  """Per-layer and total MACs and BOPs of one forward pass, quantized vs float."""
  layers: Tuple[LayerCompute, ...]

  @property
  def total_macs(self) -> int:
    return sum(layer.macs for layer in self.layers)

  @property
  def total_bops(self) -> int:
    return sum(layer.bops for layer in self.layers)

  @property
  def total_float_bops(self) -> int:
    return sum(layer.float_bops for layer in self.layers)

  @property
  def ratio(self) -> float:
    """Float BOPs / quantized BOPs (1024 for a model entirely at W1A1)."""
    return self.total_float_bops / max(1, self.total_bops)

  def layer(self, path: str) -> LayerCompute:
    """The row of one layer, e.g. report.layer('dense_0')."""
    for layer in self.layers:
      if layer.path == path:
        return layer
    raise KeyError(f"{path!r} not in the report; rows: {[l.path for l in self.layers]}")

  def __str__(self) -> str:
    w = max([len(l.path) for l in self.layers] + [5])
    rows = [f"{'layer':<{w}}  {'MACs':>14}  {'W':>2}  {'A':>2}  {'BOPs':>18}  {'float/BOPs':>10}"]
    for l in self.layers:
      rows.append(f"{l.path:<{w}}  {l.macs:>14,}  {l.weight_bits:>2}  {l.act_bits:>2}  "
                  f"{l.bops:>18,}  {l.float_bops / max(1, l.bops):>10.1f}")
    rows.append(f"{'total':<{w}}  {self.total_macs:>14,}  {'':>2}  {'':>2}  "
                f"{self.total_bops:>18,}  {self.ratio:>10.1f}")
    return "\n".join(rows)


def compute_report(qmodel, variables, *args, method=None, **kwargs) -> ComputeReport:
  """MACs and BOPs of one forward pass of `qmodel` (from `jq.quantize_model`) on `args`.

  Args:
    qmodel: a quantized Linen model, or a quantized NNX model.
    variables: its variables (an NNX model's `nnx.State`) (training or float; only the shapes are used, and the
      quantizers' collections are ignored).
    *args, **kwargs: the inputs of one forward pass (shapes and dtypes are what count;
      the batch size scales every number).
    method: the model method to trace, as in `apply` (default `__call__`).

  Raises:
    ValueError: `qmodel` is not a quantized Linen model, or a contraction sits in a
      loop whose trip count is not static (`while_loop`).
  """
  config = transform.config_of(qmodel)
  if nnx_functional.is_nnx(qmodel):  # its matched layers computing in float, no range needed
    view, plain, _ = nnx_functional.as_functional(qmodel, variables)
    model = view.with_run(float_forward=True, tracking=True)
  else:
    base = transform.float_class(qmodel)
    model = base(**linen_layer.module_fields(qmodel), name=qmodel.name)
    plain = {k: v for k, v in dict(variables).items() if k not in state.COLLECTIONS}
  apply = lambda v: model.apply(v, *args, method=method, **kwargs)
  jaxpr = jax.make_jaxpr(apply)(plain).jaxpr
  macs: Dict[str, int] = {}
  _count(jaxpr, "", 1, macs)
  params = plain.get("params", {})
  by_path: Dict[str, int] = {}
  for stack, n in macs.items():  # name scopes inside a layer (jnp.einsum's) -> the layer
    # A model that is itself one layer (quantize_model(nn.Dense(10), ...)): path ''.
    path = "" if _is_layer(params, "") else _owner(params, stack)
    by_path[path] = by_path.get(path, 0) + n
  layers = []
  for path, n in by_path.items():
    rule = config.rule_for(path) if _is_layer(params, path) else None
    weight_bits = act_bits = FLOAT_BITS
    if rule is not None:
      weight_bits = rule.weight.effective_bits if rule.weight is not None else FLOAT_BITS
      act_bits = rule.act.effective_bits if rule.act is not None else FLOAT_BITS
    layers.append(LayerCompute(path, n, weight_bits, act_bits))
  return ComputeReport(tuple(layers))


def _module_path(name_stack: str) -> str:
  """'MLP/dense_0' -> 'dense_0' (the root module's own name dropped)."""
  parts = [p for p in name_stack.split("/") if p]
  return "/".join(parts[1:]) if len(parts) > 1 else (parts[0] if parts else "")


def _owner(params: Any, stack: str) -> str:
  """The longest prefix of a name stack that is a module with parameters, with the rest
  in parentheses: 'block_0/attn (bthk,bshk->bhts)'."""
  # A method's scope is named 'Embed_0.attend', and a subclass calling its parent's
  # __call__ (nn.SelfAttention) repeats its own name: both are the same module.
  parts, previous = [], None
  for part in (re.sub(r"^(\w+)\.\w+$", r"\1", p) for p in stack.split("/")) if stack else ():
    if part != previous:
      parts.append(part)
    previous = part
  stack = "/".join(parts)
  node, depth = params, 0
  for part in parts:
    if not isinstance(node, dict) or part not in node:
      break
    node, depth = node[part], depth + 1
  if depth == len(parts):
    return stack
  owner, rest = "/".join(parts[:depth]), "/".join(parts[depth:])
  if owner and _is_layer(params, owner):  # e.g. nn.Einsum: jnp.einsum's own scope inside
    return owner
  return f"{owner} ({rest})" if owner else f"({rest})"


def _is_layer(params: Any, path: str) -> bool:
  node = params
  for part in (path.split("/") if path else ()):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return isinstance(node, dict) and ("kernel" in node or "embedding" in node)


def _macs(eqn) -> int:
  out = int(np.prod(eqn.outvars[0].aval.shape))
  if eqn.primitive.name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    shape = eqn.invars[0].aval.shape
    return out * int(np.prod([shape[d] for d in lhs_contract]))
  rhs = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  return out * int(np.prod(rhs)) // rhs[out_feature_dim]


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count(jaxpr, prefix: str, times: int, macs: Dict[str, int]) -> None:
  for eqn in jaxpr.eqns:
    stack = "/".join(p for p in (prefix, str(eqn.source_info.name_stack)) if p)
    name = eqn.primitive.name
    if name in ("dot_general", _CONV):
      path = _module_path(stack)
      macs[path] = macs.get(path, 0) + times * _macs(eqn)
      continue
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    if name == "while":
      if any(_has_contraction(j) for j in subs):
        raise ValueError(f"a contraction at {_module_path(stack)!r} sits in a while_loop, "
                         "whose trip count is not static; compute_report cannot count it")
      continue
    if name == "cond":  # one branch runs: count the most expensive
      branch_counts = []
      for j in subs:
        counted: Dict[str, int] = {}
        _count(j, stack, times, counted)
        branch_counts.append(counted)
      for path, n in max(branch_counts, key=lambda c: sum(c.values())).items():
        macs[path] = macs.get(path, 0) + n
      continue
    inner = times * int(eqn.params.get("length", 1)) if name == "scan" else times
    for j in subs:
      _count(j, stack, inner, macs)


def _has_contraction(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", _CONV):
      return True
    if any(_has_contraction(j) for v in eqn.params.values() for j in _sub_jaxprs(v)):
      return True
  return False
