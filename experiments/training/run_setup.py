"""`prepare(config)`: everything a run builds from its config before it touches a workdir.

Validates the config, loads the dataset, builds (and, with rules, quantizes) the model,
the mesh and the optimizer, and traces the train state with `jax.eval_shape` to get its
shardings. Every problem is a `ConfigError` naming the key. The training loop
(loop.py), the evaluations (evaluation.py) and the restores of other runs (restore.py)
all work from the `Setup` it returns.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

import jaxquant as jq
from experiments.data import BatchIterator, load_dataset
from experiments.training import config_build, sharding, steps
from experiments.training.config_build import ConfigError
from experiments.training.optim import build_optimizer


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything built from the config before the workdir is touched."""
  config: ml_collections.ConfigDict
  dataset: Any
  model: Any  # quantized when `rules` is non-empty
  rules: list  # the rules training applies (none when ptq.enabled)
  mesh: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable
  example_batch: dict[str, np.ndarray]
  abstract_state: Any
  state_shardings: Any
  float_model: Any = None
  ptq_rules: list = dataclasses.field(default_factory=list)  # applied after training

  @property
  def quantized(self) -> bool:
    return bool(self.rules)

  @property
  def lm(self) -> bool:
    return self.dataset.kind == "lm"


def maybe_quantize(model, rules):
  """The float model itself, or `jaxquant.quantize_model(model, rules)`."""
  if not rules:
    return model
  return jq.quantize_model(model, rules)


def qat_variables(state) -> dict[str, Any]:
  """The model variables of a train state: its trainable and its other collections."""
  return {**state["trainable"], **state["state"]}


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates and builds everything; raises ConfigError naming the offending key."""
  config_build.validate_config(config)
  try:
    ds = load_dataset(config.dataset.name, seed=config.dataset.split_seed,
                      seq_len=config.dataset.seq_len)
  except ValueError as e:
    raise ConfigError(f"config key 'dataset': {e}") from None
  if ds.kind == "lm" and config.eval.input_noise_std:
    raise ConfigError(f"config key 'eval.input_noise_std'={config.eval.input_noise_std} "
                      f"needs a classification dataset; {config.dataset.name!r} is byte "
                      "tokens (use eval.weight_noise_std)")
  float_model, rules = config_build.build_model(config, num_classes=ds.num_classes)
  ptq_rules, rules = ((config_build.ptq_rules(config, rules), []) if config.ptq.enabled
                        else ([], rules))
  model = maybe_quantize(float_model, rules)
  try:
    mesh = sharding.build_mesh(config.mesh_shape)
  except ValueError as e:
    raise ConfigError(f"config key 'mesh_shape': {e}") from None
  data_size = mesh.shape[sharding.DATA_AXIS]
  if config.batch_size % data_size:
    raise ConfigError(f"config key 'batch_size'={config.batch_size} must be divisible by "
                      f"the mesh 'data' axis size {data_size} (mesh_shape="
                      f"{tuple(config.mesh_shape)})")
  try:
    example = next(BatchIterator(ds, batch_size=config.batch_size, seed=config.seed))
  except ValueError as e:
    raise ConfigError(f"config key 'batch_size'={config.batch_size}: {e}") from None
  tx, schedule = build_optimizer(config.optimizer, config.num_steps)
  init_fn = functools.partial(steps.make_init_fn(model, bool(rules)), tx=tx)
  rng = jax.random.key(config.seed)
  x_spec = jax.ShapeDtypeStruct(example["x"].shape, example["x"].dtype)
  try:
    abstract = jax.eval_shape(init_fn, rng, x_spec)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key 'model' (name={config.model.name!r}, kwargs="
                      f"{config.model.kwargs.to_dict()}) does not build on "
                      f"{config.dataset.name!r} inputs {x_spec.shape}: {e}") from None
  shardings = sharding.state_shardings(abstract, mesh)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return Setup(config=config, dataset=ds, model=model, rules=rules, mesh=mesh, tx=tx,
               schedule=schedule, init_fn=init_fn, example_batch=example,
               abstract_state=abstract, state_shardings=shardings,
               float_model=float_model, ptq_rules=ptq_rules)
