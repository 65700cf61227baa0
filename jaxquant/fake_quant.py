"""The quantizer every path shares (`quantize_parts`), `fake_quant` and its one VJP.

`jq.quantize` / `jq.dequantize` / `jq.quantize_weight` (array to QTensor and back) are
in `jaxquant.quantize`.

Gradient rules (`QuantSpec.ste`), with y = x/s (+ zero point) the unrounded code:
  identity  dx = g (straight-through estimator, Bengio et al. 2013).
  clipped   dx = g inside the clip range, 0 outside (integer range for 'int'/'fp8';
            |x| ≤ 1 for binary/ternary, the Htanh STE of Hubara et al. 2016; a block
            format's saturation bound max · scale per block).
  lsq       dx = g inside the range; ds = Σ g·(round(y) − y) inside, Σ g·q_min / q_max
            outside, times the gradient scale 1/sqrt(N·Q_P) (Esser et al. 2019, eq. 3 and
            §2.2) with N the number of elements sharing the step size s.
  pact      the input is clipped to [−α, α] (symmetric) or [0, α] (asymmetric, the ReLU
            case); dx = g inside, 0 outside; dα = Σ g over x ≥ α (and −Σ g over x ≤ −α
            when symmetric) (Choi et al. 2018, eq. 3).
The learned quantity (LSQ step size or PACT α) is the explicit `learned` argument, shaped
like the scale; with `learned=None` the scale comes from calibration and gets no gradient.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats, numerics
from jaxquant.qtensor import QTensor
from jaxquant.spec import QuantSpec


class OperandState(NamedTuple):
  """Per-operand quantization state handed to a contraction (a pytree; fields optional).

  learned: the LSQ step size or PACT clip α (a trainable array shaped like the scale).
  range: a static (lo, hi) calibrated range (activations), used instead of the
    operand's own dynamic range.
  """
  learned: Optional[jax.Array] = None
  range: Optional[Tuple[jax.Array, jax.Array]] = None


def operand_states(lhs_state: Optional[OperandState], rhs_state: Optional[OperandState]):
  """The two states of a contraction, None as empty; a weight takes no static range."""
  lhs_state = lhs_state or OperandState()
  rhs_state = rhs_state or OperandState()
  if rhs_state.range is not None:
    raise ValueError("rhs_state.range is not supported: weights are calibrated from "
                     "their own values")
  return lhs_state, rhs_state


class Residuals(NamedTuple):
  """What the quantizer VJP needs from the forward pass."""
  x: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  learned: Optional[jax.Array]


def _learned_grid(x32, spec, learned):
  """(x clipped for PACT, scale, zero point) from the learned quantity."""
  learned = jnp.abs(learned.astype(jnp.float32)) + 1e-12  # stays a positive step / clip
  qmin, qmax = numerics.int_range(spec)
  # Asymmetric grids put 0.0 at q_min: the unsigned range [0, s·(qmax − qmin)] for LSQ,
  # [0, α] for PACT.
  zp = None if spec.symmetric else jnp.full(learned.shape, qmin, jnp.int32)
  if spec.ste == "lsq":
    return x32, learned, zp
  alpha = numerics.expand_to(learned, x32.shape)
  if spec.symmetric:
    return jnp.clip(x32, -alpha, alpha), learned / numerics.symmetric_levels(spec), None
  return jnp.clip(x32, 0.0, alpha), learned / (qmax - qmin), zp


def quantize_parts(x, spec: QuantSpec, axes, key, learned, clip_range=None):
  """(codes, scale, zero_point): codes are float32 integers, or values of the format's
  float dtype (fp8, block formats).

  `clip_range` = (lo, hi), shaped like the scale, replaces calibration with a static
  range (activation ranges from `jaxquant.calibrate`); formats without a clip-range
  scale rule (binary, ternary, the block formats) ignore it.
  """
  x32 = x.astype(jnp.float32)
  if learned is not None and spec.ste in ("lsq", "pact"):
    x32, scale, zp = _learned_grid(x32, spec, learned)
  elif clip_range is not None and formats.get(spec.format).clip_range:
    lo, hi = (jnp.asarray(r, jnp.float32) for r in clip_range)
    if spec.symmetric:
      hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale, zp = numerics.scale_zero_point(jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0), spec)
  else:
    scale, zp = numerics.fit_grid(x32, spec, axes)
  return numerics.encode(x32, scale, zp, spec, key, axes), scale, zp


def quantizer_vjp(spec: QuantSpec, res: Residuals, g):
  """Cotangents (dx, dlearned) of the quantizer given the cotangent `g` of its output."""
  x32 = res.x.astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  scale = numerics.expand_to(res.scale, x32.shape)
  dlearned = None
  if spec.ste == "identity":
    dx = g32
  elif spec.ste == "pact" and res.learned is not None:
    alpha = numerics.expand_to(jnp.abs(res.learned.astype(jnp.float32)) + 1e-12, x32.shape)
    lo = -alpha if spec.symmetric else jnp.zeros_like(alpha)
    dx = jnp.where((x32 > lo) & (x32 < alpha), g32, 0.0)
    da = jnp.where(x32 >= alpha, g32, 0.0)
    if spec.symmetric:
      da = da - jnp.where(x32 <= -alpha, g32, 0.0)
    dlearned = _sum_to_learned(da, res.learned)
  else:  # clipped; lsq (and pact without a learned α) clip the input gradient as well
    inside = _inside(x32, scale, res.zero_point, spec)
    dx = jnp.where(inside, g32, 0.0)
    if spec.ste == "lsq" and res.learned is not None:
      lo, hi = numerics.lsq_range(spec)  # −Q_N, Q_P of the paper
      # NaN has the code of 0.0, so it adds round(0) − 0 = 0 (not NaN) to the step's gradient.
      y = numerics.divide_by_scale(jnp.where(jnp.isnan(x32), 0.0, x32), scale)
      dy = jnp.where(y <= lo, float(lo), jnp.where(y >= hi, float(hi), jnp.round(y) - y))
      n = numerics.elements_per_scale(x32.shape, res.learned.shape)
      grad_scale = 1.0 / np.sqrt(max(n, 1) * hi) if spec.lsq_grad_scale else 1.0
      ds = _sum_to_learned(g32 * dy, res.learned) * grad_scale
      dlearned = ds * jnp.sign(res.learned)  # d|s|/ds
  dx = jnp.where(jnp.isnan(x32), g32, dx)
  return dx.astype(res.x.dtype), dlearned


def _sum_to_learned(t, learned):
  return numerics.block_sum(t, learned.shape).astype(learned.dtype)


def _inside(x32, scale, zp, spec):
  """The format's clip mask (`Format.inside`)."""
  return formats.get(spec.format).inside(x32, scale, zp, spec)


