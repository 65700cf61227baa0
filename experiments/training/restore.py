"""Finished runs read back: a workdir's newest checkpoint, and the other runs a config
names (`init.from_workdir` warm starts, `distill.teacher_workdir` teachers,
`ptq.from_workdir` float weights to quantize).

Another run is rebuilt from its config.json on this run's mesh and batch size and
restored from its newest checkpoint; anything unusable is a `ConfigError` naming the key.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jaxquant import state as jq_state
from experiments.training import config_build
from experiments.training.checkpoint import Checkpointer
from experiments.training.config_build import ConfigError
from experiments.training.run_setup import Setup, prepare, qat_variables


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str):
  """`(step, state, setup)` from the newest readable checkpoint of `workdir`, or None.

  For tests, PTQ and export: `state['trainable']['params']` are the float weights.
  """
  setup = prepare(config)
  ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                      max_to_keep=config.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(setup.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    return None
  step, state, _ = restored
  return step, state, setup


def restore_float_run(setup: Setup, source: str):
  """`(step, state)` of the finished float run in `source` (ptq.from_workdir)."""
  _, _, step, state = other_run(setup, "ptq.from_workdir", source, float_only=True)
  return step, state


def other_run(setup: Setup, key: str, source: str, *, float_only: bool):
  """`(config, setup, step, state)` of the finished run in `source` (config key `key`),
  on this run's mesh and batch size. ConfigError when it is not a usable run."""
  source = os.path.abspath(source)
  config_path = os.path.join(source, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"config key '{key}'={source!r} is not a run directory "
                      "(no config.json)")
  with open(config_path) as f:
    try:
      other = config_build.config_from_json(json.load(f))
    except ConfigError as e:
      raise ConfigError(f"config key '{key}': {e}") from None
  if float_only and (other.quant.bits != config_build.FLOAT_BITS or other.ptq.enabled):
    raise ConfigError(f"config key '{key}'={source!r} is a quantized run; it must be a "
                      "float run (quant.bits=32)")
  if other.dataset.name != setup.config.dataset.name:
    raise ConfigError(f"config key '{key}': that run used {other.dataset.name!r}, this "
                      f"one {setup.config.dataset.name!r}")
  other.mesh_shape = tuple(setup.config.mesh_shape)
  other.batch_size = setup.config.batch_size
  other.distill.teacher_workdir = ""
  other.init.from_workdir = ""
  other.ptq.from_workdir = ""
  other_setup = prepare(other)
  ckpt = Checkpointer(os.path.join(source, "checkpoints"), max_to_keep=other.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(other_setup.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise ConfigError(f"config key '{key}'={source!r} has no checkpoint")
  return other, other_setup, restored[0], restored[1]


def warm_variables(setup: Setup, other) -> dict[str, Any]:
  """The collections of a restored state that a warm start takes (all but the
  quantizers'), checked against this model's shapes; ConfigError when they differ."""
  loaded = {k: v for k, v in {**other["trainable"], **other["state"]}.items()
            if k not in jq_state.COLLECTIONS}
  abstract = setup.abstract_state
  for name, tree in loaded.items():
    mine = abstract["trainable"].get(name, abstract["state"].get(name))
    if mine is None or (jax.tree_util.tree_structure(mine)
                        != jax.tree_util.tree_structure(tree)) or any(
        a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(mine),
                                           jax.tree_util.tree_leaves(tree))):
      raise ConfigError(f"config key 'init.from_workdir': its '{name}' variables do not "
                        "match this model's (a different model or size)")
  return loaded


def warm_start(setup: Setup, state, other, rng: jax.Array):
  """`state` with the weights of `other`, init.from_workdir's restored state (see
  schema.py, `init`)."""
  loaded = warm_variables(setup, other)
  ours = jax.device_get(state)
  trainable = {k: loaded.get(k, v) for k, v in ours["trainable"].items()}
  other_state = {k: loaded.get(k, v) for k, v in ours["state"].items()}
  if jq_state.QUANT in trainable:  # learned quantizers, initialised from the loaded weights
    variables = {k: v for k, v in {**trainable, **other_state}.items() if k != jq_state.QUANT}
    _, new = setup.model.apply(variables, setup.example_batch["x"], mutable=[jq_state.QUANT],
                               rngs={jq_state.RNG: rng})
    trainable[jq_state.QUANT] = new[jq_state.QUANT]
  fresh = {"step": ours["step"], "trainable": trainable, "state": other_state,
           "opt_state": setup.tx.init(trainable)}
  return jax.device_put(fresh, setup.state_shardings)


def load_teacher(setup: Setup):
  """`teacher(x) -> logits` from distill.teacher_workdir's newest checkpoint, or None.

  The teacher is a float run on the same dataset; it runs on this run's mesh, jitted
  once with its variables as arguments (no constant folding)."""
  if not setup.config.distill.teacher_workdir:
    return None
  _, teacher_setup, _, state = other_run(setup, "distill.teacher_workdir",
                                         setup.config.distill.teacher_workdir,
                                         float_only=True)
  variables = qat_variables(state)
  forward = jax.jit(lambda v, x: teacher_setup.model.apply(v, x))
  return lambda x: forward(variables, x)
