"""PTQ calibration, conversion of QAT variables to serving variables, and size reports.

Serving variables hold no float copy of a quantized weight: `convert` replaces each
quantized layer's 'params' kernel by the `QTensor` that `jq.quantize_weight` makes of it
in its format's stored form (`QTensor.pack`, from the format registry: int8 codes for
5–8-bit int, int16 for 16-bit, float8 values for fp8, packed uint8 codes for binary,
ternary and 2–4-bit int; a block format's codes with one byte per block scale), at the
same path. A weight-only Dense kernel [K, N] with
per-channel or per-tensor scales is stored as its transpose [N, K] (contracting axis 1,
the same codes and scales), the layout small-batch serving reads fastest
(`layout.decode_layout`). A QTensor records its spec, shape and layout, so the serving
model needs nothing else to use it; it round-trips through orbax
(restore with the serving variables' structure as the target). Everything else ('params'
biases and norms, 'quant_stats', learned activation scales in 'quant') is kept; learned
weight scales are folded into the stored scales. Weights trained with stochastic
rounding are stored with nearest rounding (a fixed model).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterable, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta, unfreeze

from jaxquant import layout
from jaxquant import observers as obs
from jaxquant import state
from jaxquant import transform
from jaxquant.ptq import layer as ptq_layer
from jaxquant.qtensor import QTensor
from jaxquant.quantize import quantize_weight
from jaxquant.spec import PTQ_METHODS

CALIBRATION = state.CALIBRATION  # the calibration observer's state in 'quant_stats'
PTQ_STATS = state.PTQ_STATS      # the PTQ statistics (XᵀX, Σ|x|, max|x|) there


def _plain(variables) -> Dict[str, Any]:
  """A mutable deep copy of the dict structure (arrays shared)."""
  def copy(node):
    return {k: copy(v) for k, v in node.items()} if isinstance(node, dict) else node
  return copy(unfreeze(meta.unbox(variables)))


def _layers(tree, prefix=""):
  """(path, node) for every quantized layer's dict in a collection
  (`state.is_layer_stats`)."""
  for k, v in sorted(tree.items()):
    if isinstance(v, dict):
      p = f"{prefix}/{k}" if prefix else k
      if state.is_layer_stats(v):
        yield p, v
      yield from _layers(v, p)


def _node(tree, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


FORWARDS = ("quantized", "float")


def calibrate(qmodel, variables, batches: Iterable, *, masks=None, forward="quantized",
              rngs=None, observers=()):
  """Post-training calibration of static activation ranges (and PTQ statistics).

  Runs `qmodel` on every batch (each a positional input, or a tuple of them) and returns
  `variables` with, for every quantized layer with an activation spec, the static range
  'act_lo' / 'act_hi' / 'act_count' in 'quant_stats' (`observers.calibration_range`:
  min/max over batches for absmax, the mean of per-batch clip ranges for percentile /
  MSE). Calibrated layers then quantize activations with that fixed range instead of the
  batch's own. Layers whose rule names a PTQ algorithm also collect its statistics
  (`observers.ptq_stats`, under 'ptq_*'). `observers` adds named observer factories; their
  states are kept in 'quant_stats'.
  Earlier static ranges are dropped first. Raises ValueError for an empty set of
  batches, and names the layer whose calibration input held NaN or Inf.

  `masks`: None, or one array per batch (same order) marking the real rows (1 / True)
  of every quantized layer's input, e.g. the [batch, tokens] attention mask of a padded
  text batch. Rows a mask leaves out (padding) count in no statistic: not in the static
  ranges, nor in XᵀX, Σ|x|, max|x| or their row count, nor in the NaN/Inf check. Each
  mask's shape must equal the leading axes of every quantized layer's input rows (its
  non-contracted axes; it is broadcast over the rest); a layer where it does not gets a
  ValueError naming it.

  `forward`: which model the calibration batches run through. 'quantized' (default):
  every layer computes as its rule says (weights round-to-nearest, activations with
  their own dynamic ranges), so each layer's statistics are of the inputs the
  quantized model feeds it. 'float': every matched layer computes in float, so each
  layer's statistics are of the float model's activations (the one-pass calibration
  of the GPTQ, AWQ and SmoothQuant papers; each layer's error is then measured
  against the float model's own inputs).
  """
  if forward not in FORWARDS:
    raise ValueError(f"forward={forward!r} is not allowed; choose one of {list(FORWARDS)}")
  float_forward = forward == "float"
  ptq_names = () if not any(r.ptq for r in transform.config_of(qmodel).rules) else (
      (PTQ_STATS, obs.ptq_stats(methods=PTQ_METHODS)),)
  observers = ptq_names + tuple(observers)
  view = transform.with_observers(  # no mask
      qmodel, ((CALIBRATION, obs.calibration_range()),) + observers,
      float_forward=float_forward)
  variables = _plain(variables)
  names = [CALIBRATION] + [name for name, _ in observers]
  stats = _drop(variables.pop(state.QUANT_STATS, {}), names)

  observer_list = ((CALIBRATION, obs.calibration_range()),) + observers

  @jax.jit
  def step(others, stats, mask, *batch):  # parameters are arguments: no constant folding
    run = view if mask is None else transform.with_observers(qmodel, observer_list, mask,
                                                             float_forward)
    _, upd = run.apply({**others, state.QUANT_STATS: stats}, *batch,
                       mutable=[state.QUANT_STATS], rngs=rngs)
    return upd[state.QUANT_STATS]

  mask_iter = None if masks is None else iter(masks)
  n = 0
  for batch in batches:
    batch = batch if isinstance(batch, tuple) else (batch,)
    mask = None
    if mask_iter is not None:
      mask = next(mask_iter, None)
      if mask is None:
        raise ValueError(f"calibrate: masks has {n} entries but batches has more; give "
                         "one mask per batch")
      mask = jnp.asarray(mask).astype(bool)
    stats = step(variables, stats, mask, *batch)
    n += 1
  if n == 0:
    raise ValueError("calibrate needs at least one batch; got an empty iterable")
  if mask_iter is not None and next(mask_iter, None) is not None:
    raise ValueError(f"calibrate: masks has more entries than the {n} batches; give one "
                     "mask per batch")
  stats = _plain(jax.device_get(stats))
  for path, node in _layers(stats):
    xtx = node.get(state.observer_key(PTQ_STATS, "xtx"))
    if xtx is not None and not np.all(np.isfinite(xtx)):
      raise ValueError(f"calibration input of layer {path!r} holds NaN/Inf values (its PTQ "
                       "statistics are not finite); clean the calibration batches")
    calib = state.observer_state(CALIBRATION, node)
    if "hi" not in calib:
      continue
    for k in calib:
      del node[state.observer_key(CALIBRATION, k)]
    bad = int(calib["nonfinite"])
    if bad:
      raise ValueError(f"calibration input of layer {path!r} holds {bad} NaN/Inf values; "
                       "clean the calibration batches")
    state.set_static_range(node, calib["lo"], calib["hi"], calib["count"])
  return {**variables, state.QUANT_STATS: stats}


def _drop(tree, names):
  """'quant_stats' without static ranges and earlier states of the named observers."""
  if not isinstance(tree, dict):
    return tree
  return {k: _drop(v, names) for k, v in tree.items()
          if k not in state.STATIC_RANGE and not state.is_observer_key(k, names)}


def convert(qmodel, variables, *example_args, **example_kwargs):
  """QAT model + variables → (serving model, serving variables).

  Every weight a rule quantizes becomes a `QTensor` in 'params' (see the module
  docstring); an `nn.Embed` table becomes one too (per-row scales, `embedding` kept as
  its name), from which serving gathers and dequantizes only the rows it looks up. The kernels' layouts come from 'quant_stats' (`qmodel.init` and
  `jq.calibrate` record them); for variables made without them (e.g. a float model's
  'params'), pass example inputs to trace the model once. The serving model is `qmodel`
  itself: a layer whose kernel is a QTensor computes on its codes, with the same
  contraction code as the QAT forward (identical codes and integer sums; in mode='int'
  the float epilogue may differ by ≤ 1 ulp where XLA fuses a bias add into an FMA).
  That bound is per layer. Downstream of it, a dynamic int8 activation code can flip,
  so deep models are close but not bit-identical: on all-MiniLM-L6-v2 W8A8 (per-token
  activations, int8 word embedding) none of 700 sentence embeddings is bit-identical,
  the cosine between QAT forward and serving is 0.99989 on average (0.9974 at worst),
  and both are equally close to float (`python -m experiments.pretrained.serving_gap`).
  """
  config = transform.config_of(qmodel)
  variables = _plain(variables)
  if example_args or example_kwargs:  # one concrete trace records the layouts
    _, upd = qmodel.apply(variables, *example_args, rngs={state.RNG: jax.random.key(0)},
                          mutable=[state.QUANT_STATS], **example_kwargs)
    for path, node in _layers(upd[state.QUANT_STATS]):
      if state.KERNEL_AXES in node:
        target = variables.setdefault(state.QUANT_STATS, {})
        for part in path.split("/"):
          target = target.setdefault(part, {})
        target.setdefault(state.KERNEL_AXES, node[state.KERNEL_AXES])
  layers = [(p, n) for p, n in _layers(variables.get(state.QUANT_STATS, {}))
            if state.KERNEL_AXES in n]
  if not layers and any(r.weight is not None for r in config.rules):
    raise ValueError("convert finds no kernel layouts in 'quant_stats': pass variables "
                     "from qmodel.init / jq.calibrate, or example inputs: "
                     "jq.convert(qmodel, variables, x)")
  params, quant = variables["params"], variables.get(state.QUANT, {})
  todo, kernels, learned, names = [], [], [], []
  for path, node in layers:
    rule = config.rule_for(path)
    if (rule is not None and rule.act is not None and rule.act.static
        and state.static_range(node) is None):
      raise ValueError(f"layer {path!r}: act spec has static=True but no calibrated range; "
                       "run jq.calibrate(qmodel, variables, batches) before jq.convert")
    spec = None if rule is None else rule.weight
    name = _weight_name(_node(params, path))
    kernel = _node(params, path)[name]
    if spec is None or isinstance(kernel, QTensor):  # float layer, or already converted
      continue
    learned.append(_node(quant, path).pop(state.learned_key(state.WEIGHT, spec.learned))
                   if spec.learned else None)
    if spec.rounding == "stochastic":
      # Serving weights are fixed: store the nearest codes (the expected value of the
      # stochastic ones), not one random draw.
      spec = dataclasses.replace(spec, rounding="nearest")
    w_layout = _recorded_layout(path, node[state.KERNEL_AXES])
    if rule.ptq is not None:
      _run_ptq(path, node, _node(params, path), spec, rule.ptq, w_layout,
               weight_only=rule.act is None)
      continue
    todo.append((path, spec, w_layout, name == "kernel" and rule.act is None))
    kernels.append(kernel)
    names.append(name)
  for (path, *_), name, q in zip(todo, names, _quantize_weights(tuple(todo), kernels, learned)):
    _node(params, path)[name] = q
  return qmodel, variables


def _weight_name(layer_params) -> str:
  """The layer's weight: 'kernel' (Dense, Conv, Einsum), or 'embedding' (nn.Embed)."""
  return "kernel" if "kernel" in layer_params else "embedding"


