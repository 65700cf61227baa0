"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han 2022, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models" (§4, eq. 4). A few input channels
of X carry values far larger than the rest, so one activation scale per tensor (or per
token) wastes its levels on them; weights are easy to quantize. Per input channel j:

    s_j = max|X_j|^α / max|W_j|^(1−α),      X' = X diag(s)⁻¹,   W' = diag(s) W,

so X' W' = X W exactly, and with α = 0.5 (the paper's default for most models) both
max|X'_j| and max|W'_j| become sqrt(max|X_j| · max|W_j|). α ∈ [0, 1] is the migration
strength (larger moves more of the range into the weights). max|X_j| comes from the
calibration data (`ptq.stats`: abs_max), max|W_j| is over the output columns of row j.

Channels with max|X_j| = 0 or max|W_j| = 0 get s_j = 1: the reference clamps both maxima
to 1e-5 instead, which would make a never-seen channel's input scale 10⁵ (any value
there at serving time would blow up). The 1/s goes into the previous op (see
`jaxquant.ptq.fold`) or stays an explicit input scale. Layers sharing one input (q, k, v)
share s: pass their kernels concatenated along N.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_alpha(alpha) -> None:
  """ValueError unless `alpha` is a Python number in [0, 1]."""
  if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha={alpha!r} must be a float in [0, 1] (the migration strength)")


def smoothquant_scales(act_absmax_K, w_KxN, alpha: float = 0.5) -> jax.Array:
  """Per-input-channel smoothing factors s [K] (eq. 4)."""
  a = jnp.asarray(act_absmax_K, jnp.float32)
  w = jnp.asarray(w_KxN, jnp.float32)
  if w.ndim != 2 or a.shape != (w.shape[0],):
    raise ValueError(f"smoothquant_scales: need act_absmax [K] and w [K, N]; got "
                     f"{a.shape} and {w.shape}")
  check_alpha(alpha)
  return scales_with_exponents(a, w, alpha, 1.0 - alpha)


def scales_with_exponents(act_absmax_K, w_KxN, alpha, beta) -> jax.Array:
  """max|X_j|^α / max|W_j|^β (s = 1 where either is 0 or not finite), for jitted callers:
  pass α and β = 1 − α (taken in Python) as arrays, so that the compiler sees no constant
  power to rewrite: the result equals the eager computation's bit for bit."""
  a = jnp.asarray(act_absmax_K, jnp.float32)
  w = jnp.asarray(w_KxN, jnp.float32)
  w_max = jnp.max(jnp.abs(w), axis=1)
  ok = (a > 0) & (w_max > 0) & jnp.isfinite(a) & jnp.isfinite(w_max)
  # The barrier keeps the compiler from rewriting x / y^β as x · y^(−β) (other rounding).
  s = jnp.where(ok, a, 1.0) ** alpha / jax.lax.optimization_barrier(
      jnp.where(ok, w_max, 1.0) ** beta)
  return jnp.where(ok, s, 1.0)


def smooth(x_absmax_K, w_KxN, s_K):
  """(max|X'| [K], W' [K, N]) after smoothing by s: the ranges the quantizers then see."""
  s = jnp.asarray(s_K, jnp.float32)
  return (jnp.asarray(x_absmax_K, jnp.float32) / s,
          jnp.asarray(w_KxN, jnp.float32) * s[:, None])
