"""Deterministic, resumable batch iteration over a `Dataset`.

Every batch is a pure function of `(seed, step)`, so the iterator's whole state is one
integer and a restored iterator reproduces an uninterrupted one exactly:

- classification: epoch `e` uses the permutation `default_rng([seed, e])`; each epoch
  yields `num_examples // batch_size` full batches (the remainder is dropped, so shapes
  never change under jit).
- lm: step `s` draws `batch_size` window starts from `default_rng([seed, s])`; each
  window is `seq_len + 1` bytes, split into inputs `x = w[:-1]` and targets `y = w[1:]`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from experiments.data.dataset import Dataset

Batch = dict[str, np.ndarray]

_STATE_VERSION = 1


def _check_positive(name: str, value: int) -> int:
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _lm_windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
  offsets_1xW = np.arange(seq_len + 1)[None, :]
  windows_BxW = stream[starts[:, None] + offsets_1xW].astype(np.int32)
  return {"x": windows_BxW[:, :-1], "y": windows_BxW[:, 1:]}


class BatchIterator:
  """Infinite iterator of training batches, resumable from `state()`.

  Yields dicts `{'x': ..., 'y': ...}` of exactly `batch_size` examples: for
  classification `x` has the dataset's dtype and shape `[batch_size, *input_shape]`
  and `y` is int32 `[batch_size]`; for lm both are int32 `[batch_size, seq_len]`.
  """

  def __init__(self, ds: Dataset, *, batch_size: int, seed: int, split: str = "train"):
    """Creates an iterator positioned at step 0.

    Args:
      ds: the dataset.
      batch_size: examples (or windows) per batch.
      seed: non-negative integer; with the step it determines every batch.
      split: 'train' or 'test'.
    """
    self._ds = ds
    self._batch_size = _check_positive("batch_size", batch_size)
    if int(seed) != seed or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    self._seed = int(seed)
    self._split = split
    self._x, self._y = ds.split(split)
    self._step = 0
    # The permutation of the epoch in progress; recomputed lazily on epoch change.
    self._perm_epoch = -1
    self._perm = np.empty((0,), np.int64)
    if ds.kind == "classification":
      self._batches_per_epoch = self._x.shape[0] // self._batch_size
      if self._batches_per_epoch == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {self._x.shape[0]} examples "
            f"of the {split!r} split"
        )
    elif self._x.size < ds.seq_len + 1:
      raise ValueError(f"the {split!r} stream is shorter than seq_len + 1")

  @property
  def step(self) -> int:
    """Number of batches produced so far (the index of the next batch)."""
    return self._step

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self._batch_at(self._step)
    self._step += 1
    return batch

  def _batch_at(self, step: int) -> Batch:
    if self._ds.kind == "lm":
      rng = np.random.default_rng([self._seed, step])
      seq_len = self._ds.seq_len
      # Exclusive upper bound: the last valid start leaves seq_len + 1 bytes.
      starts = rng.integers(0, self._x.size - seq_len, size=self._batch_size)
      return _lm_windows(self._x, starts, seq_len)
    epoch, index = divmod(step, self._batches_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._x.shape[0])
      self._perm_epoch = epoch
    idx = self._perm[index * self._batch_size : (index + 1) * self._batch_size]
    return {"x": self._x[idx], "y": self._y[idx]}

  def state(self) -> dict[str, Any]:
    """JSON-serializable position; the identity fields guard against mismatched restores."""
    return {
        "version": _STATE_VERSION,
        "step": self._step,
        "seed": self._seed,
        "batch_size": self._batch_size,
        "split": self._split,
        "dataset": self._ds.name,
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Moves to the position recorded by `state()`.

    Raises:
      ValueError: the state belongs to an iterator with a different seed, batch
        size, split or dataset (its batches would silently differ), or is malformed.
    """
    expected = self.state()
    for key in ("seed", "batch_size", "split", "dataset"):
      if key in state and state[key] != expected[key]:
        raise ValueError(
            f"cannot restore: state has {key}={state[key]!r}, "
            f"this iterator has {expected[key]!r}"
        )
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(f"state['step'] must be a non-negative int, got {step!r}")
    self._step = step


def eval_batches(ds: Dataset, batch_size: int, split: str = "test") -> Iterator[Batch]:
  """Every example of `split` once, in order.

  Classification: consecutive slices of `batch_size`, the last one possibly smaller.
  lm: windows of `seq_len + 1` bytes starting every `seq_len` bytes, so each byte after
  the first is a target exactly once; a trailing piece shorter than a window is
  dropped. Windows are grouped `batch_size` at a time, the last group possibly smaller.

  Yields:
    Dicts `{'x': ..., 'y': ...}` like `BatchIterator`'s.
  """
  batch_size = _check_positive("batch_size", batch_size)
  x, y = ds.split(split)
  if ds.kind == "classification":
    for lo in range(0, x.shape[0], batch_size):
      yield {"x": x[lo : lo + batch_size], "y": y[lo : lo + batch_size]}
    return
  seq_len = ds.seq_len
  num_windows = (x.size - 1) // seq_len
  starts = np.arange(num_windows) * seq_len
  for lo in range(0, num_windows, batch_size):
    yield _lm_windows(x, starts[lo : lo + batch_size], seq_len)