def _run_ptq(path, stats_node, layer_params, spec, ptq, w_layout, weight_only: bool):
  """The rule's PTQ algorithm on one layer (`jaxquant.ptq.layer`); its input scale and,
  for SmoothQuant, the static range of the scaled input go to 'quant_stats'."""
  stats = state.observer_state(PTQ_STATS, stats_node)
  if not stats:
    raise ValueError(f"layer {path!r}: ptq={ptq.method!r} has no calibration statistics; "
                     "run jq.calibrate(qmodel, variables, batches) before jq.convert")
  result = ptq_layer.quantize_layer(path, layer_params["kernel"], spec, ptq, w_layout, stats)
  weight = layout.decode_layout(result.weight) if weight_only else result.weight
  layer_params["kernel"] = weight.pack()
  if result.input_scale is not None:
    stats_node[state.INPUT_SCALE] = result.input_scale
    if ptq.method == "smoothquant" and state.static_range(stats_node) is not None:
      state.set_static_range(stats_node, *ptq_layer.smoothed_range(stats, result.input_scale))
  for k in stats:
    del stats_node[state.observer_key(PTQ_STATS, k)]  # served their purpose: not serving state


@functools.partial(jax.jit, static_argnums=0)
def _quantize_weights(todo, kernels, learned):
  """Every kernel's packed QTensor, in one compiled program."""
  out = []
  for (_, spec, w_layout, weight_only), k, l in zip(todo, kernels, learned):
    q = quantize_weight(k, spec, w_layout, learned=l)
    out.append((layout.decode_layout(q) if weight_only else q).pack())
  return out


