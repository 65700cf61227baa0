"""Serialize a serving model with `jax.export`; reload it anywhere jax runs.

    jq.export_serving(serving_model, serving_vars, x_example, "model.jqx")
    # later, in a process that has jax and numpy only (no jaxquant, no Flax class):
    fn = jq.load_exported("model.jqx")       # or load this file by path: see below
    logits = fn(x)                           # serving_model.apply's (see Exactness)

The file is one npz archive: the serialized StableHLO module (`jax.export`; the forward
with the variables as arguments, int8 / packed codes and all), every variable leaf as an
array, and a small JSON header. Variables travel as arguments, not constants, so the
reloaded computation is the very one `jax.jit(lambda v, x: model.apply(v, x))` runs in
process. The batch axis is exported symbolic (`batch_polymorphic=True`, jax.export
shape polymorphism): jaxquant's quantized contractions (dynamic or static activation
ranges, packed weights) trace with it, so one file serves any batch size. A model that
does not (Python control flow on the batch size) is exported with the example's fixed
batch, with a warning.

Exactness: with `batch_polymorphic=False` the outputs are bit-identical to the jitted
serving apply at that batch size. With a symbolic batch, W8A8 / int layers are too, but
a weight-only layer cannot choose its small-batch kernel by the batch size (it is not
known when tracing), so it takes the general path: same codes and scales, a different
float summation order, about 1 ulp per layer (5.7e-7 on a 2-layer weight-only MLP with
outputs of order 1). Export with `batch_polymorphic=False` where bit-identity matters.

This module imports only jax, numpy and the standard library, so a deployment can copy
it (or load it by path) without jaxquant's model code.
"""
from __future__ import annotations

import functools
import io
import json
import os
import warnings
from typing import Any, Callable

import jax
import numpy as np

FORMAT = "jaxquant.exported_serving"
VERSION = 1
_MODULE_KEY = "__module__"
_HEADER_KEY = "__header__"


def _leaf_key(i: int) -> str:
  return f"leaf_{i:05d}"


def export_serving(model, variables, example, path: str, *,
                   batch_polymorphic: bool = True, **model_kwargs) -> jax.export.Exported:
  """Exports `model.apply(variables, x)` (or `model(variables, x)` for a callable) for
  inputs shaped like `example` and writes it to `path`; returns the `jax.export.Exported`.

  `variables` may hold any arrays (int8 codes, packed uint8, float scales) in any pytree
  of registered nodes; only its leaves are stored, the structure lives in the module.
  `**model_kwargs` (e.g. `train=False`) are passed to every call as Python values, fixed
  in the exported computation.
  """
  apply = model.apply if hasattr(model, "apply") else model
  if model_kwargs:
    apply = functools.partial(apply, **model_kwargs)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  leaves = [np.asarray(l) for l in leaves]
  fn = jax.jit(lambda leaves, x: apply(jax.tree_util.tree_unflatten(treedef, leaves), x))
  example = np.asarray(example)
  leaf_specs = [jax.ShapeDtypeStruct(l.shape, l.dtype) for l in leaves]
  exported = None
  if batch_polymorphic:
    dims = ", ".join(["b"] + [str(d) for d in example.shape[1:]])
    x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), example.dtype)
    try:
      exported = jax.export.export(fn)(leaf_specs, x_spec)
    except Exception as e:  # pylint: disable=broad-except
      # A model that needs a concrete batch (Python control flow on it, int() of it):
      # export the example's batch, and say so.
      warnings.warn(f"jaxquant.export_serving: the model does not trace with a symbolic "
                    f"batch ({type(e).__name__}: {str(e).splitlines()[0]}); exporting the "
                    f"fixed input shape {example.shape}", stacklevel=2)
      exported = None
  if exported is None:
    exported = jax.export.export(fn)(leaf_specs, jax.ShapeDtypeStruct(example.shape,
                                                                       example.dtype))
  header = {"format": FORMAT, "version": VERSION, "num_leaves": len(leaves),
            # Raw bytes + dtype names: npz has no float8 / bfloat16 (ml_dtypes) types.
            "leaves": [{"dtype": str(l.dtype), "shape": list(l.shape)} for l in leaves],
            "input_shape": [str(d) for d in exported.in_avals[-1].shape],
            "input_dtype": str(example.dtype),
            "output_shapes": [[str(d) for d in a.shape] for a in exported.out_avals]}
  arrays = {_leaf_key(i): np.frombuffer(l.tobytes(), np.uint8) for i, l in enumerate(leaves)}
  arrays[_MODULE_KEY] = np.frombuffer(bytes(exported.serialize()), np.uint8)
  arrays[_HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)  # never a half-written file under the final name
  return exported


class LoadedServing:
  """A reloaded serving model: `fn(x)` runs it; `exported` is the jax.export.Exported."""

  def __init__(self, exported: jax.export.Exported, leaves, header):
    self.exported, self.leaves, self.header = exported, leaves, header
    self._call = jax.jit(exported.call)

  def __call__(self, x) -> Any:
    return self._call(self.leaves, x)


def load_exported(path: str) -> Callable[[Any], Any]:
  """Reads a file written by `export_serving`; returns a callable of the input."""
  with np.load(path) as npz:
    header = json.loads(bytes(npz[_HEADER_KEY]).decode())
    if header.get("format") != FORMAT or header.get("version") != VERSION:
      raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (header {header})")
    module = bytes(npz[_MODULE_KEY])
    leaves = [np.frombuffer(npz[_leaf_key(i)].tobytes(), jax.numpy.dtype(spec["dtype"]))
              .reshape(spec["shape"]) for i, spec in enumerate(header["leaves"])]
  exported = jax.export.deserialize(bytearray(module))
  return LoadedServing(exported, leaves, header)
