"""Compiled calls outside a trace.

Called eagerly (Flax's usual `init`, an NNX model called outside `nnx.jit`, a notebook),
a quantized contraction would run op by op: its few hundred small operations are each
compiled on first use (~12 s for the first init of a 3-layer Linen MLP, ~7 s for the
first call of a 2-layer NNX model), and every later eager call dispatches them one by one
(~0.5 s per call of that NNX model, against 2 ms jitted). `compiled_when_eager` runs such
a function as one compiled call instead, cached per shapes and static arguments. Under a
trace (jit, grad, vmap, scan) the function is traced inline as before, so a traced program
is unchanged.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax


def compiled_when_eager(fn, static_argnames: Tuple[str, ...]):
  """`fn`, run through `jax.jit` (static arguments: `static_argnames`, which callers must
  pass by keyword) when none of its arguments holds a tracer; `fn` itself otherwise.
  The jitted function is the wrapper's `jitted` attribute."""
  jitted = jax.jit(fn, static_argnames=static_argnames)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    static = {k: _hashable(kwargs.pop(k)) for k in static_argnames if k in kwargs}
    if _traced(args, kwargs):
      return fn(*args, **static, **kwargs)
    return jitted(*args, **static, **kwargs)
  call.jitted = jitted
  return call


def _traced(*trees) -> bool:
  """Whether any leaf of `trees` is a tracer (the call is being traced)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _hashable(v):
  """A static argument with its lists as tuples (a jitted call's static args must hash);
  named tuples (`ConvDimensionNumbers`) hash already and are kept as they are."""
  if isinstance(v, list) or (type(v) is tuple):  # pylint: disable=unidiomatic-typecheck
    return tuple(_hashable(a) for a in v)
  return v
