"""One layer's post-training quantization, in the weight's own layout: what `jq.convert`
runs for a rule with `ptq=jq.PTQ(...)`.

The weight is viewed as [K, N] (`jaxquant.layout`: contracted axes flattened in order,
output axes flattened), the algorithm runs on that matrix with the layer's calibration
statistics (`observers.ptq_stats`), and its codes and scales are folded back into the
kernel's layout, so the serving contraction reads them as it reads any stored weight.

  gptq         codes on GPTQ's own grid (group scales chosen as the rows are reached):
               stored as they are, never recalibrated.
  awq          Q(diag(s) W) with the searched s; the layer divides its input by s.
  smoothquant  Q(diag(s) W) with s = max|x|^α / max|w|^(1−α); the layer divides its input
               by s, and a static activation range becomes that of x / s.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import layout
from jaxquant.ptq import awq, gptq, smoothquant
from jaxquant.ptq import stats as ptq_stats
from jaxquant.qtensor import QTensor
from jaxquant.spec import PTQ, QuantSpec


class LayerResult(NamedTuple):
  """The stored weight, and (AWQ / SmoothQuant) the divisor of the layer's input [K]."""
  weight: QTensor
  input_scale: Optional[jax.Array]


def _fold(q_KN: QTensor, shape, w_layout: layout.WeightLayout, spec: QuantSpec) -> QTensor:
  """A [K, N] QTensor (scale [G|1, N]) → the kernel's layout."""
  permuted = tuple(shape[a] for a in w_layout.perm)
  inverse = tuple(int(a) for a in np.argsort(w_layout.perm))
  values = jnp.transpose(q_KN.values.reshape(permuted), inverse).astype(jnp.int8)
  fold = lambda t: None if t is None else layout.fold_scale(t[None], shape, w_layout, spec)
  return QTensor(values, fold(q_KN.scale), fold(q_KN.zero_point), spec=spec,
                 logical_shape=tuple(shape), contracting=w_layout.contracting,
                 batch=w_layout.batch)


def quantize_layer(path: str, kernel, spec: QuantSpec, ptq: PTQ,
                   w_layout: layout.WeightLayout, stats: Dict[str, jax.Array]) -> LayerResult:
  """Runs `ptq` on one kernel; `stats` holds the layer's `ptq_stats` fields."""
  if w_layout.batch:
    raise ValueError(f"layer {path!r}: ptq={ptq.method!r} needs a weight without batch axes")
  st = ptq_stats.Stats(**{k: jnp.asarray(v) for k, v in stats.items()})
  if int(st.count) == 0:
    raise ValueError(f"layer {path!r}: ptq={ptq.method!r} has no calibration statistics; "
                     "run jq.calibrate on some batches first")
  w_KN, finite, h_or_mean = _inputs(kernel, st, w_layout, ptq.method)
  if st.xtx.shape[0] != w_KN.shape[0]:  # e.g. a convolution: statistics per input channel
    raise ValueError(f"layer {path!r}: ptq={ptq.method!r} needs statistics of the "
                     f"{w_KN.shape[0]} contracted input features, but the layer's input "
                     f"rows have {st.xtx.shape[0]} (a convolution's patches are not "
                     "collected); use it on Dense / Einsum layers")
  if not bool(finite):
    raise ValueError(f"layer {path!r}: calibration statistics hold NaN/Inf")
  if spec.granularity == "group" and w_KN.shape[0] % spec.group_size:
    raise ValueError(f"layer {path!r}: group_size={spec.group_size} does not divide the "
                     f"layer's {w_KN.shape[0]} input features")
  s = None
  if ptq.method == "gptq":
    q = gptq.gptq(w_KN, h_or_mean, spec, percdamp=ptq.percdamp,
                  act_order=ptq.act_order).qtensor
  elif ptq.method == "awq":
    res = awq.awq_search(w_KN, st.xtx, h_or_mean, spec, grid=ptq.grid)
    q, s = res.qtensor, res.scale
  elif ptq.method == "smoothquant":
    smoothquant.check_alpha(ptq.alpha)
    q, s = _smoothquant(st.abs_max, w_KN, jnp.float32(ptq.alpha), jnp.float32(1.0 - ptq.alpha),
                        spec)
  else:  # a method added to PTQ_METHODS without its branch here
    raise ValueError(f"layer {path!r}: ptq method {ptq.method!r} has no implementation in "
                     "jaxquant/ptq/layer.py (implemented: gptq, awq, smoothquant)")
  return LayerResult(_finish(q, tuple(kernel.shape), w_layout, spec), s)


@functools.partial(jax.jit, static_argnames=("w_layout", "method"))
def _inputs(kernel, st: ptq_stats.Stats, w_layout: layout.WeightLayout, method: str):
  """(W [K, N], whether XᵀX is finite, the method's statistic: H for GPTQ, mean |x| for
  AWQ, None otherwise); count > 0 is checked before."""
  w_KN = layout.canonical(jnp.asarray(kernel, jnp.float32), w_layout)[0]
  stat = {"gptq": ptq_stats.hessian_unchecked,
          "awq": ptq_stats.mean_abs_unchecked}.get(method, lambda _: None)(st)
  return w_KN, jnp.all(jnp.isfinite(st.xtx)), stat


@functools.partial(jax.jit, static_argnames=("spec",))
def _smoothquant(abs_max_K, w_KN, alpha, beta, spec: QuantSpec):
  """(Q(diag(s) W), s) with SmoothQuant's s; α and β = 1 − α (taken in Python) traced."""
  s = smoothquant.scales_with_exponents(abs_max_K, w_KN, alpha, beta)
  return awq.scaled_quantize(w_KN, s, spec)[0], s


@functools.partial(jax.jit, static_argnames=("shape", "w_layout", "spec"))
def _finish(q: QTensor, shape, w_layout: layout.WeightLayout, spec: QuantSpec) -> QTensor:
  """The method's [K, N] QTensor, its scales broadcast to [G|1, N], in the kernel's layout."""
  n = q.values.shape[1]
  q = QTensor(q.values, jnp.broadcast_to(q.scale, (q.scale.shape[0], n)) if
              spec.granularity != "tensor" else q.scale.reshape(1, 1),
              None if q.zero_point is None else (
                  jnp.broadcast_to(q.zero_point, (q.zero_point.shape[0], n))
                  if spec.granularity != "tensor" else q.zero_point.reshape(1, 1)))
  return _fold(q, shape, w_layout, spec)


def smoothed_range(stats: Dict[str, jax.Array], s_K):
  """The symmetric static range of x / s from the per-channel max|x|."""
  hi = jnp.max(jnp.asarray(stats["abs_max"], jnp.float32) / s_K)
  return -hi, hi
