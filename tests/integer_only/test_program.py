"""jq.to_integer on the harness models (MLP, MNIST-1D CNN, digits ResNet; tiny sizes,
QAT for a few dozen steps in-process): integer-only jaxpr, agreement with the QAT model,
bit-exactness of the numpy runtime in a process where jax cannot be imported, any batch
size, save / load, BatchNorm and LayerNorm folds, and errors that name the layer."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.integer_only import IntegerOnlyError, IntegerProgram, to_integer
from experiments.models import CNN1D, GPT, MLP, ResNet
from tests.integer_only.int_helpers import RUNTIME_PATH, ema_as_static, float_dtypes_in, qat_forward_ranges, rules

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)

RNG = np.random.default_rng(0)
MODELS = {  # name: (model, input shape without batch, middle layers' bits)
    "mlp": (MLP(num_classes=4, features=(16, 12)), (12,), 8),
    "cnn": (CNN1D(num_classes=4, channels=6), (40,), 4),
    "resnet": (ResNet(num_classes=4, widths=(4, 8), norm_groups=2), (8, 8, 1), 8),
}
X = {k: RNG.normal(size=(64,) + s).astype(np.float32) for k, (_, s, _) in MODELS.items()}


@pytest.fixture(scope="module")
def trained():
  """{name: (qmodel, variables, program)}: W8A8 first / last layers, LSQ weights in the
  middle; activation ranges from QAT's EMA (stored as static ranges too, so the QAT
  model quantizes activations on exactly the program's grids)."""
  out = {}
  for name, (model, _, bits) in MODELS.items():
    batches = [X[name][:32], X[name][32:]]
    qm, variables = qat_forward_ranges(model, rules(bits=bits), batches)
    variables = ema_as_static(variables)
    out[name] = (qm, variables, to_integer(qm, variables, batches))
  return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_run_is_integer_only(trained, name):
  program = trained[name][2]
  codes = program.quantize_input(X[name][:4])
  assert codes.dtype == jnp.int8
  for fn in (program.run, program.predict):
    jaxpr = jax.make_jaxpr(fn)(codes)
    assert float_dtypes_in(jaxpr) == []
  assert program(X[name][:4]).dtype == jnp.int32
  assert sorted({op["op"] for op in program.graph.ops}) == sorted(
      {"mlp": {"dot", "requant"}, "cnn": {"reshape", "conv", "requant", "dot"},
       "resnet": {"conv", "requant", "norm", "add", "sum", "dot"}}[name])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_the_qat_model(trained, name):
  qm, variables, program = trained[name]
  # The ResNet's QAT forward under jit (eager, one compile per op, is several times
  # slower); its bounds below are tolerances. The MLP and CNN compare codes exactly: eager.
  apply = jax.jit(qm.apply) if name == "resnet" else qm.apply
  qat = np.asarray(apply(variables, X[name]))
  got = np.asarray(program(X[name])) * program.output_scale
  err, top = np.abs(got - qat), np.abs(qat).max()
  if name == "resnet":
    # Integer normalization (σ to 7 fractional bits) and calibrated grids for the norm
    # and residual outputs, which QAT keeps in float.
    assert err.max() <= 0.05 * top and err.mean() <= 0.015 * top
    assert np.mean(got.argmax(-1) == qat.argmax(-1)) >= 0.95
  else:
    # Every activation code equals QAT's (same grids, one rounding of (acc + bias)·M):
    # only the int32 logits' own rounding (half a step) and float32 noise remain.
    assert err.max() <= program.output_scale + 1e-5 * top
    np.testing.assert_array_equal(got.argmax(-1), qat.argmax(-1))
  # Its int32 logits scale back through output_scale; predict is their argmax.
  np.testing.assert_array_equal(program.predict(program.quantize_input(X[name])),
                                np.asarray(program(X[name])).argmax(-1))


