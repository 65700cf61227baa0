"""`train_and_evaluate(config, workdir)`: the importable training loop.

Order of work, so that a bad config never touches the workdir:
  1. `prepare`: validate the config, load the dataset, build (and, with rules,
     quantize) the model, the mesh and the optimizer, and trace the state with
     `jax.eval_shape`. Every problem is a `ConfigError`.
  2. Workdir: config.json (atomic), then resume from the newest readable checkpoint or
     initialise with `jit(init, out_shardings=...)`.
  3. Train: `jit(step, in/out shardings, donate state)`; metrics are fetched one step
     behind; a non-finite loss or parameter stops the run (NonFiniteError) before any
     bad state is checkpointed.
  4. Evaluate the QAT model and (when quantized) the converted serving model; write
     summary.json atomically as the very last act.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from typing import Any, Callable

import chex
import flax
import jax
import ml_collections
import numpy as np
import optax

import jaxquant as jq
from experiments.data import BatchIterator, eval_batches, load_dataset
from experiments.training import config_build, sharding, steps
from experiments.training.checkpoint import Checkpointer, NoReadableCheckpointError
from experiments.training.config_build import ConfigError
from experiments.training.metrics import MetricsLogger, MetricsWindow
from experiments.training.optim import build_optimizer
from experiments.training.results import write_json_atomic

_PER_LEAF_KEYS = ("grads_nonfinite", "trainable_nonfinite")


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or parameter; the message names step and layer."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything built from the config before the workdir is touched."""
  config: ml_collections.ConfigDict
  dataset: Any
  model: Any  # quantized when `rules` is non-empty
  rules: list
  mesh: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable
  example_batch: dict[str, np.ndarray]
  abstract_state: Any
  state_shardings: Any

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


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates and builds everything; raises ConfigError naming the offending key."""
  config_build.validate_config(config)
  try:
    ds = load_dataset(config.dataset.name, seed=config.dataset.split_seed,
                      seq_len=config.dataset.seq_len)
  except ValueError as e:
    raise ConfigError(f"config key 'dataset': {e}") from None
  float_model, rules = config_build.build_model(config, num_classes=ds.num_classes)
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
               abstract_state=abstract, state_shardings=shardings)


# --------------------------------------------------------------------------- evaluation


def _padded_eval_batches(ds, batch_size: int):
  """Test batches padded to `batch_size` (fixed shapes under jit) with a mask."""
  for batch in eval_batches(ds, batch_size):
    n = batch["x"].shape[0]
    mask = np.zeros((batch_size,), np.float32)
    mask[:n] = 1.0
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch, mask


def make_evaluator(setup: Setup, apply_fn: Callable, variable_shardings: Any, *,
                   quantized: bool) -> Callable[[Any], dict[str, float]]:
  """`evaluator(variables)`: loss / accuracy (/ bits per byte for 'lm') on the test split.

  The eval step is jitted once here and reused by every evaluation of the run.
  """
  batch_sh = sharding.batch_sharding(setup.mesh)
  eval_step = jax.jit(
      steps.make_eval_step(apply_fn, quantized=quantized, lm=setup.lm, seed=setup.config.seed),
      in_shardings=(variable_shardings, batch_sh, batch_sh),
      out_shardings=sharding.replicated(setup.mesh))

  def evaluator(variables) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch, mask in _padded_eval_batches(setup.dataset, setup.config.batch_size):
      placed = sharding.global_batch({**batch, "mask": mask}, batch_sh)
      mask_arr = placed.pop("mask")
      # Fetched per batch (float64 sums on the host): it also keeps a single computation
      # in flight, which multi-process CPU collectives (gloo) need to avoid deadlocks.
      sums = jax.device_get(eval_step(variables, placed, mask_arr))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return steps.summarize_eval(totals, lm=setup.lm)

  return evaluator


def _qat_variables(state):
  return {**state["trainable"], **state["state"]}


def qat_evaluator(setup: Setup) -> Callable[[Any], dict[str, float]]:
  """Evaluates a train state's variables with the (possibly quantized) training model."""
  evaluator = make_evaluator(setup, setup.model.apply, _qat_variables(setup.state_shardings),
                             quantized=setup.quantized)
  return lambda state: evaluator(_qat_variables(state))


