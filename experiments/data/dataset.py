"""The `Dataset` record and `load_dataset`, the single entry point for offline data.

Every dataset here is real, built from files that ship with installed packages or with
the running interpreter, and deterministic: nothing is downloaded, ever. The loaders
themselves live in `sources.py`; this module validates arguments and assembles the
frozen record that the rest of the harness codes against.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Literal

import numpy as np

from experiments.data import sources

DatasetKind = Literal["classification", "lm"]

DATASET_NAMES: tuple[str, ...] = ("mnist1d", "digits", "pytext")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory train/test dataset.

  Attributes:
    name: registry name, one of `DATASET_NAMES`.
    kind: 'classification' (x are examples, y integer labels) or 'lm' (x are 1-D uint8
      byte streams, y is None; windows are cut by `BatchIterator`).
    train_x, train_y, test_x, test_y: numpy arrays, read-only (they may be shared
      through a cache, so mutating them would corrupt later loads).
    num_classes: number of label classes, or 256 (byte vocabulary) for 'lm'.
    input_shape: one example's shape without the batch axis, e.g. (40, 1) for
      mnist1d, or (seq_len,) for 'lm'.
    metadata: JSON-serializable provenance (generator arguments, sizes, versions).
  """

  name: str
  kind: DatasetKind
  train_x: np.ndarray
  train_y: np.ndarray | None
  test_x: np.ndarray
  test_y: np.ndarray | None
  num_classes: int
  input_shape: tuple[int, ...]
  metadata: dict[str, Any]

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns `(x, y)` for `split` in ('train', 'test'); ValueError otherwise."""
    if split == "train":
      return self.train_x, self.train_y
    if split == "test":
      return self.test_x, self.test_y
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")

  @property
  def seq_len(self) -> int:
    """Window length (model input length) of an 'lm' dataset."""
    if self.kind != "lm":
      raise ValueError(f"seq_len is only defined for kind='lm', not {self.kind!r}")
    return self.input_shape[0]


def _readonly(array: np.ndarray | None) -> np.ndarray | None:
  if array is None:
    return None
  view = array.view()
  view.setflags(write=False)
  return view


def _load_mnist1d(seed: int, seq_len: int) -> Dataset:
  del seed, seq_len  # the dataset is defined by the generator's default arguments
  arrays, generator_meta = sources.mnist1d_arrays()
  train_x, train_y, test_x, test_y = arrays
  return Dataset(
      name="mnist1d",
      kind="classification",
      train_x=train_x,
      train_y=train_y,
      test_x=test_x,
      test_y=test_y,
      num_classes=10,
      input_shape=tuple(train_x.shape[1:]),
      metadata={
          **generator_meta,
          "seed_used": False,
          "num_train": int(train_x.shape[0]),
          "num_test": int(test_x.shape[0]),
      },
  )


def _load_digits(seed: int, seq_len: int) -> Dataset:
  del seq_len
  images, labels = sources.digits_arrays()
  # Seeded permutation rather than sklearn's splitter: one numpy call, stable across
  # sklearn versions.
  order = np.random.default_rng(seed).permutation(images.shape[0])
  test_idx, train_idx = order[: sources.DIGITS_NUM_TEST], order[sources.DIGITS_NUM_TEST :]
  return Dataset(
      name="digits",
      kind="classification",
      train_x=images[train_idx],
      train_y=labels[train_idx],
      test_x=images[test_idx],
      test_y=labels[test_idx],
      num_classes=10,
      input_shape=tuple(images.shape[1:]),
      metadata={
          "source": "sklearn.datasets.load_digits",
          "scaling": "pixel / 16 -> [0, 1]",
          "split_seed": seed,
          "num_train": int(train_idx.size),
          "num_test": int(test_idx.size),
      },
  )


def _load_pytext(seed: int, seq_len: int) -> Dataset:
  del seed  # the corpus is fixed; randomness enters only through BatchIterator
  stream, corpus_meta = sources.pytext_stream()
  split_at = int(stream.size * 0.9)
  train_x, test_x = stream[:split_at], stream[split_at:]
  if test_x.size < seq_len + 1:
    raise ValueError(
        f"seq_len={seq_len} is too long for the pytext test split ({test_x.size} bytes)"
    )
  return Dataset(
      name="pytext",
      kind="lm",
      train_x=train_x,
      train_y=None,
      test_x=test_x,
      test_y=None,
      num_classes=256,
      input_shape=(seq_len,),
      metadata={
          **corpus_meta,
          "seq_len": seq_len,
          "split": "first 90% train, last 10% test",
          "train_bytes": int(train_x.size),
          "test_bytes": int(test_x.size),
      },
  )


_LOADERS: dict[str, Callable[[int, int], Dataset]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "pytext": _load_pytext,
}


def load_dataset(name: str, *, seed: int = 0, seq_len: int = 128) -> Dataset:
  """Loads one of the offline datasets.

  Args:
    name: one of `DATASET_NAMES`: 'mnist1d' (Greydanus 2020, generated with the
      `mnist1d` package's default arguments: 4000 train / 1000 test, x [N, 40, 1]),
      'digits' (scikit-learn's bundled 8x8 digits, x [N, 8, 8, 1] in [0, 1],
      1437 train / 360 test), 'pytext' (byte stream of fixed standard-library sources).
    seed: split seed for 'digits'. 'mnist1d' and 'pytext' are fixed datasets and
      ignore it (recorded in metadata), so results stay comparable across runs.
    seq_len: model input length for 'lm' datasets (windows are seq_len + 1 bytes).

  Returns:
    A frozen `Dataset` with read-only arrays.

  Raises:
    ValueError: unknown name, negative seed, or non-positive seq_len.
  """
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if int(seq_len) != seq_len or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  ds = _LOADERS[name](int(seed), int(seq_len))
  return dataclasses.replace(
      ds,
      train_x=_readonly(ds.train_x),
      train_y=_readonly(ds.train_y),
      test_x=_readonly(ds.test_x),
      test_y=_readonly(ds.test_y),
      metadata=copy.deepcopy(ds.metadata),  # nested dicts come from a shared cache
  )
