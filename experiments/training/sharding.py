"""Device mesh, the parameter-sharding rule, and global batches.

Mesh axes are ('data', 'model'). Batches are split over 'data' on their leading dim
(replicated over 'model'). State leaves are replicated, except the model-parallel
rule: a leaf named 'kernel' with ndim 2 (a Dense kernel [in, out]) whose last dim is
divisible by the 'model' axis size is split over 'model' on that last dim. Optimizer
moments mirror the parameter paths (…/dense_0/kernel), so they follow the same rule.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS, MODEL_AXIS = "data", "model"


def under_multiprocess_slurm(environ: Mapping[str, str] = os.environ) -> bool:
  """True inside a SLURM job step of several tasks (`srun -n N`), where jax's own
  SLURM detection finds the coordinator, process count and process id."""
  return "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """Fills a -1 entry with the remaining devices; raises ValueError when it cannot fit."""
  data, model = (int(s) for s in mesh_shape)
  if data == -1 and model == -1:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} may hold at most one -1")
  if data == -1 or model == -1:
    known = model if data == -1 else data
    if num_devices % known:
      raise ValueError(f"mesh_shape={tuple(mesh_shape)}: {num_devices} devices are not "
                       f"divisible by {known}")
    data, model = (num_devices // known, model) if data == -1 else (data, num_devices // known)
  if data * model > num_devices:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} needs {data * model} devices; "
                     f"{num_devices} available")
  if jax.process_count() > 1 and data * model != num_devices:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} must use all {num_devices} devices "
                     f"in a {jax.process_count()}-process run")
  return data, model


def build_mesh(mesh_shape: Sequence[int]) -> Mesh:
  """A ('data', 'model') mesh over the first data*model devices."""
  devices = jax.devices()
  data, model = resolve_mesh_shape(mesh_shape, len(devices))
  grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _leaf_name(path) -> str | None:
  if not path:
    return None
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", None))


def partition_spec(path, leaf, model_size: int) -> P:
  """The rule above for one state leaf (anything with `.shape`)."""
  shape = getattr(leaf, "shape", ())
  if (model_size > 1 and len(shape) == 2 and _leaf_name(path) == "kernel"
      and shape[-1] % model_size == 0):
    return P(None, MODEL_AXIS)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of `abstract_state` (e.g. from jax.eval_shape)."""
  model_size = mesh.shape[MODEL_AXIS]
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path, leaf, model_size)),
      abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over 'data', everything else replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a host batch (the same global batch on every process) on the mesh.

  Each process materialises only the shards of its own devices, so this works
  unchanged for one process or many.
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return {k: put(v) for k, v in batch.items()}