def _edge_inputs(name, program):
  x = X[name][:8].copy()
  edges = np.concatenate([x, 1e3 * x, -x, np.zeros_like(x[:1])])
  edges[1].reshape(-1)[:3] = [np.nan, np.inf, -np.inf]  # NaN → zero point, ±inf saturate
  return edges


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_numpy_runtime_bit_exact_without_jax(trained, name, tmp_path):
  program = trained[name][2]
  x = _edge_inputs(name, program)
  program.save(str(tmp_path / "prog"))
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import importlib.abc, runpy, sys
      class Block(importlib.abc.MetaPathFinder):  # first on the path: beats any install
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in ("jax", "jaxlib", "jaxquant", "flax"):
            raise ImportError(name + " is blocked in this process")
      sys.meta_path.insert(0, Block())
      try:
        import jax
      except ImportError:
        pass
      else:
        sys.exit("jax is importable")
      sys.argv = ["numpy_runtime.py", {str(tmp_path / 'prog')!r}, {str(tmp_path / 'x.npy')!r},
                  {str(tmp_path / 'out.npy')!r}]
      runpy.run_path({RUNTIME_PATH!r}, run_name="__main__")
      """)
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  got = np.load(tmp_path / "out.npy")
  want = np.asarray(program(x))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  codes = np.asarray(program.quantize_input(x))
  g = program.graph.input
  assert np.any(codes == g["qmin"]) and np.any(codes == g["qmax"])  # input saturated


def test_any_batch_size_and_save_load(trained, tmp_path):
  program = trained["cnn"][2]
  full = np.asarray(program(X["cnn"][:7]))
  codes = program.quantize_input(X["cnn"][:7])
  np.testing.assert_array_equal(np.asarray(jax.jit(program.run)(codes)), full)  # jittable
  for b in (1, 3):
    np.testing.assert_array_equal(np.asarray(program(X["cnn"][:b])), full[:b])
  program.save(str(tmp_path))
  again = IntegerProgram.load(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(again(X["cnn"][:7])), full)
  assert again.output_scale == program.output_scale


class ConvBN(nn.Module):
  """Conv → BatchNorm (inference) → ReLU6 → mean over length → Dense."""
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3,), name="conv")(x[:, :, None])
    h = nn.BatchNorm(use_running_average=True, name="bn")(h)
    h = jnp.minimum(nn.relu(h), 6.0)
    return nn.Dense(3, name="head")(jnp.mean(h, axis=1))


class LNMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.LayerNorm(name="ln")(nn.Dense(16, name="fc")(x)))
    return nn.Dense(3, name="head")(h)


@pytest.mark.parametrize("model", [ConvBN(), LNMLP()], ids=["batchnorm", "layernorm"])
def test_float_model_folds(model):
  x = RNG.normal(size=(32, 20)).astype(np.float32)
  # Jitted init: one compile instead of one per op.
  variables = jax.tree.map(np.asarray, dict(jax.jit(model.init)(jax.random.key(1), x)))
  if "batch_stats" in variables:  # non-trivial statistics and a negative γ channel
    bn = variables["batch_stats"]["bn"]
    bn["mean"] = RNG.normal(size=6).astype(np.float32)
    bn["var"] = RNG.uniform(0.5, 2.0, 6).astype(np.float32)
    variables["params"]["bn"]["scale"] = np.array([1, -1, 2, .5, 1, -.3], np.float32)
  program = to_integer(model, variables, [x])  # a float model: W8A8, calibrated
  ops = [op["op"] for op in program.graph.ops]
  if isinstance(model, ConvBN):
    assert "norm" not in ops and ops.count("requant") == 3  # BN folded into the conv
  else:
    assert "norm" in ops
  want = np.asarray(jax.jit(model.apply)(variables, x))
  got = np.asarray(program(x)) * program.output_scale
  assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_transformer_refused_naming_layers():
  model = GPT(vocab_size=16, d_model=8, num_heads=2, num_layers=1, max_len=8)
  x = np.zeros((2, 8), np.int32)
  variables = jax.jit(model.init)(jax.random.key(0), x)  # one compile, not one per op
  with pytest.raises(IntegerOnlyError) as err:
    to_integer(model, variables, [x])
  msg = str(err.value)
  # Embedding lookups, attention products and softmax lower (ops/embed.py, matmul.py,
  # softmax.py); the causal mask's select and the tanh GELU do not.
  for needle in ("'block_0/attn': a select", "'block_0/mlp': ", "tanh (GELU"):
    assert needle in msg, msg


def test_missing_calibration_names_the_layer(trained):
  qm, variables, _ = trained["resnet"]
  with pytest.raises(IntegerOnlyError, match="no activation range for the output of layer "
                     "'stem'.*calibration_batches"):  # the first one in forward order
    to_integer(qm, variables, None, example=X["resnet"][:2])
  # The MLP's ranges all come from QAT: no calibration is needed at all.
  qm, variables, program = trained["mlp"]
  again = to_integer(qm, variables, None, example=X["mlp"][:2])
  np.testing.assert_array_equal(np.asarray(again(X["mlp"])), np.asarray(program(X["mlp"])))
  # A layer with an activation spec and no range anywhere: measured, or named if it can't be.
  no_stats = {k: v for k, v in variables.items() if k != "quant_stats"}
  with pytest.raises(IntegerOnlyError, match="layer 'dense_0' has an activation spec"):
    to_integer(qm, no_stats, None, example=X["mlp"][:2])
  assert to_integer(qm, no_stats, [X["mlp"]]).output_scale > 0


@pytest.mark.parametrize("weight,match", [
    (jq.QuantSpec(format="fp8_e4m3"), "layer 'dense_1': weight format 'fp8_e4m3'"),
    (jq.QuantSpec(bits=4, granularity="group", group_size=4), "layer 'dense_1': weights with"),
])
def test_weight_formats_without_integer_lowering(weight, match):
  model = MLP(num_classes=4, features=(16, 12))
  rule_list = [jq.Rule("dense_1", weight=weight, mode="fake"), jq.Rule(".*", weight=jq.QuantSpec())]
  qm = jq.quantize_model(model, rule_list)
  variables = qm.init(jax.random.key(0), X["mlp"][:2])
  with pytest.raises(IntegerOnlyError, match=match):
    to_integer(qm, variables, [X["mlp"]])


def test_run_rejects_floats_and_wrong_shapes(trained):
  program = trained["mlp"][2]
  with pytest.raises(ValueError, match="int8 codes"):
    program.run(X["mlp"][:2])
  with pytest.raises(ValueError, match=r"\(batch,\) \+ \(12,\)"):
    program(np.zeros((2, 13), np.float32))
