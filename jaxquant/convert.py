"""`convert`: QAT variables to serving variables.

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

import jax
import numpy as np

from jaxquant import layout
from jaxquant import nnx_functional
from jaxquant import nnx_transform
from jaxquant import state
from jaxquant import transform
from jaxquant.ptq import layer as ptq_layer
from jaxquant.qtensor import QTensor
from jaxquant.quantize import quantize_weight


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

  An NNX model takes its `nnx.State` and gives a new NNX model holding the serving
  state (the QAT model is not modified) and that state.

  Layers holding a weight that no rule matched stay float; they are listed in one
  `jq.FloatLayersWarning` (as at `init`). `**example_kwargs` are the model's own
  keyword arguments (e.g. `train=False`), passed to that trace as Python values.
  """
  nnx_model = qmodel
  qmodel, variables, finish = nnx_functional.as_functional(qmodel, variables)
  config = transform.config_of(qmodel)
  variables = state.mutable_copy(variables)
  if example_args or example_kwargs:  # one trace records the layouts
    upd = _layout_trace(qmodel, variables, example_args, example_kwargs)
    for path, node in state.layer_dicts(upd[state.QUANT_STATS]):
      if state.KERNEL_AXES in node:
        target = variables.setdefault(state.QUANT_STATS, {})
        for part in (path.split("/") if path else ()):
          target = target.setdefault(part, {})
        target.setdefault(state.KERNEL_AXES, node[state.KERNEL_AXES])
  layers = [(p, n) for p, n in state.layer_dicts(variables.get(state.QUANT_STATS, {}))
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
    name = _weight_name(state.node_at(params, path))
    kernel = state.node_at(params, path)[name]
    if spec is None or isinstance(kernel, QTensor):  # float layer, or already converted
      continue
    learned.append(state.node_at(quant, path).pop(state.learned_key(state.WEIGHT, spec.learned))
                   if spec.learned else None)
    if spec.rounding == "stochastic":
      # Serving weights are fixed: store the nearest codes (the expected value of the
      # stochastic ones), not one random draw.
      spec = dataclasses.replace(spec, rounding="nearest")
    w_layout = _recorded_layout(path, node[state.KERNEL_AXES])
    if rule.ptq is not None:
      _run_ptq(path, node, state.node_at(params, path), spec, rule.ptq, w_layout,
               weight_only=rule.act is None)
      continue
    todo.append((path, spec, w_layout, name == "kernel" and rule.act is None))
    kernels.append(kernel)
    names.append(name)
  for (path, *_), name, q in zip(todo, names, _quantize_weights(tuple(todo), kernels, learned)):
    state.node_at(params, path)[name] = q
  transform.warn_float_layers([p for p in transform.weight_layers(params)
                               if config.match(p) is None], "convert")
  if nnx_functional.is_nnx(qmodel):  # a new NNX model holding the serving state
    serving = nnx_transform.eval_mode(nnx_functional.with_variables(nnx_model, variables))
    return serving, finish(variables)
  return qmodel, variables


def _weight_name(layer_params) -> str:
  """The layer's weight: 'kernel' (Dense, Conv, Einsum), or 'embedding' (nn.Embed)."""
  return "kernel" if "kernel" in layer_params else "embedding"


def _run_ptq(path, stats_node, layer_params, spec, ptq, w_layout, weight_only: bool):
  """The rule's PTQ algorithm on one layer (`jaxquant.ptq.layer`); its input scale and,
  for SmoothQuant, the static range of the scaled input go to 'quant_stats'."""
  stats = state.observer_state(state.PTQ_STATS, stats_node)
  if not stats:
    raise ValueError(f"layer {path!r}: ptq={ptq.method!r} has no calibration statistics; "
                     "run jq.calibrate(qmodel, variables, batches) before jq.convert")
  result = ptq_layer.quantize_layer(path, layer_params["kernel"], spec, ptq, w_layout, stats)
  layer_params["kernel"] = _serving_weight(result.weight, weight_only)
  if result.input_scale is not None:
    stats_node[state.INPUT_SCALE] = result.input_scale
    if ptq.method == "smoothquant" and state.static_range(stats_node) is not None:
      state.set_static_range(stats_node, *ptq_layer.smoothed_range(stats, result.input_scale))
  for k in stats:
    del stats_node[state.observer_key(state.PTQ_STATS, k)]  # served their purpose: not serving state


def _stored(q: QTensor, weight_only: bool) -> QTensor:
  """A quantized kernel as serving stores it: packed, weight-only layers in
  `decode_layout`."""
  return (layout.decode_layout(q) if weight_only else q).pack()


_serving_weight = jax.jit(_stored, static_argnums=1)  # a PTQ result, one compile per shape


def _layout_trace(qmodel, variables, example_args, example_kwargs):
  """The 'quant_stats' that one forward of `qmodel` on the example inputs writes, from a
  jitted call (one compile; an eager call compiles every op of the model on its own).
  The array arguments are traced; any other positional argument and every keyword
  argument (e.g. `train=False`) reaches the model as the Python value it is."""
  arrays = [i for i, a in enumerate(example_args) if isinstance(a, (jax.Array, np.ndarray))]

  def forward(variables, *traced):
    args = list(example_args)
    for i, a in zip(arrays, traced):
      args[i] = a
    _, upd = qmodel.apply(variables, *args, rngs={state.RNG: jax.random.key(0)},
                          mutable=[state.QUANT_STATS], **example_kwargs)
    return upd

  return jax.jit(forward)(variables, *[example_args[i] for i in arrays])


@functools.partial(jax.jit, static_argnums=0)
def _quantize_weights(todo, kernels, learned):
  """Every kernel's packed QTensor, in one compiled program."""
  out = []
  for (_, spec, w_layout, weight_only), k, l in zip(todo, kernels, learned):
    q = quantize_weight(k, spec, w_layout, learned=l)
    out.append(_stored(q, weight_only))
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
