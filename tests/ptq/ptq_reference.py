"""Independent float64 numpy references for the PTQ tests, written from the papers.

GPTQ here uses the Optimal Brain Quantizer form (Frantar et al. 2022, eqs. 2-3) with an
explicit inverse Hessian that is updated by Gaussian elimination after each row, not the
Cholesky form the library uses; the two agree in exact arithmetic (the paper's Step 3).
"""
import numpy as np


def int_range(spec):
  if spec.symmetric:
    q = 2 ** (spec.bits - 1) - 1
    return -q, q
  return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1


def grid(slab_RxN, spec):
  """Absmax grid (scale [N], zero point [N]) of the rows of a slab, one per column."""
  qmin, qmax = int_range(spec)
  if spec.symmetric:
    s = np.max(np.abs(slab_RxN), axis=0) / qmax
    s = np.where(s > 0, s, 1.0)
    return s, np.zeros_like(s)
  lo = np.minimum(slab_RxN.min(axis=0), 0.0)
  hi = np.maximum(slab_RxN.max(axis=0), 0.0)
  s = (hi - lo) / (qmax - qmin)
  s = np.where(s > 0, s, 1.0)
  return s, np.clip(np.round(qmin - lo / s), qmin, qmax)


def round_to(row_N, s, z, spec):
  """(codes, dequantized) of one row on the grid (s, z)."""
  qmin, qmax = int_range(spec)
  c = np.clip(np.round(row_N / s + z), qmin, qmax)
  return c, (c - z) * s


def np_gptq(w_KxN, h_KxK, spec, percdamp=0.01, act_order=False):
  """(codes [K, N], dequantized [K, N]) by OBQ-form GPTQ with the library's conventions:
  dead rows zeroed first, channel/tensor grid from the zeroed W, group grids calibrated
  when the group's first row is reached (first in processing order)."""
  w = np.array(w_KxN, np.float64)
  h = np.array(h_KxK, np.float64)
  k, n = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  h = h + percdamp * np.mean(np.diag(h)) * np.eye(k)
  hinv = np.linalg.inv(h)
  if spec.granularity == "tensor":
    s, z = grid(w.reshape(-1, 1), spec)
    s, z = np.full(n, s[0]), np.full(n, z[0])
  elif spec.granularity == "channel":
    s, z = grid(w, spec)
  gs = spec.group_size if spec.granularity == "group" else None
  grids = {}  # group -> (s, z), set when the group's first row comes up
  codes, deq = np.zeros((k, n)), np.zeros((k, n))
  remaining = list(range(k))
  for r in order:
    if gs is not None:
      g = r // gs
      if g not in grids:
        grids[g] = grid(w[g * gs:(g + 1) * gs], spec)
      s, z = grids[g]
    codes[r], deq[r] = round_to(w[r], s, z, spec)
    remaining.remove(r)
    delta = (w[r] - deq[r]) / hinv[r, r]
    for j in remaining:  # OBS update of every row not yet quantized
      w[j] -= hinv[j, r] * delta
    hinv = hinv - np.outer(hinv[:, r], hinv[r, :]) / hinv[r, r]  # eliminate row r
  return codes, deq


def np_fake_quant(w_KxN, spec):
  """RTN: quantize-dequantize the columns of W (groups along K) with absmax grids."""
  w = np.asarray(w_KxN, np.float64)
  k, n = w.shape
  if spec.granularity == "tensor":
    s, z = grid(w.reshape(-1, 1), spec)
    return np.stack([round_to(row, s[0], z[0], spec)[1] for row in w])
  gs = spec.group_size if spec.granularity == "group" else k
  out = np.zeros_like(w)
  for g in range(k // gs):
    rows = slice(g * gs, (g + 1) * gs)
    s, z = grid(w[rows], spec)
    out[rows] = np.stack([round_to(row, s, z, spec)[1] for row in w[rows]])
  return out


def correlated_inputs(rng, n, k, outliers=0, outlier_scale=20.0):
  """X [n, K] with correlated channels (a random mixing) and a few large channels."""
  a = rng.normal(size=(k, k)) * 0.4 + np.eye(k)
  x = rng.normal(size=(n, k)) @ a
  if outliers:
    idx = rng.choice(k, outliers, replace=False)
    x[:, idx] *= outlier_scale
  return x.astype(np.float32)
