"""Raw array builders for the offline datasets, each cached in memory.

Nothing here touches the network: MNIST-1D is regenerated from the `mnist1d` package's
own generator (its `get_dataset` helper downloads a pickle, so it is never called),
digits come from the CSV inside the scikit-learn wheel, and the text corpus is read from
the standard-library sources of the running interpreter.

`mnist1d` (which imports matplotlib.pyplot and scipy) and scikit-learn are imported only
when MNIST-1D is generated or digits are loaded: a process that reads MNIST-1D from
`$JAXQUANT_CACHE` (every trainer run after the first) starts a few seconds sooner.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import tempfile
from typing import Any

import numpy as np

# The environment variable naming an optional on-disk cache directory.
CACHE_ENV_VAR = "JAXQUANT_CACHE"

DIGITS_NUM_TEST = 360

# Pure-Python modules present (as .py files) on CPython 3.10-3.12. Order matters: it is
# the concatenation order of the corpus.
PYTEXT_MODULES: tuple[str, ...] = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "dataclasses",
    "fractions",
    "functools",
    "heapq",
    "json.decoder",
    "json.encoder",
    "queue",
    "shlex",
    "string",
    "textwrap",
    "weakref",
)

# 2: keyed by the `mnist1d` version, the generator arguments stored in the file.
_MNIST1D_CACHE_VERSION = 2

ClassificationArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _mnist1d_generator_args() -> dict[str, Any]:
  from mnist1d.data import get_dataset_args  # pylint: disable=import-outside-toplevel
  args = get_dataset_args(as_dict=True)
  # The URL belongs to the download helper we never call; keep provenance honest.
  args.pop("url", None)
  return args


def _generate_mnist1d(args: dict[str, Any]) -> ClassificationArrays:
  from mnist1d.data import make_dataset  # pylint: disable=import-outside-toplevel
  from mnist1d.utils import ObjectView  # pylint: disable=import-outside-toplevel
  # make_dataset seeds the *global* numpy and `random` generators; put them back so
  # loading data never changes the randomness of unrelated code.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    raw = make_dataset(ObjectView(dict(args)))
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  # NWC: a trailing channel axis so 1-D convs consume it directly.
  train_x = np.asarray(raw["x"], np.float32)[:, :, None]
  test_x = np.asarray(raw["x_test"], np.float32)[:, :, None]
  return (
      train_x,
      np.asarray(raw["y"], np.int32),
      test_x,
      np.asarray(raw["y_test"], np.int32),
  )


def _cache_path() -> str | None:
  """The cache file of MNIST-1D, keyed by the installed `mnist1d` version (which fixes the
  generator's default arguments) without importing the package."""
  cache_dir = os.environ.get(CACHE_ENV_VAR)
  if not cache_dir:
    return None
  key = json.dumps({"v": _MNIST1D_CACHE_VERSION,
                    "mnist1d_version": importlib.metadata.version("mnist1d")},
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"mnist1d_{digest}.npz")


def _read_npz(path: str) -> tuple[ClassificationArrays, dict[str, Any]] | None:
  """(arrays, generator arguments) from the cache file; None if missing or corrupt."""
  try:
    with np.load(path) as f:
      arrays = f["train_x"], f["train_y"], f["test_x"], f["test_y"]
      args = json.loads(str(f["generator_args"]))
    return arrays, args
  except (OSError, KeyError, ValueError):
    return None  # missing or corrupt cache: regenerate


def _write_npz(path: str, arrays: ClassificationArrays, args: dict[str, Any]) -> None:
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  # Write-then-rename so concurrent readers never see a half-written file.
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, train_x=arrays[0], train_y=arrays[1], test_x=arrays[2], test_y=arrays[3],
               generator_args=np.asarray(json.dumps(args, sort_keys=True)))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@functools.lru_cache(maxsize=None)
def _mnist1d_cached(cache_path: str | None) -> tuple[ClassificationArrays, dict[str, Any]]:
  cached = _read_npz(cache_path) if cache_path else None
  if cached is not None:
    arrays, args = cached
  else:
    args = _mnist1d_generator_args()
    arrays = _generate_mnist1d(args)
    if cache_path:
      _write_npz(cache_path, arrays, args)
  meta = {
      "source": "mnist1d.data.make_dataset (default arguments, regenerated locally)",
      "generator_args": args,
      "mnist1d_version": importlib.metadata.version("mnist1d"),
  }
  return arrays, meta


def mnist1d_arrays() -> tuple[ClassificationArrays, dict[str, Any]]:
  """MNIST-1D with the generator's default arguments (Greydanus 2020).

  Returns:
    `((train_x [4000, 40, 1] f32, train_y [4000] i32, test_x [1000, 40, 1] f32,
    test_y [1000] i32), metadata)`. Generated once per process (a second or so), and
    read from/written to `$JAXQUANT_CACHE` when that variable is set.
  """
  return _mnist1d_cached(_cache_path())


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits: images [1797, 8, 8, 1] f32 in [0, 1], labels i32."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  bunch = load_digits()
  # Pixels are integer counts 0..16 (4x4 blocks of a 32x32 bitmap).
  images = np.asarray(bunch.images, np.float32)[..., None] / np.float32(16.0)
  return images, np.asarray(bunch.target, np.int32)


def _module_source_path(module: str) -> str:
  spec = importlib.util.find_spec(module)
  origin = spec.origin if spec is not None else None
  if origin is None or not origin.endswith(".py") or not os.path.isfile(origin):
    raise RuntimeError(
        f"pytext needs the source file of standard-library module {module!r}; "
        f"found {origin!r} (an interpreter without .py sources?)"
    )
  return origin


@functools.lru_cache(maxsize=1)
def pytext_stream() -> tuple[np.ndarray, dict[str, Any]]:
  """Concatenated source bytes of `PYTEXT_MODULES`, in list order.

  Returns:
    `(stream [num_bytes] uint8, metadata)`; metadata records the interpreter version,
    the module list with per-module byte counts, and a SHA-256 of the stream (the
    corpus differs slightly between Python patch releases).
  """
  chunks, sizes = [], {}
  for module in PYTEXT_MODULES:
    with open(_module_source_path(module), "rb") as f:
      data = f.read()
    chunks.append(data)
    sizes[module] = len(data)
  corpus = b"".join(chunks)
  meta = {
      "source": "CPython standard-library sources of the running interpreter",
      "python_version": platform.python_version(),
      "python_implementation": platform.python_implementation(),
      "modules": list(PYTEXT_MODULES),
      "module_bytes": sizes,
      "total_bytes": len(corpus),
      "sha256": hashlib.sha256(corpus).hexdigest(),
  }
  return np.frombuffer(corpus, dtype=np.uint8), meta


def clear_caches() -> None:
  """Forgets every in-memory dataset, so the next load rebuilds it (from its source, or
  from `$JAXQUANT_CACHE` for MNIST-1D when that is set)."""
  for cached in (_mnist1d_cached, digits_arrays, pytext_stream):
    cached.cache_clear()