def forward(x, spec: QuantSpec, axes, key, learned, clip_range=None):
  """(dequantized x in x.dtype with NaN kept, QTensor, Residuals)."""
  return from_parts(x, quantize_parts(x, spec, axes, key, learned, clip_range), learned)


def from_parts(x, parts, learned):
  """`forward`'s outputs from already computed (codes, scale, zero point) of `x`."""
  codes, scale, zp = parts
  q = QTensor(codes, scale, zp)
  deq = q.dequantize(x.dtype)
  deq = jnp.where(jnp.isnan(x), x, deq)
  return deq, q, Residuals(x, scale, zp, learned)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fake_quant(spec, axes, x, key, learned):
  return forward(x, spec, axes, key, learned)[0]


def _fake_quant_fwd(spec, axes, x, key, learned):
  deq, _, res = forward(x, spec, axes, key, learned)
  return deq, res


def _fake_quant_bwd(spec, axes, res, g):
  dx, dlearned = quantizer_vjp(spec, res, g)
  return dx, None, dlearned


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, spec: QuantSpec, *, reduce_axes: Sequence[int],
               key: Optional[jax.Array] = None, learned: Optional[jax.Array] = None) -> jax.Array:
  """Quantize-dequantize `x` (same shape and dtype) with the gradient rule `spec.ste`.

  `learned` is the LSQ step size or PACT clip α (shaped like the scale: reduced axes of
  length 1, or the number of groups); it receives a gradient. NaN inputs stay NaN.
  """
  axes = numerics.normalize_axes(reduce_axes, x.ndim)
  return _fake_quant(spec, axes, x, key, learned)
