"""Perplexity of a causal LM over a token stream, in non-overlapping windows.

The method (the same for every variant, so rows compare):
  - the text is tokenized once, without special tokens, and cut to its first
    `max_tokens` tokens;
  - the stream is split into consecutive, non-overlapping windows of `window` tokens
    (the last one may be shorter; one of fewer than 2 tokens is dropped);
  - each window is its own sequence (positions 0..window−1, no context from the previous
    window), and its first token is not scored: it has no context;
  - when the model's metadata asks for a BOS token (GGUF `add_bos_token`), each window is
    BOS + window−1 text tokens, and every text token is scored (the first one given BOS);
  - perplexity = exp(Σ NLL / N) over the N scored tokens, in float64 on the host.
A shorter window gives each token less context, so numbers are only comparable at the
same window (512 by default).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np


def windows(ids: Sequence[int], window: int, *, bos_id: Optional[int] = None
            ) -> List[np.ndarray]:
  """The token windows (int32 arrays) of a stream, as the module docstring defines them."""
  if window < 2:
    raise ValueError(f"window={window} must be at least 2 (one context and one scored "
                     "token)")
  step = window - (1 if bos_id is not None else 0)
  out = []
  for start in range(0, len(ids), step):
    chunk = list(ids[start:start + step])
    if bos_id is not None:
      chunk = [bos_id] + chunk
    if len(chunk) >= 2:
      out.append(np.asarray(chunk, np.int32))
  return out


def token_nll(logits_BxTxV: np.ndarray, ids_BxT: np.ndarray) -> np.ndarray:
  """−log p(ids[t] | ids[<t]) for t = 1..T−1, `[B, T−1]`, float64."""
  z = np.asarray(logits_BxTxV[:, :-1], np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  logz = np.log(np.exp(z).sum(axis=-1))
  picked = np.take_along_axis(z, np.asarray(ids_BxT)[:, 1:, None], axis=-1)[..., 0]
  return logz - picked


def evaluate(logits_fn: Callable[[np.ndarray], np.ndarray], wins: Sequence[np.ndarray],
             batch_size: int = 1, progress: Optional[Callable[[int, int], None]] = None):
  """{'perplexity', 'nll', 'num_tokens', 'num_windows'} of `wins` under `logits_fn`
  (int32 `[B, T]` -> logits `[B, T, V]`). Windows of equal length run `batch_size` at a
  time; a short final batch is padded with copies of its first window, not counted."""
  if not wins:
    raise ValueError("no window to score: the text has fewer than 2 tokens")
  total, count = 0.0, 0
  by_len = {}
  for w in wins:
    by_len.setdefault(len(w), []).append(w)
  done = 0
  for _, group in sorted(by_len.items(), reverse=True):
    for i in range(0, len(group), batch_size):
      chunk = group[i:i + batch_size]
      real = len(chunk)
      chunk = chunk + [chunk[0]] * (batch_size - real)
      ids = np.stack(chunk)
      nll = token_nll(np.asarray(logits_fn(ids)), ids)[:real]
      total += float(nll.sum())
      count += nll.size
      done += real
      if progress is not None:
        progress(done, len(wins))
  mean = total / count
  return {"perplexity": math.exp(mean), "nll": mean, "num_tokens": count,
          "num_windows": len(wins)}
