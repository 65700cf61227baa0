"""How far quantized sentence embeddings are from float ones (pure numpy), plus cost helpers.

For n sentences with float embeddings F and quantized embeddings Q (rows L2-normalized
by the model, but normalized again here so any rows work):

  cosine_i       = <F_i, Q_i> / (|F_i| |Q_i|)                   reported as mean and min
  top-k agreement: N_k(E, i) = the k sentences j ≠ i with the largest cosine to i under
                 embeddings E; agreement = mean_i |N_k(F, i) ∩ N_k(Q, i)| / k
                 (top-1: the fraction of sentences whose nearest neighbour is unchanged).

Ties in a neighbour ranking are broken by index (a stable sort), the same way for F and Q.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import numpy as np


def _unit(e: np.ndarray) -> np.ndarray:
  e = np.asarray(e, np.float64)
  if e.ndim != 2:
    raise ValueError(f"embeddings must be [n, D], got shape {e.shape}")
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def cosine_to_float(float_emb: np.ndarray, quant_emb: np.ndarray) -> np.ndarray:
  """Per-sentence cosine between float and quantized embeddings, `[n]`."""
  f, q = _unit(float_emb), _unit(quant_emb)
  if f.shape != q.shape:
    raise ValueError(f"shapes differ: float {f.shape} vs quantized {q.shape}")
  return np.sum(f * q, axis=1)


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
  """`[n, k]` indices of each row's k most cosine-similar other rows, nearest first."""
  e = _unit(emb)
  n = e.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k={k} must be in [1, n-1] for n={n} sentences")
  sim = e @ e.T
  np.fill_diagonal(sim, -np.inf)  # a sentence is not its own neighbour
  return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def topk_agreement(float_emb: np.ndarray, quant_emb: np.ndarray, k: int) -> float:
  """Mean over sentences of |top-k neighbours under float ∩ under quantized| / k."""
  nf, nq = neighbours(float_emb, k), neighbours(quant_emb, k)
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nf, nq)]))


def compare(float_emb: np.ndarray, quant_emb: np.ndarray) -> Dict[str, float]:
  """{'cos_mean', 'cos_min', 'top1', 'top10'} of quantized vs float embeddings ('top10'
  uses k = n − 1 when there are fewer than 11 sentences)."""
  cos = cosine_to_float(float_emb, quant_emb)
  n = np.shape(float_emb)[0]
  return {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
          "top1": topk_agreement(float_emb, quant_emb, 1),
          "top10": topk_agreement(float_emb, quant_emb, min(10, n - 1))}


def time_ratio(fn: Callable[[], object], baseline: Callable[[], object], repeats: int = 7) -> float:
  """median time of `fn()` / median time of `baseline()`, timed interleaved in this
  process after one warm-up call each (so compilation is excluded). Each callable must
  block until its result is ready (e.g. end with `jax.block_until_ready`)."""
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  fn(), baseline()
  t_fn, t_base = [], []
  for _ in range(repeats):
    for f, ts in ((fn, t_fn), (baseline, t_base)):
      t0 = time.perf_counter()
      f()
      ts.append(time.perf_counter() - t0)
  return statistics.median(t_fn) / statistics.median(t_base)


def stored_bytes(qmodel, variables, *example_args):
  """`jq.size_report` of the serving variables that `jq.convert` makes of a quantized
  model (what is stored for serving: codes, scales, zero points, float leftovers)."""
  import jaxquant as jq  # pylint: disable=import-outside-toplevel
  _, serving = jq.convert(qmodel, variables, *example_args)
  return jq.size_report(serving)
