"""jq.export_serving / jq.load_exported: the converted serving model (int8, packed int4,
binary, fp8 weights) serialized with jax.export, reloaded in a fresh process that can
import neither jaxquant nor Flax, and bit-identical to the in-process serving model."""
import functools
import os
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxquant as jq
from experiments.models import CNN1D

EXPORT_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "jaxquant", "export.py")
A8 = jq.QuantSpec(bits=8, granularity="tensor")
RULES = {
    "w8a8_static": [jq.Rule(".*", weight=jq.QuantSpec(bits=8), act=A8)],
    "mixed": [
        jq.Rule("conv_0", weight=jq.QuantSpec(bits=8), act=A8),
        jq.Rule("conv_1", weight=jq.QuantSpec(bits=4, ste="lsq"),
                act=jq.QuantSpec(bits=4, symmetric=False, granularity="tensor")),
        jq.Rule("conv_2", weight=jq.QuantSpec(format="binary")),
        jq.Rule("head", weight=jq.QuantSpec(format="fp8_e4m3"), mode="fake"),
    ],
}
X = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32)


BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):  # first on the path: beats editable installs
      def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(name + " is blocked in this process")
    sys.meta_path.insert(0, Block())
    """)


def _fresh_process(tmp_path, model_file, x):
  """Runs the exported file in a new interpreter where jaxquant and flax cannot be
  imported (export.py is loaded by path); returns its output."""
  np.save(tmp_path / "x.npy", x)
  script = "BLOCKED = ('jaxquant', 'flax')\n" + BLOCK + textwrap.dedent(f"""
      import importlib.util
      import numpy as np
      for pkg in ("jaxquant", "flax"):
        try:
          __import__(pkg)
        except ImportError:
          pass
        else:
          sys.exit(pkg + " is importable")
      spec = importlib.util.spec_from_file_location("jq_export", {EXPORT_PY!r})
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      fn = mod.load_exported({str(model_file)!r})
      np.save({str(tmp_path / 'out.npy')!r}, np.asarray(fn(np.load({str(tmp_path / 'x.npy')!r}))))
      leaked = [m for m in sys.modules if m.split(".")[0] in ("jaxquant", "flax")]
      assert not leaked, leaked
      """)
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=180)
  assert res.returncode == 0, res.stderr[-3000:]
  return np.load(tmp_path / "out.npy")


@functools.lru_cache(maxsize=None)
def _served(name):
  """The CNN1D under RULES[name], initialized (calibrated when static) and converted:
  (serving model, serving variables), built once per name for the module's tests."""
  qm = jq.quantize_model(CNN1D(num_classes=4, channels=8), RULES[name])
  variables = jax.jit(qm.init)(jax.random.key(0, impl="unsafe_rbg"), X)  # fast compile
  if name == "w8a8_static":
    variables = jq.calibrate(qm, variables, [X])
  return jq.convert(qm, variables)


@pytest.mark.parametrize("name", sorted(RULES))
def test_serving_model_round_trip_bit_identical(name, tmp_path):
  serving_model, serving_vars = _served(name)
  want = np.asarray(jax.jit(serving_model.apply)(serving_vars, X))
  path = tmp_path / "model.jqx"
  exported = jq.export_serving(serving_model, serving_vars, X, str(path))
  assert path.exists() and not os.path.exists(str(path) + ".tmp")
  # Integer weights travel as integers: int8 codes / packed uint8 are module inputs.
  dtypes = {str(a.dtype) for a in exported.in_avals}
  assert "int8" in dtypes and (name == "w8a8_static" or "uint8" in dtypes)
  got = _fresh_process(tmp_path, path, X)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(jq.load_exported(str(path))(X)), want)


def test_weight_only_exact_with_a_fixed_batch_and_within_ulps_with_a_symbolic_one(tmp_path):
  """The documented exactness: a weight-only model exported with the example's batch is
  bit-identical to the jitted serving apply; with a symbolic batch it takes the general
  weight-only path (same codes, another summation order), within a few float32 ulps."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

  x = np.random.default_rng(0).normal(size=(4, 96)).astype(np.float32)
  qm = jq.quantize_model(Net(), [jq.Rule(".*", weight=jq.QuantSpec(bits=8))])
  smodel, svars = jq.convert(qm, jax.jit(qm.init)(jax.random.key(0, impl="unsafe_rbg"), x), x)
  want = np.asarray(jax.jit(smodel.apply)(svars, x))
  for poly in (False, True):
    path = str(tmp_path / f"m_{poly}.jqx")
    jq.export_serving(smodel, svars, x, path, batch_polymorphic=poly)
    got = np.asarray(jq.load_exported(path)(x))
    if poly:
      np.testing.assert_allclose(got, want, rtol=0, atol=8 * np.spacing(np.abs(want).max()))
    else:
      np.testing.assert_array_equal(got, want)


def test_batch_polymorphic_when_the_model_allows(tmp_path):
  model = nn.Dense(3)
  variables = model.init(jax.random.key(1), X)
  path = tmp_path / "dense.jqx"
  exported = jq.export_serving(model, variables, X, str(path))
  assert str(exported.in_avals[-1].shape[0]) == "b"
  fn = jq.load_exported(str(path))
  for rows in (1, 6, 9):
    x = np.tile(X, (2, 1))[:rows]
    np.testing.assert_array_equal(np.asarray(fn(x)), np.asarray(jax.jit(model.apply)(variables, x)))


@pytest.mark.parametrize("name", sorted(RULES))
def test_quantized_serving_model_is_batch_polymorphic(name, tmp_path):
  # Dynamic per-row / per-tensor activation ranges, static ranges, packed int4, binary
  # and fp8 weights all trace with a symbolic batch (the contraction's canonical shapes
  # are symbolic products, layout.prod).
  serving_model, serving_vars = _served(name)
  path = tmp_path / "model.jqx"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback to a fixed batch
    exported = jq.export_serving(serving_model, serving_vars, X, str(path))
  assert str(exported.in_avals[-1].shape[0]) == "b"
  fn = jq.load_exported(str(path))
  serve = jax.jit(serving_model.apply)
  for rows in (1, 9):
    x = np.tile(X, (2, 1))[:rows]
    got = np.asarray(fn(x))
    assert got.shape[0] == rows
    np.testing.assert_array_equal(got, np.asarray(serve(serving_vars, x)))


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, __header__=np.frombuffer(b'{"format": "something else"}', np.uint8))
  with pytest.raises(ValueError, match="not a jaxquant.exported_serving v1 file"):
    jq.load_exported(str(path))
