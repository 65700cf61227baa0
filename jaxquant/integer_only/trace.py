"""Float model → a small dataflow IR, by interpreting the jaxpr of its forward pass.

The float model (eval mode, parameters and other collections as jaxpr inputs) is traced
with `jax.make_jaxpr`; its equations are then interpreted over three kinds of value:
  Const   anything computed from parameters and literals alone (evaluated on the spot
          by binding the primitive: BatchNorm's rsqrt(var + ε)·γ, reshaped biases, ...),
  Tensor  a materialized activation (an IR node: the input, a requantization point, or a
          reshape / transpose of one),
  Lazy    a core op's output with a pending per-channel affine map and clamp,
          clip(mult·core + add, lo, hi); adds, subs, muls and divs by constants and
          max/min with scalars (ReLU, ReLU6) fold into it. It becomes a Tensor (an
          'affine' node: where the integer program requantizes) when an op needs one.
Everything else that touches an activation is an op of the registry (ops/): the ops
declaring the equation's primitive are asked in turn (`Op.trace`), and a Linen module
call an op declares (`Op.modules`: GroupNorm / LayerNorm, recognised by its module path
in the equations' name stack) becomes one node (`Op.trace_module`).
Anything else touching an activation (exp, tanh, erf, rsqrt of activations,
gathers, products of two activations...) is recorded with the layer path from the name
stack and replaced by a stand-in tensor so the rest of the model is still checked; every
problem is then reported at once in one IntegerOnlyError.
Axis 0 is the batch everywhere and must stay so (reshape / transpose / reductions that
mix it are refused).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jcore

from jaxquant.integer_only import ops
from jaxquant.integer_only.ir import IR, Bad, Const, IntegerOnlyError, Lazy, Node, Tensor

_PASS = ("copy", "copy_p", "optimization_barrier", "stop_gradient")
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint")
_WHY = {
    "exp": "exp (softmax / sigmoid)", "exp2": "exp (softmax)", "log": "log",
    "logistic": "sigmoid", "tanh": "tanh (GELU approximation / tanh)",
    "erf": "erf (GELU)", "rsqrt": "rsqrt of an activation (a normalization)",
    "sqrt": "sqrt of an activation", "integer_pow": "a power of an activation",
    "pow": "a power of an activation", "gather": "gather (an embedding lookup)",
    "reduce_max": "max over an axis (softmax)", "argmax": "argmax inside the model",
    "reduce_window_sum": "a windowed sum (avg_pool)",
    "reduce_window_max": "a windowed max (max_pool)",
    "dot_general": "a product of two activations (e.g. attention scores)",
    "mul": "a product of two activations", "div": "a division by an activation",
    "select_n": "a select (jnp.where) on an activation",
    "lt": "a comparison of an activation", "gt": "a comparison of an activation",
    "le": "a comparison of an activation", "ge": "a comparison of an activation",
    "eq": "a comparison of an activation", "ne": "a comparison of an activation",
}


def _strip_root(stack: str, root: str, through_last: bool = False) -> str:
  """The module path of a name stack: without the root's scope (the first one; with
  `through_last`, everything up to its last occurrence, where a scope of the enclosing
  NNX modules precedes each layer twin's own full path)."""
  # Scopes that are not modules (jnp.einsum names one after its subscripts) are dropped.
  parts = [p for p in stack.split("/") if p and "->" not in p and "," not in p]
  if through_last and root in parts:
    parts = parts[len(parts) - parts[::-1].index(root):]
  elif parts and parts[0] == root:
    parts = parts[1:]
  return "/".join(parts)