def _recorded_layout(path, kernel_axes) -> layout.WeightLayout:
  try:
    axes = np.asarray(kernel_axes)
  except jax.errors.ConcretizationTypeError:
    raise ValueError("jq.convert reads the recorded kernel layouts as values: call it "
                     "outside jit (it compiles its own work)") from None
  except jax.errors.TracerArrayConversionError:
    raise ValueError("jq.convert reads the recorded kernel layouts as values: call it "
                     "outside jit (it compiles its own work)") from None
  if not np.any(axes > 0):
    raise ValueError(f"'quant_stats/{path}/kernel_axes'={axes.tolist()} names no contracted "
                     "axis: the variables were not made by qmodel.init / jq.calibrate "
                     "(zeros in place of the recorded layout?)")
  return state.layout_from_axes(axes)


@dataclasses.dataclass(frozen=True)
class TensorSize:
  """Bytes of one stored tensor (a layer's kernel, bias, ...): as float and as stored."""
  path: str
  float_bytes: int
  quantized_bytes: int

  @property
  def ratio(self) -> float:
    return self.float_bytes / max(1, self.quantized_bytes)


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-tensor and total bytes: float (as trained) vs as stored for serving.

  A quantized kernel's stored bytes count its codes, scales and zero points (a block
  format's 1-byte block scales and NVFP4's 4-byte tensor scale too), so int8 weights
  come out just under 4x, packed int4 just under 8x and packed binary just under 32x;
  MXFP4 is K·N/2 + K·N/32 bytes.
  """
  tensors: Tuple[TensorSize, ...]

  @property
  def total_float_bytes(self) -> int:
    return sum(t.float_bytes for t in self.tensors)

  @property
  def total_quantized_bytes(self) -> int:
    return sum(t.quantized_bytes for t in self.tensors)

  @property
  def ratio(self) -> float:
    return self.total_float_bytes / max(1, self.total_quantized_bytes)

  def layer(self, path: str) -> TensorSize:
    """The row of one tensor, e.g. report.layer('Dense_0/kernel')."""
    for t in self.tensors:
      if t.path == path:
        return t
    raise KeyError(f"{path!r} not in the report; rows: {[t.path for t in self.tensors]}")

  def __str__(self) -> str:
    w = max([len(t.path) for t in self.tensors] + [6])
    rows = [f"{'tensor':<{w}}  {'float B':>12}  {'stored B':>12}  {'ratio':>7}"]
    for t in self.tensors:
      rows.append(f"{t.path:<{w}}  {t.float_bytes:>12,}  {t.quantized_bytes:>12,}  {t.ratio:>7.2f}")
    rows.append(f"{'total':<{w}}  {self.total_float_bytes:>12,}  "
                f"{self.total_quantized_bytes:>12,}  {self.ratio:>7.2f}")
    return "\n".join(rows)


def _nbytes(x) -> int:
  return int(np.prod(np.shape(x))) * np.dtype(jnp.asarray(x).dtype).itemsize


def size_report(variables) -> SizeReport:
  """Bytes of every tensor in 'params' and of every serving kernel: float vs stored.

  Float bytes are a parameter's own bytes, and a serving kernel's bytes at float32;
  stored bytes are what the variables actually hold. Works on training variables too
  (then stored == float).
  """
  variables = _plain(variables)
  rows = []

  def visit(tree, prefix):
    for k, v in sorted(tree.items()):
      p = f"{prefix}/{k}" if prefix else k
      if isinstance(v, QTensor):  # a serving kernel: codes, scales, zero points
        rows.append(TensorSize(p, int(np.prod(v.shape)) * 4,
                               sum(_nbytes(x) for x in jax.tree.leaves(v))))
      elif isinstance(v, dict):
        visit(v, p)
      else:
        rows.append(TensorSize(p, _nbytes(v), _nbytes(v)))

  visit(variables.get("params", {}), "")
  return SizeReport(tuple(sorted(rows, key=lambda t: t.path)))
