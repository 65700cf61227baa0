"""AWQ: activation-aware per-input-channel weight scaling before weight-only quantization.

Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration" (§3.2-3.3). Weights that meet large activations matter
most; scaling input row j of W up by s_j > 1 before quantizing (and the input down by
s_j) shrinks that row's relative rounding error. For y = x W, W [K, N]:

    y ≈ (x / s) · Q(diag(s) W),        s = s_X^α / sqrt(max(s_X^α) · min(s_X^α))

with s_X = mean |x| per input channel over the calibration data (the paper's "average
magnitude"; the normalization only fixes the overall level, which a per-column or
per-group grid ignores). α is chosen on a grid over [0, 1] to minimize the layer's
output error on the calibration data,

    L(α) = ||X W − (X / s) Q(diag(s) W)||² = tr(Eᵀ XᵀX E),   E = W − diag(1/s) Q(diag(s) W),

which needs only XᵀX (no stored X). α = 0 is s = 1, plain round-to-nearest, so the
chosen L is never above RTN's. Q is the project's quantizer (`jq.quantize` with the
spec, one grid per output column or per group of rows). The paper's reference code
searches 20 points in [0, 1); here `grid + 1` points 0, 1/grid, …, 1.

The 1/s on the input goes into the op before the layer (`jaxquant.ptq.fold`: a
LayerNorm's scale and bias, or the output columns of a preceding Dense) or stays an
explicit per-input-channel scale of the layer. Layers that share one input and so one
fold (q, k, v after one LayerNorm) must share s: pass their kernels concatenated along N.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant import numerics
from jaxquant.quantize import quantize
from jaxquant.ptq.gptq import check_spec
from jaxquant.qtensor import QTensor
from jaxquant.spec import QuantSpec

S_FLOOR = 1e-4  # the reference clamps s_X^α from below: dead channels do not give s = 0


class AWQResult(NamedTuple):
  """AWQ's choice for one [K, N] weight.

  Attributes:
    scale: s [K]; W's rows are multiplied by s, the layer's input divided by s.
    alpha: the chosen exponent.
    alphas, errors: the searched grid and L(α) at each point (units of the given XᵀX).
    qtensor: Q(diag(s) W) on the spec's grid, layout of `jq.quantize(.., reduce_axes=(0,))`.
    weight: diag(1/s) Q(diag(s) W) [K, N]: the float weight the pair computes with (a
      fake-quant forward can use it in place of W; its rows are not on one grid).
  """
  scale: jax.Array
  alpha: float
  alphas: jax.Array
  errors: jax.Array
  qtensor: QTensor
  weight: jax.Array


def scales_for(act_mean_K, alpha) -> jax.Array:
  """s = s_X^α normalized by sqrt(max · min) over the active channels (mean|x| > 0);
  inactive channels get s = 1 (their rows never meet a nonzero input)."""
  a = jnp.asarray(act_mean_K, jnp.float32)
  active = a > 0
  s = jnp.maximum(jnp.where(active, a, 1.0) ** alpha, S_FLOOR)
  hi = jnp.max(jnp.where(active, s, 0.0))
  lo = jnp.min(jnp.where(active, s, jnp.inf))
  norm = jnp.where(jnp.any(active), jnp.sqrt(hi * lo), 1.0)
  return jnp.where(active, s / norm, 1.0)


def scaled_quantize(w_KxN, s_K, spec: QuantSpec):
  """(Q(diag(s) W), diag(1/s) Q(diag(s) W)): the stored codes and the effective weight."""
  w = jnp.asarray(w_KxN, jnp.float32)
  s = jnp.asarray(s_K, jnp.float32)
  q = quantize(w * s[:, None], spec, reduce_axes=(0,))
  return q, q.dequantize() / s[:, None]


def _layer_error(xtx, w, w_hat):
  e = w - w_hat
  return jnp.sum((xtx @ e) * e)


def awq_search(w_KxN, xtx_KxK, act_mean_K, spec: QuantSpec, *, grid: int = 20,
               clip: bool = False) -> AWQResult:
  """Searches α ∈ {0, 1/grid, …, 1} for the per-input-channel scale s = mean|x|^α that
  minimizes the layer's output error on the calibration data.

  Args:
    w_KxN: the weight (rows = input features; several layers sharing an input:
      concatenated along N).
    xtx_KxK: XᵀX of the layer's calibration inputs (any positive multiple works).
    act_mean_K: mean |x| per input channel (`ptq.stats.mean_abs`).
    spec: the weight quantizer (format 'int', nearest rounding, calibrated grid).
    grid: number of steps in [0, 1].
    clip: then also search each grid entry's clip ratio (`clip_search`) on diag(s) W.
  """
  w = jnp.asarray(w_KxN, jnp.float32)
  xtx = jnp.asarray(xtx_KxK, jnp.float32)
  a = jnp.asarray(act_mean_K, jnp.float32)
  if w.ndim != 2 or xtx.shape != (w.shape[0],) * 2 or a.shape != (w.shape[0],):
    raise ValueError(f"awq_search: need w [K, N], xtx [K, K], act_mean [K]; got "
                     f"{w.shape}, {xtx.shape}, {a.shape}")
  if not isinstance(grid, int) or grid < 1:
    raise ValueError(f"awq_search: grid={grid!r} must be a positive int")
  check_spec(spec, w.shape[0], "awq_search")
  alphas = jnp.linspace(0.0, 1.0, grid + 1)
  errors, best, s, q, w_eff = _search(w, xtx, a, alphas, spec)
  best = int(best)
  if clip:  # diag(s) W sees inputs x / s, whose XᵀX is S⁻¹ XᵀX S⁻¹
    q, w_s, _ = clip_search(w * s[:, None], xtx / s[:, None] / s[None, :], spec)
    w_eff = w_s / s[:, None]
  return AWQResult(s, float(alphas[best]), alphas, errors, q, w_eff)


@functools.partial(jax.jit, static_argnames=("spec",))
def _search(w, xtx, a, alphas, spec):
  """L(α) on the grid, the index of its first minimum (ties go to the smaller α), that
  α's s, and Q(diag(s) W) with diag(1/s) Q(diag(s) W): one compiled program."""
  errors = _errors(w, xtx, a, alphas, spec)
  best = jnp.argmin(errors)
  s = scales_for(a, alphas[best])
  q, w_eff = scaled_quantize(w, s, spec)
  return errors, best, s, q, w_eff


