"""Tests for experiments.data: offline loading, determinism, resumable iteration."""

import argparse
import json
import platform
import socket

import numpy as np
import pytest

from experiments.data import (
    DATASET_NAMES,
    BatchIterator,
    Dataset,
    eval_batches,
    load_dataset,
)
from experiments.data import sources


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset("mnist1d")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def pytext():
    return load_dataset("pytext", seq_len=32)


def _toy_classification(num_examples=23):
    x = np.arange(num_examples, dtype=np.float32).reshape(num_examples, 1)
    return Dataset(
        name="toy",
        kind="classification",
        train_x=x,
        train_y=np.arange(num_examples, dtype=np.int32),
        test_x=x[:7],
        test_y=np.arange(7, dtype=np.int32),
        num_classes=num_examples,
        input_shape=(1,),
        metadata={},
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])


def test_unknown_dataset_names_allowed():
    with pytest.raises(ValueError, match="mnist1d.*digits.*pytext"):
        load_dataset("cifar10")


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seq_len": 0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        load_dataset("digits", **kwargs)


def test_mnist1d_shapes_and_labels(mnist1d):
    assert mnist1d.kind == "classification"
    assert mnist1d.train_x.shape == (4000, 40, 1) and mnist1d.train_x.dtype == np.float32
    assert mnist1d.test_x.shape == (1000, 40, 1)
    assert mnist1d.train_y.shape == (4000,) and mnist1d.train_y.dtype == np.int32
    assert mnist1d.input_shape == (40, 1) and mnist1d.num_classes == 10
    assert set(np.unique(mnist1d.train_y)) == set(range(10))
    assert set(np.unique(mnist1d.test_y)) <= set(range(10))
    assert mnist1d.metadata["generator_args"]["num_samples"] == 5000
    assert abs(float(np.concatenate([mnist1d.train_x, mnist1d.test_x]).std()) - 1.0) < 1e-3


def test_digits_shapes_range_and_split(digits):
    assert digits.train_x.shape == (1437, 8, 8, 1) and digits.test_x.shape == (360, 8, 8, 1)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int32
    assert digits.train_x.min() >= 0.0 and digits.train_x.max() <= 1.0
    assert set(np.unique(digits.train_y)) == set(range(10))
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.test_x, digits.test_x)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.test_y, digits.test_y)
    # Same examples overall, only the split differs.
    np.testing.assert_allclose(
        np.concatenate([other.train_x, other.test_x]).sum(),
        np.concatenate([digits.train_x, digits.test_x]).sum(),
        rtol=1e-6,
    )


def test_pytext_stream_and_metadata(pytext):
    assert pytext.kind == "lm" and pytext.num_classes == 256
    assert pytext.train_x.dtype == np.uint8 and pytext.train_x.ndim == 1
    assert pytext.train_y is None and pytext.test_y is None
    assert pytext.input_shape == (32,) and pytext.seq_len == 32
    meta = pytext.metadata
    assert meta["python_version"] == platform.python_version()
    assert meta["modules"] == list(sources.PYTEXT_MODULES)
    total = pytext.train_x.size + pytext.test_x.size
    assert total == meta["total_bytes"] == sum(meta["module_bytes"].values())
    assert pytext.train_x.size == int(total * 0.9)
    # Starts with the first module's source, verbatim.
    with open(argparse.__file__, "rb") as f:
        head = f.read(200)
    assert pytext.train_x[:200].tobytes() == head


def test_metadata_is_json_and_arrays_are_readonly(mnist1d, digits, pytext):
    for ds in (mnist1d, digits, pytext):
        json.dumps(ds.metadata)
        with pytest.raises(ValueError):
            ds.train_x[0] = 0


def test_loading_is_offline_deterministic_and_keeps_global_rng(
    mnist1d, digits, pytext, monkeypatch
):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv(sources.CACHE_ENV_VAR, raising=False)
    sources.clear_caches()
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    fresh = {name: load_dataset(name, seq_len=32) for name in DATASET_NAMES}
    assert np.random.rand() == expected_draw
    for old in (mnist1d, digits, pytext):
        new = fresh[old.name]
        np.testing.assert_array_equal(new.train_x, old.train_x)
        np.testing.assert_array_equal(new.test_x, old.test_x)
        if old.train_y is not None:
            np.testing.assert_array_equal(new.train_y, old.train_y)
        assert new.metadata == old.metadata


