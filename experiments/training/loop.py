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
With `ptq.enabled` the model trains in float and step 4 quantizes it after training
(`post_training_quantize`: calibrate, evaluate, convert, evaluate); with
`ptq.from_workdir` steps 2-3 restore a finished float run instead of training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import signal
import time
import warnings
from typing import Any, Callable

import chex
import flax
import jax
import ml_collections
import numpy as np
import optax

import jaxquant as jq
from jaxquant import state as jq_state
from experiments.data import BatchIterator, eval_batches, load_dataset
from experiments.training import config_build, preemption, sharding, steps
from experiments.training.checkpoint import Checkpointer, NoReadableCheckpointError
from experiments.training.config_build import ConfigError
from experiments.training.metrics import MetricsLogger, MetricsWindow
from experiments.training.optim import build_optimizer
from experiments.training.results import write_json_atomic, write_summary

_PER_LEAF_KEYS = ("grads_nonfinite", "trainable_nonfinite")


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or parameter; the message names step and layer."""


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
                   quantized: bool, input_noise_std: float = 0.0
                   ) -> Callable[[Any], dict[str, float]]:
  """`evaluator(variables)`: loss / accuracy (/ bits per byte for 'lm') on the test split.

  The eval step is jitted once here and reused by every evaluation of the run. With
  `input_noise_std` > 0 every test input gets Gaussian noise of that many standard
  deviations of the training inputs (draws fixed by the config's seed).
  """
  batch_sh = sharding.batch_sharding(setup.mesh)
  eval_step = jax.jit(
      steps.make_eval_step(apply_fn, quantized=quantized, lm=setup.lm, seed=setup.config.seed),
      in_shardings=(variable_shardings, batch_sh, batch_sh),
      out_shardings=sharding.replicated(setup.mesh))

  sigma = input_noise_std * float(np.std(setup.dataset.train_x)) if input_noise_std else 0.0

  def evaluator(variables) -> dict[str, float]:
    totals: dict[str, float] = {}
    noise = np.random.default_rng(setup.config.seed)
    for batch, mask in _padded_eval_batches(setup.dataset, setup.config.batch_size):
      if sigma:
        x = batch["x"]
        batch = {**batch, "x": (x + sigma * noise.standard_normal(x.shape)).astype(x.dtype)}
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


def noisy_weights(variables, std: float, seed: int):
  """Every kernel ('params' leaf with ndim >= 2) as w * (1 + std * N(0, 1))."""
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), max(len(leaves), 1))
  noisy = [w * (1 + std * jax.random.normal(k, w.shape, w.dtype)) if w.ndim >= 2 else w
           for w, k in zip(leaves, keys)]
  return {**variables, "params": jax.tree_util.tree_unflatten(treedef, noisy)}


def noisy_evaluation(setup: Setup, state) -> dict[str, float]:
  """The trained model's test metrics under the config's eval noise (see schema.py)."""
  config = setup.config
  evaluator = make_evaluator(setup, setup.model.apply, _qat_variables(setup.state_shardings),
                             quantized=setup.quantized,
                             input_noise_std=config.eval.input_noise_std)
  variables = _qat_variables(state)
  if config.eval.weight_noise_std:
    variables = noisy_weights(variables, config.eval.weight_noise_std, config.seed)
  return evaluator(variables)


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
  example_x = setup.example_batch["x"][:1]  # lets convert trace the layer table if needed
  return _serve(setup, setup.model, _qat_variables(state), example_x)


def _serve(setup: Setup, qmodel, variables, *example_args):
  """Converts `qmodel`'s variables, evaluates the serving model and sizes its weights:
  (metrics, {float, quantized} parameter bytes)."""
  serving_model, serving_vars = jq.convert(qmodel, variables, *example_args)
  replicated = sharding.replicated(setup.mesh)
  serving_vars = jax.device_put(serving_vars, replicated)
  metrics = make_evaluator(setup, serving_model.apply, replicated, quantized=True)(serving_vars)
  report = jq.size_report(serving_vars)  # float bytes vs the bytes serving stores
  return metrics, {"float": int(report.total_float_bytes),
                   "quantized": int(report.total_quantized_bytes)}


def post_training_quantize(setup: Setup, state) -> tuple[dict, dict, dict]:
  """PTQ of a trained float state with `setup.ptq_rules`.

  Calibrates the static activation ranges (and the PTQ algorithm's statistics) on the
  first `ptq.calib_batches` training batches (`jaxquant.calibrate`), evaluates that
  model, converts it (`jaxquant.convert`, which runs the rules' PTQ algorithm) and
  evaluates the serving model. Returns (PTQ metrics, serving metrics, param bytes); with
  a PTQ algorithm (GPTQ, AWQ, SmoothQuant) the PTQ metrics are the serving model's, the
  only one holding the algorithm's weights.
  """
  config = setup.config
  qmodel = jq.quantize_model(setup.float_model, setup.ptq_rules)
  example_x = np.asarray(setup.example_batch["x"][:1])
  key = jax.random.key(config.seed)
  qvars = dict(qmodel.init({"params": key, jq_state.RNG: key}, example_x))
  trained = jax.device_get(_qat_variables(state))
  if (jax.tree_util.tree_structure(qvars["params"])
      != jax.tree_util.tree_structure(trained["params"])):
    raise ValueError("the quantized model's parameters do not match the trained float "
                     "model's; PTQ cannot map the weights")
  qvars.update(trained)  # float params (and e.g. batch_stats); quant_stats from init
  data = BatchIterator(setup.dataset, batch_size=config.batch_size, seed=config.seed)
  batches = [np.asarray(next(data)["x"]) for _ in range(config.ptq.calib_batches)]
  calibrated = jq.calibrate(qmodel, qvars, batches, rngs={jq_state.RNG: key})
  serving, param_bytes = _serve(setup, qmodel, calibrated)
  if any(rule.ptq is not None for rule in setup.ptq_rules):
    return dict(serving), serving, param_bytes
  replicated = sharding.replicated(setup.mesh)
  ptq_metrics = make_evaluator(setup, qmodel.apply, replicated, quantized=True)(
      jax.device_put(calibrated, replicated))
  return ptq_metrics, serving, param_bytes


def _restore_float_run(setup: Setup, source: str):
  """`(step, state)` of the finished float run in `source` (ptq.from_workdir)."""
  _, _, step, state = _other_run(setup, "ptq.from_workdir", source, float_only=True)
  return step, state


def _other_run(setup: Setup, key: str, source: str, *, float_only: bool):
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


def _warm_variables(setup: Setup, other) -> dict[str, Any]:
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
  loaded = _warm_variables(setup, other)
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
  _, teacher_setup, _, state = _other_run(setup, "distill.teacher_workdir",
                                          setup.config.distill.teacher_workdir,
                                          float_only=True)
  variables = _qat_variables(state)
  forward = jax.jit(lambda v, x: teacher_setup.model.apply(v, x))
  return lambda x: forward(variables, x)


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
  teacher = load_teacher(setup)
  warm_source = None
  if config.init.from_workdir:  # read (and checked) before the workdir is touched
    warm_source = _other_run(setup, "init.from_workdir", config.init.from_workdir,
                             float_only=False)[3]
    _warm_variables(setup, warm_source)
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
      state = warm_start(setup, state, warm_source, jax.random.key(config.seed))
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
    test, serving, param_bytes, extra = _final_evaluation(setup, state, evaluate_qat,
                                                          metrics_logger, final_step)
  finally:
    metrics_logger.close()
    ckpt.close()

  summary = _summary(setup, config_dict, test, serving, param_bytes, extra, last_train,
                     start_time=start_time, final_step=final_step,
                     resumed_from=start_step if restored is not None else None)
  if is_writer:
    write_summary(workdir, summary)
  return summary


def _final_evaluation(setup: Setup, state, evaluate_qat, metrics_logger, step: int):
  """(test, serving, param bytes, extra metrics) at the end of a run, logged as it goes.

  QAT: the trained model and its converted serving model. PTQ: 'test' is the
  post-training-quantized model and the float model's metrics are kept as 'float_test'.
  """
  test = evaluate_qat(state)
  extra = {}
  if setup.config.eval.input_noise_std or setup.config.eval.weight_noise_std:
    noisy = noisy_evaluation(setup, state)
    metrics_logger.write(step, "noisy_test", noisy)
    extra.update({f"noisy_test_{k}": v for k, v in noisy.items()})
  if setup.ptq_rules:
    metrics_logger.write(step, "float_test", test)
    extra.update({f"float_test_{k}": v for k, v in test.items()})
    test, serving, param_bytes = post_training_quantize(setup, state)
  else:
    serving, param_bytes = evaluate_serving(setup, state, test)
  metrics_logger.write(step, "test", test)
  metrics_logger.write(step, "serving_test", serving)
  return test, serving, param_bytes, extra


def _quantize_float_run(setup: Setup, workdir: str, start_time: float) -> dict[str, Any]:
  """ptq.from_workdir: PTQ of another workdir's finished float run; nothing trains."""
  source_step, state = _restore_float_run(setup, setup.config.ptq.from_workdir)
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
    test, serving, param_bytes, extra = _final_evaluation(
        setup, state, qat_evaluator(setup), metrics_logger, source_step)
  finally:
    metrics_logger.close()
  summary = _summary(setup, config_dict, test, serving, param_bytes, extra, {},
                     start_time=start_time, final_step=source_step, resumed_from=None)
  if is_writer:
    write_summary(workdir, summary)
  return summary


def compute_per_example(setup: Setup) -> dict[str, int]:
  """MACs and bit operations of one example's forward pass (`jaxquant.compute_report`):
  {macs, bops, float_bops}, the bit widths those of the rules the run quantizes with
  (training's or the PTQ stage's; none for a float run)."""
  rules = setup.rules or setup.ptq_rules
  with warnings.catch_warnings():  # a float run's empty rule list matches no layer
    warnings.simplefilter("ignore")
    qmodel = jq.quantize_model(setup.float_model, rules)
    example = np.asarray(setup.example_batch["x"][:1])
    variables = jax.eval_shape(lambda k: qmodel.init({"params": k, jq_state.RNG: k}, example),
                               jax.random.key(0))
    report = jq.compute_report(qmodel, variables, example)
  return {"macs": report.total_macs, "bops": report.total_bops,
          "float_bops": report.total_float_bops}


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
      "compute_per_example": compute_per_example(setup),
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