class _Tracer:
  def __init__(self, root_name: str, modules: Dict[str, nn.Module], params: Dict[str, Any],
               through_last: bool = False):
    self.root, self.modules, self.params = root_name, modules, params
    self.through_last = through_last
    self.nodes: List[Node] = []
    self.bad: Dict[str, Bad] = {}  # first problem per (why, layer)
    self.identity_of: Dict[int, int] = {}

  # -- IR construction ------------------------------------------------------------------
  def node(self, kind, inputs, shape, layer, **attrs) -> int:
    self.nodes.append(Node(len(self.nodes), kind, tuple(inputs), tuple(shape), layer, attrs))
    return len(self.nodes) - 1

  def fail(self, why, layer, shape=None):
    """Records an op with no integer lowering; returns a stand-in activation of `shape`
    so the rest of the model is still checked (every problem is reported at once)."""
    self.bad.setdefault(f"{layer}: {why}", Bad(why, layer))
    if shape is None:
      return Bad(why, layer)
    return Tensor(self.node("bad", [], tuple(shape), layer))

  def materialize(self, v) -> int:
    if isinstance(v, Tensor):
      return v.node
    if v.node is None:
      core = self.nodes[v.core]
      trivial = (np.all(v.mult == 1) and np.all(v.add == 0) and v.lo == -np.inf
                 and v.hi == np.inf)
      if core.kind == "identity" and trivial:
        v.node = core.inputs[0]
      else:
        v.node = self.node("affine", [v.core], core.shape, core.layer, mult=v.mult,
                           add=v.add, lo=v.lo, hi=v.hi)
    return v.node

  def lazy(self, v) -> Lazy:
    if isinstance(v, Lazy):
      return v
    if v.node not in self.identity_of:
      n = self.nodes[v.node]
      self.identity_of[v.node] = self.node("identity", [v.node], n.shape, n.layer)
    return Lazy(self.identity_of[v.node], np.ones(()), np.zeros(()))

  def core_lazy(self, kind, inputs, shape, layer, **attrs) -> Lazy:
    return Lazy(self.node(kind, inputs, shape, layer, **attrs), np.ones(()), np.zeros(()))

  # -- affine folding -------------------------------------------------------------------
  def affine(self, v, layer, mult=None, add=None):
    if isinstance(v, Bad):
      return v
    shape = self.shape_of(v)
    # A constant equal along the batch axis (e.g. a type embedding of zeros_like(ids))
    # is its first row.
    same = lambda c: c if c is None or np.ndim(c) == 0 or np.shape(c)[0] == 1 or not np.all(
        np.asarray(c) == np.asarray(c)[:1]) else np.asarray(c)[:1]
    mult, add = same(mult), same(add)
    for c in (mult, add):  # per-channel constants: scalars or batch-free, same rank
      c = None if c is None else np.asarray(c)
      if c is not None and c.ndim and (c.ndim != len(shape) or c.shape[0] != 1):
        return self.fail("a constant that varies along the batch axis", layer)
    lz = self.lazy(v)
    mult = None if mult is None else np.asarray(mult, np.float64)
    add = None if add is None else np.asarray(add, np.float64)
    clipped = lz.lo != -np.inf or lz.hi != np.inf
    if clipped:
      relu_like = lz.hi == np.inf and lz.lo == 0.0
      scalable = mult is not None and np.all(mult > 0) and (mult.ndim == 0 or relu_like)
      if add is not None or (mult is not None and not scalable):
        lz = self.lazy(Tensor(self.materialize(lz)))
        clipped = False
    new = Lazy(lz.core, lz.mult, lz.add, lz.lo, lz.hi)
    if mult is not None:
      new.mult, new.add = new.mult * mult, new.add * mult
      if clipped and mult.ndim == 0:
        new.lo, new.hi = new.lo * float(mult), new.hi * float(mult)
    if add is not None:
      new.add = new.add + add
    return new

  def clamp(self, v, layer, lo=None, hi=None):
    for c in (lo, hi):
      if c is not None and not np.all(np.asarray(c) == np.asarray(c).reshape(-1)[0]):
        return self.fail("a clamp with per-element bounds", layer)
    lz = self.lazy(v)
    new = Lazy(lz.core, lz.mult, lz.add, lz.lo, lz.hi)
    if lo is not None:
      new.lo = max(new.lo, float(np.asarray(lo).reshape(-1)[0]))
    if hi is not None:
      new.hi = min(new.hi, float(np.asarray(hi).reshape(-1)[0]))
    return new

  def shape_of(self, v) -> Tuple[int, ...]:
    return self.nodes[v.core if isinstance(v, Lazy) else v.node].shape

  # -- the interpreter ------------------------------------------------------------------
  def path(self, prefix: str, eqn) -> str:
    """The module path of an equation: its name stack (relative inside a call) after the
    enclosing call's path, without the root module's own name."""
    stack = str(eqn.source_info.name_stack)
    if not prefix:
      return _strip_root(stack, self.root, self.through_last)
    return "/".join(p for p in [prefix] + stack.split("/") if p and "->" not in p and "," not in p)

  def run(self, jaxpr, consts, args, prefix: str):
    env: Dict[Any, Any] = {}
    read = lambda a: Const(np.asarray(a.val)) if isinstance(a, jcore.Literal) else env[a]
    for var, val in zip(jaxpr.constvars, consts):
      env[var] = val
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    eqns = list(jaxpr.eqns)
    i = 0
    while i < len(eqns):
      eqn = eqns[i]
      path = self.path(prefix, eqn)
      region = next((p for p in self.modules if path == p or path.startswith(p + "/")), None)
      if region is not None:
        j = i
        while j < len(eqns):
          pj = self.path(prefix, eqns[j])
          if not (pj == region or pj.startswith(region + "/")):
            break
          j += 1
        self.module_region(eqns[i:j], eqns[j:], jaxpr.outvars, env, read, region)
        i = j
        continue
      n = self.pattern(eqns, i, env, read, prefix, jaxpr.outvars)
      if n:
        i += n
        continue
      outs = self.eqn(eqn, [read(a) for a in eqn.invars], path)
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
      i += 1
    return [read(v) for v in jaxpr.outvars]

  def pattern(self, eqns, i, env, read, prefix, outvars) -> int:
    """A multi-equation pattern of an op (`Op.match`: softmax, GELU) starting at
    eqns[i] on an activation, as that op's value; the number of equations consumed."""
    for op in ops.PATTERNS:
      m = op.match(eqns, i)
      if not m:
        continue
      n, x = m
      if isinstance(x, jcore.Literal) or isinstance(env.get(x), (Const, type(None))):
        continue
      region = eqns[i:i + n]
      inner = {v for e in region[:-1] for v in e.outvars}
      later = {a for e in eqns[i + n:] for a in e.invars if not isinstance(a, jcore.Literal)}
      later |= {v for v in outvars if not isinstance(v, jcore.Literal)}
      if inner & later:
        continue
      path = self.path(prefix, region[-1])
      out = op.trace_match(self, env[x], region, path, read)
      if isinstance(out, Bad):
        out = self.fail(out.why, out.layer, region[-1].outvars[0].aval.shape)
      env[region[-1].outvars[0]] = out
      return n
    return 0

  def module_region(self, region_eqns, rest, outvars, env, read, path):
    """One call of a module an op declares (a normalization) becomes that op's node."""
    defined = {v for e in region_eqns for v in e.outvars}
    inputs = []
    for e in region_eqns:
      for a in e.invars:
        if not isinstance(a, jcore.Literal) and a not in defined and a not in inputs:
          inputs.append(a)
    acts = [a for a in inputs if not isinstance(env[a], Const)]
    used_later = {a for e in rest for a in e.invars if not isinstance(a, jcore.Literal)}
    used_later |= {v for v in outvars if not isinstance(v, jcore.Literal)}
    outs = [v for v in defined if v in used_later]
    if len(acts) != 1 or len(outs) != 1:
      for v in outs:
        env[v] = self.fail(f"a {type(self.modules[path]).__name__} call with {len(acts)} "
                           f"activation inputs and {len(outs)} outputs", path, v.aval.shape)
      return
    module = self.modules[path]
    out = ops.for_module(module).trace_module(self, env[acts[0]], path, module)
    if isinstance(out, Bad):
      out = self.fail(out.why, path, outs[0].aval.shape)
    env[outs[0]] = out

  def eqn(self, eqn, vals, path):
    name = eqn.primitive.name
    sub = next((v for v in eqn.params.values()
                if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))), None)
    if name in _CALLS and sub is not None:
      closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
      n_in = len(closed.jaxpr.invars)
      return self.run(closed.jaxpr, [Const(np.asarray(c)) for c in closed.consts],
                      vals[len(vals) - n_in:], path)
    if all(isinstance(v, Const) for v in vals):
      outs = eqn.primitive.bind(*[v.value for v in vals], **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
      return [Const(np.asarray(o)) for o in outs]
    return [self.act_eqn(name, eqn, vals, path)]

  def act_eqn(self, name, eqn, vals, path):
    out = self._act_eqn(name, eqn, vals, path)
    if isinstance(out, Bad):  # keep checking the layers after it
      return self.fail(out.why, out.layer, eqn.outvars[0].aval.shape)
    return out

  def _act_eqn(self, name, eqn, vals, path):
    acts = [v for v in vals if not isinstance(v, Const)]
    consts = [v.value for v in vals if isinstance(v, Const)]
    if name in _PASS:
      return vals[0]
    if name == "convert_element_type":
      ok = np.issubdtype(np.dtype(eqn.params["new_dtype"]), np.floating)
      return vals[0] if ok else self.fail("a cast of an activation to an integer", path)
    if name in ("add", "sub") and len(acts) == 1:
      c = consts[0]
      if name == "add":
        return self.affine(acts[0], path, add=c)
      if isinstance(vals[0], Const):  # c − x
        return self.affine(self.affine(acts[0], path, mult=-1.0), path, add=c)
      return self.affine(acts[0], path, add=-np.asarray(c))
    if name == "mul" and len(acts) == 1:
      return self.affine(acts[0], path, mult=consts[0])
    if name == "div" and len(acts) == 1 and isinstance(vals[1], Const):
      return self.affine(acts[0], path, mult=1.0 / np.asarray(consts[0], np.float64))
    if name == "neg":
      return self.affine(acts[0], path, mult=-1.0)
    if name in ("max", "min") and len(acts) == 1:
      kw = {"lo" if name == "max" else "hi": consts[0]}
      return self.clamp(acts[0], path, **kw)
    if name == "clamp" and isinstance(vals[0], Const) and isinstance(vals[2], Const):
      return self.clamp(vals[1], path, lo=vals[0].value, hi=vals[2].value)
    for op in ops.for_primitive(name):
      out = op.trace(self, eqn, vals, path)
      if out is not None:
        return out
    return self.fail(_WHY.get(name, f"'{name}' of an activation"), path)


def _op_modules(model, variables, x, apply_kwargs) -> Dict[str, nn.Module]:
  """Module path → instance of every module call an op traces whole (ops.MODULE_TYPES:
  GroupNorm / LayerNorm) in the forward pass."""
  found: Dict[str, nn.Module] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, ops.MODULE_TYPES):
      found["/".join(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, x)
  return found


def trace(model: nn.Module, variables: Dict[str, Any], x: jax.ShapeDtypeStruct,
          apply_kwargs: Optional[Dict[str, Any]] = None, *, root_scope: Optional[str] = None,
          model_name: Optional[str] = None) -> IR:
  """The IR of `model.apply(variables, x, **apply_kwargs)`; raises IntegerOnlyError
  listing every op that has no integer-only lowering, with its layer path.

  `root_scope`, when given, is the scope that every layer's own path follows in the name
  stack (the NNX float view's twins: scopes up to its last occurrence are dropped); by
  default the first scope, the Linen root module's class name, is. `model_name` is the
  model's name in messages (default: its class name)."""
  apply_kwargs = dict(apply_kwargs or {})
  model_name = model_name or type(model).__name__
  modules = _op_modules(model, variables, x, apply_kwargs)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  fn = lambda leaves, x: model.apply(jax.tree_util.tree_unflatten(treedef, leaves), x,
                                     **apply_kwargs)
  closed = jax.make_jaxpr(fn)(leaves, x)
  if len(closed.jaxpr.outvars) != 1:
    raise IntegerOnlyError(f"the model returns {len(closed.jaxpr.outvars)} arrays; an "
                           "integer program has one output (the logits)")
  tracer = _Tracer(root_scope or type(model).__name__, modules, variables.get("params", {}),
                   through_last=root_scope is not None)
  x_val = Tensor(tracer.node("input", [], tuple(x.shape), ""))
  if not np.issubdtype(np.dtype(x.dtype), np.floating) and not (
      np.dtype(x.dtype) == np.int32 and len(x.shape) == 2):
    tracer.fail(f"an input of dtype {x.dtype} (integer programs take float inputs and "
                "quantize them, or int32 token ids [batch, tokens])", "")
  consts = [Const(np.asarray(c)) for c in closed.consts]
  args = [Const(np.asarray(l)) for l in leaves] + [x_val]
  (out,) = tracer.run(closed.jaxpr, consts, args, "")
  if isinstance(out, Const):
    tracer.fail("an output that does not depend on the input", "")
  if tracer.bad:
    by_layer: Dict[str, List[str]] = {}
    for b in tracer.bad.values():
      by_layer.setdefault(b.layer, []).append(b.why)
    lines = "\n".join(f"  - layer {layer or '<top level>'!r}: {'; '.join(whys)}"
                      for layer, whys in by_layer.items())
    raise IntegerOnlyError(
        f"{model_name} cannot run as an integer-only program; these ops have "
        f"no integer lowering:\n{lines}\nSupported: bias and BatchNorm (inference mode) "
        "folds, ReLU / ReLU6 / clamps, "
        f"{', '.join(op.summary for op in ops.OPS.values())}.")
  output = tracer.materialize(out)
  return IR(tracer.nodes, 0, output, x.dtype)
