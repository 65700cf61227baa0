r"""The experiment config schema: every key the trainer reads, with its default.

`get_config()` is the reference that `config_build.validate_config` checks a config
against (unknown, missing or mistyped keys are errors), and the starting point of every
recipe (configs/base.py returns it; the other recipes override it).

Keys (all of them; the trainer never falls back to a default for a missing key):

  seed              PRNG seed: parameter init, training-data order and the per-step
                    keys `fold_in(key(seed), step)` (stochastic rounding when quantized).
  dataset.name      'mnist1d' | 'digits' | 'pytext' (see experiments.data.load_dataset).
  dataset.seq_len   window length for 'lm' datasets (ignored for classification).
  dataset.split_seed  train/test split seed (only 'digits' uses it); kept apart from
                    `seed` so runs with different seeds share one test set.
  model.name        'mlp' | 'cnn1d' | 'resnet' | 'gpt' | 'bert'.
  model.kwargs      the model's keyword arguments (experiments.models.model_fields lists
                    them); num_classes comes from the dataset.
  optimizer.name    'adamw' (b1, b2, decoupled weight_decay) | 'sgd' (momentum; 0 = plain
                    SGD; weight_decay added to the gradient). Weight decay touches only
                    'params' leaves with ndim >= 2 (kernels), never biases, norms or the
                    learned quantization scales.
  optimizer.lr      peak learning rate.
  optimizer.schedule  'cosine' (linear warmup, then cosine decay to 0 at num_steps) |
                    'constant' (linear warmup, then constant).
  optimizer.warmup_steps  linear warmup length from 0.
  optimizer.grad_clip_norm  clip the global gradient norm to this; 0 disables.
  batch_size        global batch (split over the mesh's 'data' axis, so it must be
                    divisible by it); also the evaluation batch.
  num_steps         total optimizer steps; the schedule is defined over them.
  log_every         train metrics (means over the window) to metrics.jsonl/TensorBoard.
  eval_every        test-set evaluation period in steps; 0: only at the end.
  checkpoint_every  orbax checkpoint period in steps; 0: only at the end. Rerunning the
                    same command resumes from the latest readable checkpoint.
  checkpoint_every_minutes  also checkpoint when this much wall time passed since the
                    last save (default 10, so a long run loses at most that much to a
                    crash); 0: off. SIGTERM / SIGUSR1 always save at the next step
                    boundary and exit with status 75 (see training/preemption.py).
  keep_checkpoints  how many checkpoints to keep (orbax max_to_keep).
  mesh_shape        (data, model) device mesh; -1 takes all remaining devices. The batch
                    is sharded over 'data'. Parameters are replicated, except 2-D kernels
                    (leaves named 'kernel' with ndim 2: Dense layers) whose output dim is
                    divisible by the 'model' size: those, and their optimizer moments,
                    are split over 'model' on the last dim.
  progress          tqdm progress bar on stderr (only when stderr is a terminal).
Warm start (`init`): `init.from_workdir` '' starts from random weights; a path starts
from the 'params' (and other non-quantization collections, e.g. batch statistics) of
that finished run's newest checkpoint, for example QAT fine-tuning of a float run or
one stage of progressive precision (8 -> 4 -> 2 bits). Same model required; learned
quantizer variables (LSQ steps, PACT clips) are initialised from the loaded weights,
and the optimizer starts fresh. It applies only to a fresh run: resuming this run's own
checkpoint takes precedence.

Knowledge distillation (`distill`, Hinton et al. 2015): with a teacher, the training
loss is (1 - weight) * CE(labels) + weight * T^2 * KL(softmax(teacher / T) ||
softmax(student / T)); the teacher's logits come from a separate jitted forward of the
teacher's float weights on the same batch. Metrics add `distill_loss` (the KL term).

  distill.teacher_workdir  '' disables it; else a finished float run (quant.bits=32) on
                    the same dataset, whose newest checkpoint is the teacher.
  distill.temperature  T > 0.
  distill.weight    in [0, 1]; 0 trains on the labels alone, 1 on the teacher alone.

  eval.input_noise_std   robustness at evaluation: Gaussian noise of this many standard
                    deviations of the training inputs is added to every test input
                    ('classification' datasets only); 0 disables it.
  eval.weight_noise_std  multiplicative weight noise at evaluation: every kernel (a
                    'params' leaf with ndim >= 2) becomes w * (1 + std * N(0, 1)) before
                    its quantization; 0 disables it.
                    With either set, the end of the run also evaluates the trained model
                    (float or QAT; for ptq.enabled the float model) under that noise,
                    reported as noisy_test_* metrics; the noise draws are fixed by `seed`.
  debug.nan_at_step debugging aid: multiply the loss by NaN at this step (1-based, as
                    logged) to exercise the fail-loudly path; -1 disables it.
  debug.signal_at_step debugging aid: the trainer sends itself SIGUSR1 while this step
                    runs, as a scheduler's preemption would (the run saves at the end of
                    the step and exits 75); -1 disables it.

Quantization (`quant`) is an ordered list of rules, first match wins, each a ConfigDict
{pattern, weight, act, grad, mode, ptq} built by `quant_rule`: `weight`/`act`/`grad` are
None (float) or a `quant_spec` (a dict of jaxquant.QuantSpec fields), `ptq` is None or a
`ptq_spec` (a dict of jaxquant.PTQ fields: method, percdamp, act_order, alpha, grid).
These are the one spelling of specs and rules in configs; they become jaxquant.Rule
objects at the experiment boundary (config_build.rules_from_config, or rules_from_list
for a recipe with its own runner, e.g. configs/minilm_ptq.py). Sweeps are plain overrides
because the specs hold ml_collections FieldReferences to the header fields:

  quant.bits      weight bits of every spec that follows it; 32 means float: no rules
                  at all (the list is ignored). --config.quant.bits=4 changes them all.
  quant.format    weight format of those specs: 'int' (bits 2..8) | 'binary' (bits=1).
  quant.act_bits  activation bits of the specs that follow it; it follows quant.bits
                  until overridden itself (binary weights keep e.g. act_bits=8).
  quant.weight_ste  weight gradient rule of those specs: 'lsq' (learned step size, int
                  only) | 'identity' | 'clipped' (binary weights need one of the last two).
  quant.mode      'int' (default: real s8 x s8 -> s32 dots and convs) | 'fake' (float
                  dot of dequantized operands).
  quant.weight_granularity  'channel' (default: one scale per output channel) |
                  'tensor' (one scale per weight) of the swept weight specs.
  quant.act_calibration  range estimator of the swept activation specs: 'percentile'
                  (default: 99th percentile of |x|) | 'absmax' | 'mse'.

Post-training quantization (`ptq`): with `ptq.enabled` the model trains in float (the
rules are not applied during training), then the trained float weights are quantized
with the `quant` rules (round to nearest): `jaxquant.calibrate` on `ptq.calib_batches`
training batches fixes the static activation ranges, `jaxquant.convert` makes the
serving model, and both are evaluated. summary.json's `test_*` metrics are then the PTQ
model's, `float_test_*` the float model's. Learned quantizers (LSQ, PACT) need training
and are refused.

  ptq.enabled       False: quantization-aware training with the rules (the default).
  ptq.calib_batches number of training batches (of batch_size) to calibrate on.
  ptq.from_workdir  '' trains the float model here; a path takes the float weights
                    from that finished float run's newest checkpoint instead (same
                    model, optimizer and dataset; nothing is trained).
  ptq.method        'rtn' rounds every weight to nearest; 'gptq' / 'awq' / 'smoothquant'
                    runs that algorithm (`jq.PTQ(method=...)`, its defaults) on every
                    rule with a weight spec and no `ptq` of its own (Dense / Einsum
                    layers; a convolution is refused, naming it). A rule's own `ptq`
                    (`ptq_spec(...)`, with any knob) always wins; rules that carry one
                    need ptq.enabled. The algorithm's weights exist only in the converted
                    model, so `test_*` are then the serving model's metrics (equal to
                    `serving_test_*`).

Rules that should not follow the sweep (e.g. first and last layer kept at 8 bits) use
literal numbers instead of the references; see `configs.base.standard_rules` and
configs/mnist1d_cnn.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def quant_spec(**fields: Any) -> ml_collections.ConfigDict:
  """A QuantSpec as config: only the given fields (jaxquant.QuantSpec's names; values may
  be FieldReferences); the rest take QuantSpec defaults."""
  return ml_collections.ConfigDict(fields)


def ptq_spec(**fields: Any) -> ml_collections.ConfigDict:
  """A post-training algorithm as config: jaxquant.PTQ's fields (method, percdamp,
  act_order, alpha, grid); the ones not given take PTQ defaults."""
  return ml_collections.ConfigDict(fields)


def quant_rule(pattern: str, *, weight=None, act=None, grad=None, mode: Any = "int",
               ptq=None) -> ml_collections.ConfigDict:
  """One rule as config: {pattern, weight, act, grad, mode, ptq}, jaxquant.Rule's fields;
  the specs are `quant_spec`s (or None: float), `ptq` a `ptq_spec` (or None)."""
  return ml_collections.ConfigDict({"pattern": pattern, "weight": weight, "act": act,
                                    "grad": grad, "mode": mode, "ptq": ptq})


def get_config() -> ml_collections.ConfigDict:
  """Every key with its default: a short float MNIST-1D CNN run."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "mnist1d"
  config.dataset.seq_len = 128
  config.dataset.split_seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn1d"
  config.model.kwargs = ml_collections.ConfigDict()

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-2
  config.optimizer.weight_decay = 0.0
  config.optimizer.momentum = 0.9
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 0.0

  config.batch_size = 256
  config.num_steps = 1000
  config.log_every = 100
  config.eval_every = 0
  config.checkpoint_every = 0
  config.checkpoint_every_minutes = 10.0
  config.keep_checkpoints = 2
  config.mesh_shape = (-1, 1)
  config.progress = True

  config.quant = ml_collections.ConfigDict()
  config.quant.bits = ml_collections.FieldReference(32)
  config.quant.format = ml_collections.FieldReference("int")
  # A reference to a reference: follows quant.bits until overridden on its own.
  config.quant.act_bits = ml_collections.FieldReference(config.quant.get_ref("bits"))
  config.quant.weight_ste = ml_collections.FieldReference("lsq")
  config.quant.mode = ml_collections.FieldReference("int")
  config.quant.weight_granularity = ml_collections.FieldReference("channel")
  config.quant.act_calibration = ml_collections.FieldReference("percentile")
  config.quant.rules = []

  config.ptq = ml_collections.ConfigDict()
  config.ptq.enabled = False
  config.ptq.calib_batches = 8
  config.ptq.from_workdir = ""
  config.ptq.method = "rtn"

  config.init = ml_collections.ConfigDict()
  config.init.from_workdir = ""

  config.distill = ml_collections.ConfigDict()
  config.distill.teacher_workdir = ""
  config.distill.temperature = 4.0
  config.distill.weight = 0.5

  config.eval = ml_collections.ConfigDict()
  config.eval.input_noise_std = 0.0
  config.eval.weight_noise_std = 0.0

  config.debug = ml_collections.ConfigDict()
  config.debug.nan_at_step = -1
  config.debug.signal_at_step = -1
  return config
