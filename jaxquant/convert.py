"""PTQ calibration, conversion of QAT variables to serving variables, and size reports.

Serving variables hold no float copy of a quantized weight. For each quantized layer the
'params' entry 'kernel' is removed and the 'serving' collection holds, at the same path,
  kernel: {'values': int8 codes (5–8-bit int) or float8 values (fp8),
           or 'packed': uint8 (4 codes per byte for 2-bit/ternary, 2 for 3–4-bit, 8 for
           binary), 'scale': float32, 'zero_point': int32 (asymmetric only),
           'shape': int32 kernel shape}
Everything else ('params' biases and norms, 'quant', 'quant_stats') is kept. Weights
trained with stochastic rounding are stored with nearest rounding (a fixed model).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta, unfreeze

from jaxquant import transform
from jaxquant.fake_quant import quantize
from jaxquant.qtensor import QTensor, pack


def _get(tree, path: str):
  node = tree
  for part in path.split("/") if path else []:
    node = node[part]
  return node


def _set(tree, path: str, value):
  parts = path.split("/") if path else []
  node = tree
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = value


def _plain(variables) -> Dict[str, Any]:
  return jax.tree.map(lambda x: x, unfreeze(meta.unbox(variables)))


def _ensure_traced(qmodel, variables, example_args, example_kwargs):
  plan = transform.plan_of(qmodel)
  if example_args or example_kwargs:
    jax.eval_shape(lambda v: qmodel.apply(v, *example_args, rngs={"quant": jax.random.key(0)},
                                          **example_kwargs), variables)
  if not plan.layers and plan.rules:
    raise ValueError("convert needs the layer table that tracing fills in: call "
                     "qmodel.init / qmodel.apply once, or pass example inputs: "
                     "jq.convert(qmodel, variables, x)")
  return plan


def calibrate(qmodel, variables, batches: Iterable, *, rngs=None):
  """Post-training calibration of static activation ranges.

  Runs `qmodel` on every batch (each a positional input, or a tuple of them) and returns
  `variables` with, for every quantized layer with an activation spec, the range
  'act_lo'/'act_hi' in 'quant_stats': the max over batches for absmax calibration, the
  mean of per-batch clip ranges for percentile / MSE. Calibrated layers then quantize
  activations with that fixed range (per tensor) instead of the batch's own.
  """
  view = transform.with_phase(qmodel, "calibrate")
  variables = _plain(variables)
  stats = {k: v for k, v in variables.items() if k == "quant_stats"}
  # Forget earlier calibration so the statistics start fresh.
  stats = jax.tree.map(lambda x: x, stats)
  others = {k: v for k, v in variables.items() if k != "quant_stats"}
  qs = _drop_static(stats.get("quant_stats", {}))

  @jax.jit
  def step(qs, *batch):
    _, upd = view.apply({**others, "quant_stats": qs}, *batch, mutable=["quant_stats"],
                        rngs=rngs)
    return upd["quant_stats"]

  n = 0
  for batch in batches:
    batch = batch if isinstance(batch, tuple) else (batch,)
    qs = step(qs, *batch)
    n += 1
  if n == 0:
    raise ValueError("calibrate needs at least one batch")
  return {**others, "quant_stats": qs}


def _drop_static(qs):
  if not isinstance(qs, dict):
    return qs
  return {k: _drop_static(v) for k, v in qs.items() if k not in ("act_lo", "act_hi", "act_count")}


def convert(qmodel, variables, *example_args, **example_kwargs):
  """QAT model + variables → (serving model, serving variables).

  Every weight a rule quantizes is stored as codes + scales (see the module docstring);
  the serving model computes on them directly and its forward equals the QAT forward
  (same codes, scales and integer sums; in mode='int' the outputs are identical
  up to how XLA fuses the float epilogue, e.g. a bias add folded into an FMA: ≤ 1 ulp). The layer table comes from an earlier `init`/`apply` of
  `qmodel`, or from tracing `example_args` here.
  """
  plan = _ensure_traced(qmodel, variables, example_args, example_kwargs)
  variables = _plain(variables)
  params = variables["params"]
  serving: Dict[str, Any] = {}
  quant = variables.get("quant", {})
  for path, info in sorted(plan.layers.items()):
    spec = plan.rules[info.rule_index].weight
    if spec is None:
      continue
    layer_params = _get(params, path)
    kernel = layer_params.pop("kernel")
    learned = None
    if spec.ste in ("lsq", "pact"):
      learned = _get(quant, path).get(f"weight_{spec.ste}")
    if spec.rounding == "stochastic":
      # Serving weights are fixed: store the nearest codes (the expected value of the
      # stochastic ones), not one random draw.
      spec = dataclasses.replace(spec, rounding="nearest")
    q = _quantize_kernel(kernel, spec, info.weight_reduce_axes, learned)
    entry = {"scale": q.scale, "shape": jnp.asarray(kernel.shape, jnp.int32)}
    bits = transform._storage_bits(spec)
    if bits < 8:
      entry["packed"] = pack(q.values, bits)
    else:
      entry["values"] = q.values
    if q.zero_point is not None:
      entry["zero_point"] = q.zero_point
    _set(serving, path, {"kernel": entry})
  out = dict(variables)
  out["params"] = params
  out["serving"] = serving
  return transform.with_phase(qmodel, "serve"), out


def _quantize_kernel(kernel, spec, reduce_axes, learned) -> QTensor:
  """The kernel's QTensor exactly as the QAT forward quantizes it.

  Group scales over several contracting axes (nn.Einsum 'hd,hdf', DenseGeneral
  axis=(-2, -1)): QAT groups the flattened contraction (dot.py's [K, N] view, contracting
  axes in dimension-number order), so quantize that view and fold it back; the scale
  keeps the QTensor layout (per axis: 1, the axis length, or its number of groups).
  """
  if spec.granularity != "group" or len(reduce_axes) == 1:
    return quantize(kernel, spec, reduce_axes=reduce_axes, learned=learned)
  perm = tuple(reduce_axes) + tuple(a for a in range(kernel.ndim) if a not in reduce_axes)
  inverse = tuple(int(a) for a in np.argsort(perm))
  k_first = jnp.transpose(kernel, perm)
  sizes, rest = k_first.shape[:len(reduce_axes)], k_first.shape[len(reduce_axes):]
  scale_sizes, left = [], spec.group_size  # a group spans the innermost axes first
  for size in reversed(sizes):
    if left % size == 0:
      scale_sizes.append(1)
      left //= size
    elif size % left == 0:
      scale_sizes.append(size // left)
      left = 1
    else:
      raise ValueError(f"group_size={spec.group_size} splits the contracting axes "
                       f"{tuple(reduce_axes)} (sizes {tuple(sizes)}) across axis boundaries; "
                       "choose a group size that divides the innermost one or is a "
                       "multiple of it")
  q = quantize(k_first.reshape((-1,) + rest), spec, reduce_axes=(0,), learned=learned)
  fold = lambda s: jnp.transpose(s.reshape(tuple(reversed(scale_sizes)) + rest), inverse)
  return QTensor(jnp.transpose(q.values.reshape(k_first.shape), inverse), fold(q.scale),
                 None if q.zero_point is None else fold(q.zero_point))


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

  A quantized kernel's stored bytes count its codes, scales, zero points and shape
  record, so int8 weights come out just under 4x, packed int4 just under 8x and packed
  binary just under 32x.
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
      if isinstance(v, dict) and "scale" in v and "shape" in v:  # a serving kernel
        rows.append(TensorSize(p, int(np.prod(np.asarray(v["shape"]))) * 4,
                               sum(_nbytes(x) for x in v.values())))
      elif isinstance(v, dict):
        visit(v, p)
      else:
        rows.append(TensorSize(p, _nbytes(v), _nbytes(v)))

  visit(variables.get("params", {}), "")
  visit(variables.get("serving", {}), "")
  return SizeReport(tuple(sorted(rows, key=lambda t: t.path)))
