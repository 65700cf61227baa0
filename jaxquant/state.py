"""The quantization state contract: every variable key beside 'params' that jaxquant
reads or writes, named once, with the helpers that build and read them.

The transform writes the state, the observers name their fields, `jq.calibrate` turns the
calibration observer's fields into a static range, `jq.convert` reads the layouts and
learned scales and writes PTQ input scales, and the integer-only view reads it all back:
each of them uses the names below, and no key is spelled anywhere else.

Collections (and the PRNG stream of stochastic rounding, `RNG`):
  QUANT ('quant'): learned quantities, trainable: `learned_key(WEIGHT | ACT, 'lsq' |
    'pact')` = 'weight_lsq', 'weight_pact', 'act_lsq', 'act_pact' (LSQ step sizes, PACT
    clip α).
  QUANT_STATS ('quant_stats'): not trainable, one dict per quantized layer holding
    KERNEL_AXES ('kernel_axes'): the kernel's layout, recorded at init so `convert`
      needs no trace (`kernel_axes` / `layout_from_axes`: 0 an output axis, k > 0 the
      k-th contracted axis, k < 0 the −k-th batch axis);
    observer states '<name>_<field>' (`observer_key`): EMA ('ema_lo' / 'ema_hi' /
      'ema_count', the default observer of training), CALIBRATION ('calib_*',
      `jq.calibrate`'s running range), PTQ_STATS ('ptq_*': XᵀX, Σ|x|, max|x|);
    the static activation range ACT_LO / ACT_HI / ACT_COUNT ('act_lo' / 'act_hi' /
      'act_count', from `jq.calibrate`), used instead of the batch's own range;
    INPUT_SCALE ('input_scale'): a PTQ input scale s [K] (AWQ, SmoothQuant) that
      `jq.convert` stores; the layer divides its input by it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from flax.core import meta, unfreeze

from jaxquant import layout as layout_lib

QUANT = "quant"
QUANT_STATS = "quant_stats"
COLLECTIONS = (QUANT, QUANT_STATS)
RNG = "quant"  # the PRNG stream stochastic rounding draws from: rngs={RNG: key}

WEIGHT, ACT = "weight", "act"  # operand prefixes of the learned quantities
KERNEL_AXES = "kernel_axes"
ACT_LO, ACT_HI, ACT_COUNT = "act_lo", "act_hi", "act_count"
STATIC_RANGE = (ACT_LO, ACT_HI, ACT_COUNT)
INPUT_SCALE = "input_scale"

EMA = "ema"            # the training observer (`observers.ema_range`)
CALIBRATION = "calib"  # `jq.calibrate`'s observer (`observers.calibration_range`)
PTQ_STATS = "ptq"      # the PTQ statistics (`observers.ptq_stats`)


def learned_key(operand: str, kind: str) -> str:
  """The 'quant' key of an operand's learned quantity: WEIGHT or ACT, 'lsq' or 'pact'."""
  return f"{operand}_{kind}"


def observer_key(name: str, field: str) -> str:
  """The 'quant_stats' key of an observer state's field: '<name>_<field>'."""
  return f"{name}_{field}"


def prefixed(name: str, state: Mapping[str, Any]) -> Dict[str, Any]:
  """An observer's state as it is stored: {'<name>_<field>': value}."""
  return {observer_key(name, k): v for k, v in state.items()}


def observer_state(name: str, node: Mapping[str, Any]) -> Dict[str, Any]:
  """The fields of observer `name` in a layer's 'quant_stats' dict: {field: value}."""
  prefix = observer_key(name, "")
  return {k[len(prefix):]: v for k, v in node.items() if k.startswith(prefix)}


def is_observer_key(key: str, names: Iterable[str]) -> bool:
  """Whether `key` is a field of one of the named observers."""
  return any(key.startswith(observer_key(n, "")) for n in names)


def is_layer_stats(node: Mapping[str, Any]) -> bool:
  """Whether a 'quant_stats' dict is a quantized layer's: it holds a recorded layout, a
  static range, or the calibration observer's range or PTQ statistics."""
  keys = (KERNEL_AXES, ACT_HI, observer_key(CALIBRATION, "hi"), observer_key(PTQ_STATS, "xtx"))
  return any(k in node for k in keys)


def mutable_copy(variables) -> Dict[str, Any]:
  """Variables as nested plain dicts (unboxed, unfrozen) that can be edited in place; the
  arrays are shared, not copied."""
  def copy(node):
    return {k: copy(v) for k, v in node.items()} if isinstance(node, dict) else node
  return copy(unfreeze(meta.unbox(variables)))


def layer_dicts(tree: Mapping[str, Any], prefix: str = ""):
  """(path, dict) for every quantized layer's dict in a collection (`is_layer_stats`),
  paths '/'-joined, in sorted order. A model that is itself one layer (e.g.
  `quantize_model(nn.Dense(10), rules)`) keeps its state at the root: path ''."""
  if not prefix and is_layer_stats(tree):
    yield "", tree
  for k, v in sorted(tree.items()):
    if isinstance(v, dict):
      p = f"{prefix}/{k}" if prefix else k
      if is_layer_stats(v):
        yield p, v
      yield from layer_dicts(v, p)


def node_at(tree: Mapping[str, Any], path: str):
  """The entry of a nested dict at a '/'-joined path ('' is the root)."""
  for part in (path.split("/") if path else ()):
    tree = tree[part]
  return tree


def static_range(node: Mapping[str, Any]) -> Optional[Tuple[Any, Any]]:
  """A layer's static activation range (lo, hi), or None when it has none."""
  if ACT_HI not in node:
    return None
  return node[ACT_LO], node[ACT_HI]


def set_static_range(node: Dict[str, Any], lo, hi, count=None) -> None:
  """Stores a static activation range (and its batch count) in a layer's dict."""
  node[ACT_LO], node[ACT_HI] = lo, hi
  if count is not None:
    node[ACT_COUNT] = count


def kernel_axes(w_layout: layout_lib.WeightLayout) -> np.ndarray:
  """The recorded form of a kernel layout: per axis 0 (output), k > 0 (the k-th
  contracted axis) or k < 0 (the −k-th batch axis), int32."""
  axes = np.zeros(w_layout.ndim, np.int32)
  axes[list(w_layout.contracting)] = np.arange(1, len(w_layout.contracting) + 1)
  axes[list(w_layout.batch)] = -np.arange(1, len(w_layout.batch) + 1)
  return axes


def layout_from_axes(axes) -> layout_lib.WeightLayout:
  """The `WeightLayout` recorded as `kernel_axes`."""
  axes = [int(a) for a in np.asarray(axes)]
  contracting = tuple(sorted((i for i, a in enumerate(axes) if a > 0), key=lambda i: axes[i]))
  batch = tuple(sorted((i for i, a in enumerate(axes) if a < 0), key=lambda i: -axes[i]))
  return layout_lib.make_layout(len(axes), contracting, batch)
