"""Folding a per-input-channel scale s into the weights around a layer (AWQ, SmoothQuant).

Both methods compute a layer y = x W as (x / s) · (diag(s) W). The weight side is
`scale_rows`; the input side x / s costs nothing at serving time when x is the output of
an op that is linear per channel:

  LayerNorm   LN(z)·γ + β, then / s       = LN(z)·(γ/s) + β/s       (`into_layernorm`)
  Dense       (z V + b) / s                = z (V diag(1/s)) + b/s   (`into_columns`)
  attention   softmax(·) · (z V + b) / s   : the value projection's columns, since the
              attention weights mix tokens, not channels (v → out in a transformer).

An op whose output also feeds something else (a post-norm LayerNorm whose output is also
the residual stream, as in BERT) cannot take the fold; there the layer keeps s as an
explicit input scale, and GELU/ReLU before a layer are not per-channel linear either
(ReLU is positively homogeneous, so a positive s does fold through it; GELU is not).
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def _check_scale(s, n: int, what: str) -> jax.Array:
  s = jnp.asarray(s, jnp.float32)
  if s.shape != (n,):
    raise ValueError(f"{what}: s has shape {s.shape}, expected ({n},)")
  if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
    raise ValueError(f"{what}: s must be finite and positive (a per-channel scale)")
  return s


def scale_rows(kernel, s_K, n_contracting: int = 1) -> jax.Array:
  """diag(s) W for a kernel whose first `n_contracting` axes (K entries in all, row-major)
  contract with the layer's input: each input channel's weights times s."""
  kernel = jnp.asarray(kernel)
  shape_in = kernel.shape[:n_contracting]
  k = 1
  for d in shape_in:
    k *= d
  s = _check_scale(s_K, k, "scale_rows").reshape(shape_in + (1,) * (kernel.ndim - n_contracting))
  return (kernel * s).astype(kernel.dtype)


def into_layernorm(ln_scale_K, ln_bias_K: Optional[jax.Array], s_K) -> Tuple[jax.Array, Optional[jax.Array]]:
  """(γ/s, β/s): the LayerNorm then outputs its old output divided by s."""
  g = jnp.asarray(ln_scale_K)
  s = _check_scale(s_K, g.shape[0], "into_layernorm")
  bias = None if ln_bias_K is None else (jnp.asarray(ln_bias_K) / s).astype(g.dtype)
  return (g / s).astype(g.dtype), bias


def into_columns(kernel, bias: Optional[jax.Array], s_N, n_output: int = 1):
  """(V diag(1/s), b/s) of a preceding layer whose last `n_output` kernel axes (N entries
  in all, row-major) are its outputs, e.g. a DenseGeneral value kernel [D, H, Dh] with
  n_output=2 and s over the H·Dh features."""
  kernel = jnp.asarray(kernel)
  shape_out = kernel.shape[kernel.ndim - n_output:]
  n = 1
  for d in shape_out:
    n *= d
  s = _check_scale(s_N, n, "into_columns").reshape(shape_out)
  new_bias = None
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != shape_out:
      raise ValueError(f"into_columns: bias shape {bias.shape} must be the output shape "
                       f"{shape_out}")
    new_bias = (bias / s).astype(bias.dtype)
  s_kernel = s.reshape((1,) * (kernel.ndim - n_output) + shape_out)  # explicit rank
  return (kernel / s_kernel).astype(kernel.dtype), new_bias