def test_disk_cache_roundtrip(mnist1d, tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path))
    first = load_dataset("mnist1d")
    files = list(tmp_path.glob("mnist1d_*.npz"))
    assert len(files) == 1
    sources.clear_caches()
    second = load_dataset("mnist1d")  # now read from disk
    assert second.metadata == first.metadata == mnist1d.metadata  # generator args stored
    for ds in (first, second):
        np.testing.assert_array_equal(ds.train_x, mnist1d.train_x)
        np.testing.assert_array_equal(ds.test_y, mnist1d.test_y)


def test_classification_epochs_are_permutations():
    ds = _toy_classification(23)
    it = BatchIterator(ds, batch_size=5, seed=3)
    epoch0 = np.concatenate([b["y"] for b in _take(it, 4)])  # 23 // 5 = 4 batches
    epoch1 = np.concatenate([b["y"] for b in _take(it, 4)])
    assert len(set(epoch0.tolist())) == 20 and len(set(epoch1.tolist())) == 20
    assert not np.array_equal(epoch0, epoch1)
    expected = np.random.default_rng([3, 0]).permutation(23)[:20]
    np.testing.assert_array_equal(epoch0, expected)


def test_batch_shapes(mnist1d, pytext):
    batch = next(BatchIterator(mnist1d, batch_size=100, seed=0))
    assert batch["x"].shape == (100, 40, 1) and batch["y"].shape == (100,)
    batch = next(BatchIterator(pytext, batch_size=8, seed=0))
    assert batch["x"].shape == (8, 32) and batch["x"].dtype == np.int32
    assert batch["y"].shape == (8, 32) and batch["y"].dtype == np.int32
    np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert batch["x"].min() >= 0 and batch["x"].max() < 256


@pytest.mark.parametrize("name", ["toy", "pytext"])
def test_restore_reproduces_uninterrupted_run(name, pytext):
    ds = _toy_classification() if name == "toy" else pytext
    reference = _take(BatchIterator(ds, batch_size=4, seed=7), 20)
    interrupted = BatchIterator(ds, batch_size=4, seed=7)
    _take(interrupted, 9)  # stops mid-epoch for the toy set (5 batches per epoch)
    saved = json.loads(json.dumps(interrupted.state()))
    resumed = BatchIterator(ds, batch_size=4, seed=7)
    resumed.restore(saved)
    assert resumed.step == 9
    _assert_same_batches(_take(resumed, 11), reference[9:])
    # Rewinding an iterator that already ran ahead works too.
    interrupted.restore({"step": 2})
    _assert_same_batches(_take(interrupted, 3), reference[2:5])


def test_seed_changes_batches(pytext):
    a = next(BatchIterator(pytext, batch_size=4, seed=0))
    b = next(BatchIterator(pytext, batch_size=4, seed=1))
    assert not np.array_equal(a["x"], b["x"])


def test_restore_rejects_mismatched_state():
    ds = _toy_classification()
    state = BatchIterator(ds, batch_size=4, seed=7).state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, batch_size=4, seed=8).restore(state)
    with pytest.raises(ValueError, match="step"):
        BatchIterator(ds, batch_size=4, seed=7).restore({"step": -1})


def test_iterator_argument_checks(digits):
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(digits, batch_size=5000, seed=0)
    with pytest.raises(ValueError, match="split"):
        BatchIterator(digits, batch_size=8, seed=0, split="val")


def test_eval_batches_classification_covers_test_set_in_order(digits):
    batches = list(eval_batches(digits, 100))
    assert [b["x"].shape[0] for b in batches] == [100, 100, 100, 60]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), digits.test_x)
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), digits.test_y)


def test_eval_batches_lm_targets_each_byte_once(pytext):
    batches = list(eval_batches(pytext, 64))
    num_windows = (pytext.test_x.size - 1) // 32
    assert sum(b["x"].shape[0] for b in batches) == num_windows
    targets = np.concatenate([b["y"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(targets, pytext.test_x[1 : num_windows * 32 + 1])
    inputs = np.concatenate([b["x"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(inputs, pytext.test_x[: num_windows * 32])
