"""WordPiece tokenization (HF `tokenizers`, from `tokenizer.json`) and batched embedding.

Sentence-transformers tokenizes each batch with truncation to `max_seq_length` and pads
to the longest sentence; padding does not change a sentence's embedding beyond float
rounding (the mask removes padded keys and padded tokens from the mean), so we sort
sentences by length and pad each batch to a multiple of `bucket` tokens: few distinct
shapes, so few compilations of the jitted forward.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import jax
import numpy as np


class Tokenizer:
  """A `tokenizer.json` with our truncation and no built-in padding.

  Args:
    path: the `tokenizer.json` file.
    max_length: tokens kept per sentence, [CLS] and [SEP] included.
  """

  def __init__(self, path: str, max_length: int):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
    if not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length={max_length!r} must be an int >= 2 ([CLS] and [SEP])")
    self._tok = HFTokenizer.from_file(str(path))
    self._tok.no_padding()  # the file may fix a padded length (all-MiniLM's says 128)
    self._tok.enable_truncation(max_length=max_length)
    self.max_length = max_length
    self.pad_id = self._tok.token_to_id("[PAD]") or 0

  def token_ids(self, sentences: Sequence[str]) -> List[List[int]]:
    """Token ids of each sentence (with [CLS] ... [SEP]), unpadded."""
    if isinstance(sentences, str):
      raise ValueError("sentences must be a sequence of str, not one str")
    return [e.ids for e in self._tok.encode_batch(list(sentences))]

  def pad(self, ids: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, length], mask int32 [B, length]) right-padded with [PAD]."""
    out = np.full((len(ids), length), self.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
      if len(row) > length:
        raise ValueError(f"sentence {i} has {len(row)} tokens > length={length}")
      out[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return out, mask

  def __call__(self, sentences: Sequence[str], bucket: int = 16):
    """(ids, mask) of all sentences, padded to the longest rounded up to `bucket`."""
    ids = self.token_ids(sentences)
    longest = max((len(r) for r in ids), default=1)
    return self.pad(ids, min(-(-longest // bucket) * bucket, self.max_length))


def batches(tokenizer: Tokenizer, sentences: Sequence[str], batch_size: int = 64,
            bucket: int = 16):
  """Yields (indices, ids, mask): sentences sorted by token count, `batch_size` at a time,
  each batch padded to its longest sentence rounded up to a multiple of `bucket`."""
  if batch_size < 1 or bucket < 1:
    raise ValueError(f"batch_size={batch_size} and bucket={bucket} must be >= 1")
  ids = tokenizer.token_ids(sentences)
  order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    longest = max(len(ids[i]) for i in idx)
    length = min(-(-longest // bucket) * bucket, tokenizer.max_length)
    b_ids, b_mask = tokenizer.pad([ids[i] for i in idx], length)
    if len(idx) < batch_size:  # pad the batch too: one shape per length bucket
      fill = batch_size - len(idx)
      b_ids = np.concatenate([b_ids, np.full((fill, length), tokenizer.pad_id, np.int32)])
      b_mask = np.concatenate([b_mask, np.zeros((fill, length), np.int32)])
    yield np.asarray(idx), b_ids, b_mask


def embed(apply_fn: Callable, variables, tokenizer: Tokenizer, sentences: Sequence[str],
          batch_size: int = 64, bucket: int = 16) -> np.ndarray:
  """Sentence embeddings float32 `[n, D]` in the order of `sentences`.

  `apply_fn(variables, ids_BxT, mask_BxT) -> [B, D]`, e.g. `model.apply` or a quantized
  model's `apply`, is jitted here unless it already is (pass one `jax.jit(model.apply)`
  to many calls to compile each batch shape once).
  """
  fn = apply_fn if hasattr(apply_fn, "lower") else jax.jit(apply_fn)
  out = None
  for idx, ids, mask in batches(tokenizer, sentences, batch_size, bucket):
    e = np.asarray(fn(variables, ids, mask), np.float32)[:len(idx)]
    if out is None:
      out = np.zeros((len(sentences), e.shape[-1]), np.float32)
    out[idx] = e
  if out is None:
    raise ValueError("sentences is empty")
  return out
