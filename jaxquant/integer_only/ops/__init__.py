"""The integer-only op registry: one module per op kind, each declaring its trace rule,
float semantics, emission and JAX kernel in one place (see base.py for the interface).

Every module of this package except base.py is an op module: it defines `OPS`, a tuple
of its `Op` values, and is found by name (sorted), so adding an op is a new module here,
its kernel in jaxquant/deploy/numpy_runtime.py's `OPS` table, and its tests.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional

from jaxquant.integer_only.ops.base import GraphOp, Op, check

_MODULES = tuple(importlib.import_module(f"{__name__}.{m.name}")
                 for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
                 if m.name != "base")

OPS: Dict[str, Op] = check([op for m in _MODULES for op in m.OPS])
GRAPH_OPS: Dict[str, GraphOp] = {name: gop for op in OPS.values()
                                 for name, gop in op.graph_ops.items()}
STRUCTURAL = tuple(k for k, op in OPS.items() if op.structural)
MODULE_TYPES = tuple(t for op in OPS.values() for t in op.modules)
PATTERNS = tuple(op for op in OPS.values() if op.match is not None)


def get(kind: str) -> Op:
  """The op of an IR node kind; a KeyError naming the known kinds otherwise."""
  if kind not in OPS:
    raise KeyError(f"no integer-only op of kind {kind!r}; known: {sorted(OPS)}")
  return OPS[kind]


def for_primitive(name: str) -> List[Op]:
  """The ops that trace from jax primitive `name`, in registry order."""
  return [op for op in OPS.values() if name in op.primitives]


def for_module(module) -> Optional[Op]:
  """The op that traces a whole call of this Linen module, or None."""
  return next((op for op in OPS.values() if isinstance(module, op.modules)), None)


__all__ = ["GraphOp", "Op", "OPS", "GRAPH_OPS", "STRUCTURAL", "MODULE_TYPES", "PATTERNS", "get",
           "for_primitive", "for_module"]
