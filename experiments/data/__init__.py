"""Offline, deterministic datasets and resumable batch iterators.

    from experiments.data import load_dataset, Dataset, BatchIterator, eval_batches
    ds = load_dataset('mnist1d')                 # or 'digits', 'pytext'
    it = BatchIterator(ds, batch_size=100, seed=0)
    batch = next(it)                             # {'x': ..., 'y': ...}
    saved = it.state(); ...; it.restore(saved)   # resumes exactly
"""

from experiments.data.batching import Batch, BatchIterator, eval_batches
from experiments.data.dataset import DATASET_NAMES, Dataset, load_dataset

__all__ = [
    "Batch",
    "BatchIterator",
    "DATASET_NAMES",
    "Dataset",
    "eval_batches",
    "load_dataset",
]
