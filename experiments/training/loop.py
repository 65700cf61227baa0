"""`train_and_evaluate(config, workdir)`: the importable training loop.

Order of work, so that a bad config never touches the workdir:
  1. `run_setup.prepare`: validate the config, load the dataset, build (and, with rules,
     quantize) the model, the mesh and the optimizer, and trace the state with
     `jax.eval_shape`. Every problem is a `ConfigError`.
  2. Workdir: config.json (atomic), then resume from the newest readable checkpoint or
     initialise with `jit(init, out_shardings=...)` (warm starts and teachers come from
     other runs: restore.py).
  3. Train: `jit(step, in/out shardings, donate state)`; metrics are fetched one step
     behind; a non-finite loss or parameter stops the run (NonFiniteError) before any
     bad state is checkpointed.
  4. Evaluate the QAT model and (when quantized) the converted serving model
     (evaluation.py); write summary.json atomically as the very last act.
With `ptq.enabled` the model trains in float and step 4 quantizes it after training
(`evaluation.post_training_quantize`: calibrate, evaluate, convert, evaluate); with
`ptq.from_workdir` steps 2-3 restore a finished float run instead of training.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import time
from typing import Any

import chex
import flax
import jax
import ml_collections
import numpy as np
import optax

import jaxquant as jq
from experiments.data import BatchIterator
from experiments.training import config_build, evaluation, preemption, restore, sharding, steps
from experiments.training.checkpoint import Checkpointer, NoReadableCheckpointError
from experiments.training.metrics import MetricsLogger, MetricsWindow
from experiments.training.results import write_json_atomic, write_summary
from experiments.training.run_setup import Setup, prepare

_PER_LEAF_KEYS = ("grads_nonfinite", "trainable_nonfinite")


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or parameter; the message names step and layer."""


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and writes the workdir; returns the summary dict.

  Raises:
    ConfigError: invalid config (raised before the workdir is created or written).
    NonFiniteError: the loss or parameters became NaN/Inf; the last good checkpoint is
      kept and no bad state is saved.
    preemption.Preempted: SIGTERM or SIGUSR1 arrived; a checkpoint was saved at the
      next step boundary (rerunning resumes from it). A signal that arrives during the
      final evaluation is ignored: the run completes.
    NoReadableCheckpointError: the workdir has checkpoints, but none restores for this
      config (a changed model/optimizer, or all damaged); nothing is overwritten.
  """
  with preemption.StopSignals() as stop_signals:
    return _train_and_evaluate(config, workdir, stop_signals)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop_signals: preemption.StopSignals) -> dict[str, Any]:
  start_time = time.time()
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  setup = prepare(config)
  teacher = restore.load_teacher(setup)
  warm_source = None
  if config.init.from_workdir:  # read (and checked) before the workdir is touched
    warm_source = restore.other_run(setup, "init.from_workdir", config.init.from_workdir,
                                    float_only=False)[3]
    restore.warm_variables(setup, warm_source)
  is_writer = jax.process_index() == 0
  if config.ptq.from_workdir:
    return _quantize_float_run(setup, workdir, start_time)

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
    if warm_source is not None:
      state = restore.warm_start(setup, state, warm_source, jax.random.key(config.seed))
    start_step = 0
  else:
    start_step, state, meta = restored
    data_iter.restore(meta["iterator"])
  last_good = start_step if restored is not None else None

  train_step = jax.jit(
      steps.make_train_step(setup.model, setup.tx, setup.schedule,
                            quantized=setup.quantized, seed=config.seed,
                            nan_at_step=config.debug.nan_at_step,
                            distill=None if teacher is None else (
                                config.distill.temperature, config.distill.weight)),
      in_shardings=(setup.state_shardings, batch_sh),
      out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
      donate_argnums=(0,))
  evaluate_qat = evaluation.qat_evaluator(setup)
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
    boundary.saved()

  boundary = preemption.StepBoundary(stop_signals,
                                     every_minutes=config.checkpoint_every_minutes)
  try:
    pending = None
    for step in range(start_step + 1, config.num_steps + 1):
      batch = next(data_iter)
      _check_batch(batch, config.batch_size, setup.dataset)
      placed = sharding.global_batch(batch, batch_sh)
      if teacher is not None:
        placed["teacher_logits"] = teacher(placed["x"])
      state, metrics = train_step(state, placed)
      if step == config.debug.signal_at_step:
        os.kill(os.getpid(), signal.SIGUSR1)  # debugging aid: a preemption, see schema.py
      if pending is not None:
        process(*pending)  # the previous step: reading it does not wait for this one
      pending = (step, metrics)
      do_eval = config.eval_every and step % config.eval_every == 0 and step < config.num_steps
      save_on_clock, stop = boundary.poll()
      do_save = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                 or step == config.num_steps or save_on_clock or stop)
      if do_eval or do_save:
        process(*pending)
        pending = None
        if do_save:
          save(step)
        if stop and step < config.num_steps:
          metrics_logger.event(step, "preempted", f"stopped by {boundary.signame}; "
                               f"checkpoint saved at step {step}")
          raise preemption.Preempted(step, boundary.signame, ckpt.directory)
        if do_eval:
          metrics_logger.write(step, "test", evaluate_qat(state))
    if pending is not None:
      process(*pending)
    final_step = int(jax.device_get(state["step"]))
    test, serving, param_bytes, extra = evaluation.final_evaluation(
        setup, state, evaluate_qat, metrics_logger, final_step)
  finally:
    metrics_logger.close()
    ckpt.close()

  summary = _summary(setup, config_dict, test, serving, param_bytes, extra, last_train,
                     start_time=start_time, final_step=final_step,
                     resumed_from=start_step if restored is not None else None)
  if is_writer:
    write_summary(workdir, summary)
  return summary


def _quantize_float_run(setup: Setup, workdir: str, start_time: float) -> dict[str, Any]:
  """ptq.from_workdir: PTQ of another workdir's finished float run; nothing trains."""
  source_step, state = restore.restore_float_run(setup, setup.config.ptq.from_workdir)
  is_writer = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_dict = config_build.config_to_dict(setup.config)
  if is_writer:
    write_json_atomic(os.path.join(workdir, "config.json"), config_dict)
  metrics_logger = MetricsLogger(workdir, total_steps=0, initial_step=0, progress=False)
  try:
    metrics_logger.event(source_step, "ptq", "float weights from "
                         f"{os.path.abspath(setup.config.ptq.from_workdir)} step {source_step}")
    test, serving, param_bytes, extra = evaluation.final_evaluation(
        setup, state, evaluation.qat_evaluator(setup), metrics_logger, source_step)
  finally:
    metrics_logger.close()
  summary = _summary(setup, config_dict, test, serving, param_bytes, extra, {},
                     start_time=start_time, final_step=source_step, resumed_from=None)
  if is_writer:
    write_summary(workdir, summary)
  return summary