def evaluate_serving(setup: Setup, state, qat_metrics: dict[str, float]):
  """Metrics of the converted serving model and the parameter bytes {float, quantized}."""
  if not setup.quantized:
    float_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(state["trainable"]["params"]))
    return dict(qat_metrics), {"float": float_bytes, "quantized": float_bytes}
  variables = _qat_variables(state)
  example_x = setup.example_batch["x"][:1]  # lets convert trace the layer table if needed
  serving_model, serving_vars = jq.convert(setup.model, variables, example_x)
  replicated = sharding.replicated(setup.mesh)
  serving_vars = jax.device_put(serving_vars, replicated)
  metrics = make_evaluator(setup, serving_model.apply, replicated, quantized=True)(serving_vars)
  report = jq.size_report(serving_vars)  # float bytes vs the bytes serving stores
  return metrics, {"float": int(report.total_float_bytes),
                   "quantized": int(report.total_quantized_bytes)}


# --------------------------------------------------------------------------- training


def _check_batch(batch: dict[str, np.ndarray], batch_size: int, ds) -> None:
  """Host-side chex checks: the shapes the step was compiled for, finite inputs."""
  x_shape = (batch_size, ds.seq_len) if ds.kind == "lm" else (batch_size, *ds.input_shape)
  chex.assert_shape(batch["x"], x_shape)
  chex.assert_shape(batch["y"], x_shape if ds.kind == "lm" else (batch_size,))
  if np.issubdtype(batch["x"].dtype, np.floating):
    chex.assert_tree_all_finite(batch["x"])


def _first_bad_leaf(flags: np.ndarray, paths: list[str]) -> str | None:
  bad = np.flatnonzero(np.asarray(flags))
  return paths[bad[0]] if bad.size else None


def _nonfinite_message(step: int, m: dict[str, Any], paths: list[str],
                       last_good: int | None, ckpt_dir: str,
                       injected: bool) -> str | None:
  loss = float(m["loss"])
  bad_grad = _first_bad_leaf(m["grads_nonfinite"], paths)
  bad_param = _first_bad_leaf(m["trainable_nonfinite"], paths)
  if math.isfinite(loss) and bad_param is None:
    return None
  what = (f"non-finite loss ({loss}) at step {step}" if not math.isfinite(loss)
          else f"non-finite parameters after step {step} (loss {loss:.6g} was finite)")
  parts = [f"Training stopped: {what}" + (" (injected by debug.nan_at_step)." if injected
                                          else ".")]
  if bad_grad is not None:
    parts.append(f"First layer with non-finite gradients: {bad_grad}.")
  if bad_param is not None:
    parts.append(f"First layer with non-finite parameters after the update: {bad_param}.")
  if last_good is None:
    parts.append("No checkpoint was saved before it.")
  else:
    parts.append(f"Last good checkpoint: step {last_good} in {ckpt_dir} (kept; the bad "
                 "state was not saved).")
  parts.append("Try a lower optimizer.lr or optimizer.grad_clip_norm > 0.")
  return " ".join(parts)