def clip_search(w_KxN, xtx_KxK, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5):
  """AWQ's weight clipping: per grid entry, the clip ratio r ∈ {1, 1 − 1/grid, …} (down
  to 1 − max_shrink, exclusive) minimizing that entry's output error.

  The entry (a column n, or a column's group g of rows) is requantized on its calibrated
  grid shrunk by r (scale·r; an asymmetric zero point is unchanged by the shrink) and
  scored by e_gnᵀ (XᵀX)_gg e_gn, the error of its own rows' inputs (cross-group terms
  ignored, as in the paper's reference code). Returns (QTensor on the chosen grids,
  its dequantization [K, N], chosen r shaped like the scale). 'tensor' grids (one scale
  for all columns) are not searched per entry: ValueError.
  """
  w = jnp.asarray(w_KxN, jnp.float32)
  xtx = jnp.asarray(xtx_KxK, jnp.float32)
  check_spec(spec, w.shape[0], "clip_search")
  if spec.granularity == "tensor":
    raise ValueError("clip_search: granularity='tensor' has one grid for all columns; "
                     "choose 'channel' or 'group'")
  if not isinstance(grid, int) or grid < 1 or not 0.0 < max_shrink < 1.0:
    raise ValueError(f"clip_search: grid={grid!r} must be a positive int and "
                     f"max_shrink={max_shrink!r} in (0, 1)")
  n_ratios = max(1, int(round(max_shrink * grid)))
  ratios = 1.0 - jnp.arange(n_ratios, dtype=jnp.float32) / grid
  codes, scale, zp, best = _clip(w, xtx, ratios, spec)
  q = QTensor(codes.astype(jnp.int8), scale, zp)
  return q, q.dequantize(), best


@functools.partial(jax.jit, static_argnames=("spec",))
def _clip(w, xtx, ratios, spec):
  k, n = w.shape
  scale0, zp = numerics.fit_grid(w, spec, (0,))
  g = scale0.shape[0]  # 1 for 'channel', K / group_size for 'group'
  gs = k // g
  rows = jnp.arange(k) // gs
  h_blocks = jnp.where(rows[:, None] == rows[None, :], xtx, 0.0)  # keep (XᵀX)_gg only
  zp_full = None if zp is None else numerics.expand_to(zp, (k, n))

  def quant(scale):
    codes = numerics.encode(w, scale, zp, spec, None)
    return codes, numerics.decode(codes, numerics.expand_to(scale, (k, n)), zp_full)

  def entry_errors(r):
    e = w - quant(scale0 * r)[1]
    return numerics.block_sum((h_blocks @ e) * e, scale0.shape)  # [G, N]

  errs = jax.lax.map(entry_errors, ratios)  # [R, G, N]
  best = ratios[jnp.argmin(errs, axis=0)]   # first minimum: ties keep the wider grid
  scale = scale0 * best
  return quant(scale)[0], scale, zp, best


@functools.partial(jax.jit, static_argnames=("spec",))
def _errors(w, xtx, a, alphas, spec):
  """L(α) for every α (one compiled map over the grid)."""
  def one(alpha):
    return _layer_error(xtx, w, scaled_quantize(w, scales_for(a, alpha), spec)[1])
  return jax.lax.map(one, alphas)