def _summary(setup: Setup, config_dict, test, serving, param_bytes, extra, last_train, *,
             start_time: float, final_step: int, resumed_from) -> dict[str, Any]:
  """summary.json's contents (the schema every report reads)."""
  key = "bits_per_byte" if setup.lm else "accuracy"
  return {
      "config": config_dict,
      "metrics": {
          f"test_{key}": test[key],
          f"serving_test_{key}": serving[key],
          "test_loss": test["loss"],
          "serving_test_loss": serving["loss"],
          "test_accuracy": test["accuracy"],
          "final_loss": last_train.get("loss", float("nan")),
          "final_train_accuracy": last_train.get("accuracy", float("nan")),
          **extra,
      },
      "param_bytes": param_bytes,
      "compute_per_example": evaluation.compute_per_example(setup),
      "wall_time_s": round(time.time() - start_time, 3),
      "steps": final_step,
      "resumed_from_step": resumed_from,
      "quantized": setup.quantized or bool(setup.ptq_rules),
      "mesh": {"shape": dict(setup.mesh.shape), "num_devices": jax.device_count(),
               "num_processes": jax.process_count()},
      "versions": _versions(),
      "data": {"name": setup.dataset.name, "kind": setup.dataset.kind,
               **setup.dataset.metadata},
  }