def _versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__, "jaxquant": jq.__version__}


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and writes the workdir; returns the summary dict.

  Raises:
    ConfigError: invalid config (raised before the workdir is created or written).
    NonFiniteError: the loss or parameters became NaN/Inf; the last good checkpoint is
      kept and no bad state is saved.
    NoReadableCheckpointError: the workdir has checkpoints, but none restores for this
      config (a changed model/optimizer, or all damaged); nothing is overwritten.
  """
  start_time = time.time()
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  setup = prepare(config)
  is_writer = jax.process_index() == 0

  # ---- workdir: nothing above this line writes to disk.
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
  batch_sh = sharding.batch_sharding(setup.mesh)
  data_iter = BatchIterator(setup.dataset, batch_size=config.batch_size, seed=config.seed)
  try:
    restored = ckpt.restore_latest(setup.abstract_state)
  except NoReadableCheckpointError:
    ckpt.close()
    raise
  # Written after the restore check, so a refused resume leaves the old config.json.
  config_dict = config_build.config_to_dict(config)
  if is_writer:
    write_json_atomic(os.path.join(workdir, "config.json"), config_dict)
  meta: dict[str, Any] = {}
  if restored is None:
    init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
    state = init(jax.random.key(config.seed),
                 sharding.global_batch(setup.example_batch, batch_sh)["x"])
    start_step = 0
  else:
    start_step, state, meta = restored
    data_iter.restore(meta["iterator"])
  last_good = start_step if restored is not None else None

  train_step = jax.jit(
      steps.make_train_step(setup.model, setup.tx, setup.schedule,
                            quantized=setup.quantized, seed=config.seed,
                            nan_at_step=config.debug.nan_at_step),
      in_shardings=(setup.state_shardings, batch_sh),
      out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
      donate_argnums=(0,))
  evaluate_qat = qat_evaluator(setup)
  paths = steps.leaf_paths(setup.abstract_state["trainable"])
  metrics_logger = MetricsLogger(workdir, total_steps=config.num_steps,
                                 initial_step=start_step, progress=config.progress)
  window = MetricsWindow()
  last_train = dict(meta.get("last_train", {})) if meta else {}
  if restored is not None:
    metrics_logger.event(start_step, "resume", f"resumed from checkpoint step {start_step}")

  def process(step: int, device_metrics) -> None:
    """Host side of one finished step: NaN guard, window means, logging."""
    nonlocal last_train
    m = jax.device_get(device_metrics)
    message = _nonfinite_message(step, m, paths, last_good, ckpt.directory,
                                 injected=step == config.debug.nan_at_step)
    if message is not None:
      metrics_logger.event(step, "nonfinite", message)
      raise NonFiniteError(message)
    scalars = {k: float(v) for k, v in m.items() if k not in _PER_LEAF_KEYS}
    last_train = scalars
    window.add(scalars)
    metrics_logger.advance()
    if step % config.log_every == 0 or step == config.num_steps:
      means = window.means()
      metrics_logger.write(step, "train", means)
      metrics_logger.postfix(loss=means["loss"], acc=means["accuracy"])
      window.reset()

  def save(step: int) -> None:
    nonlocal last_good
    ckpt.save(step, state, {"iterator": data_iter.state(), "last_train": last_train})
    last_good = step

  try:
    pending = None
    for step in range(start_step + 1, config.num_steps + 1):
      batch = next(data_iter)
      _check_batch(batch, config.batch_size, setup.dataset)
      state, metrics = train_step(state, sharding.global_batch(batch, batch_sh))
      if pending is not None:
        process(*pending)  # the previous step: reading it does not wait for this one
      pending = (step, metrics)
      do_eval = config.eval_every and step % config.eval_every == 0 and step < config.num_steps
      do_save = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                 or step == config.num_steps)
      if do_eval or do_save:
        process(*pending)
        pending = None
        if do_save:
          save(step)
        if do_eval:
          metrics_logger.write(step, "test", evaluate_qat(state))
    if pending is not None:
      process(*pending)
    final_step = int(jax.device_get(state["step"]))
    test = evaluate_qat(state)
    metrics_logger.write(final_step, "test", test)
    serving, param_bytes = evaluate_serving(setup, state, test)
    metrics_logger.write(final_step, "serving_test", serving)
  finally:
    metrics_logger.close()
    ckpt.close()

  key = "bits_per_byte" if setup.lm else "accuracy"
  summary = {
      "config": config_dict,
      "metrics": {
          f"test_{key}": test[key],
          f"serving_test_{key}": serving[key],
          "test_loss": test["loss"],
          "serving_test_loss": serving["loss"],
          "test_accuracy": test["accuracy"],
          "final_loss": last_train.get("loss", float("nan")),
          "final_train_accuracy": last_train.get("accuracy", float("nan")),
      },
      "param_bytes": param_bytes,
      "wall_time_s": round(time.time() - start_time, 3),
      "steps": final_step,
      "resumed_from_step": start_step if restored is not None else None,
      "quantized": setup.quantized,
      "mesh": {"shape": dict(setup.mesh.shape), "num_devices": jax.device_count(),
               "num_processes": jax.process_count()},
      "versions": _versions(),
      "data": {"name": setup.dataset.name, "kind": setup.dataset.kind,
               **setup.dataset.metadata},
  }
  if is_writer:
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary
