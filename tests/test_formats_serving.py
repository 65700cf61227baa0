"""The formats added through the registry in whole models: QAT through
`jq.quantize_model` (straight-through gradients), `jq.convert` (serving forward == QAT
forward from the stored codes and scales) and `jq.size_report` (stored bytes, block
scales included, against closed forms)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

QS = jq.QuantSpec
K0, N0, N1 = 64, 64, 16  # fc0 kernel [K0, N0], fc1 kernel [N0, N1]


class Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(N1, name="fc1")(nn.relu(nn.Dense(N0, name="fc0")(x)))


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, K0)), jnp.float32)
PARAMS = jax.jit(Two().init)(jax.random.key(1), X)["params"]  # jit: one compile at import
CASES = {
    "mxfp8": [jq.Rule(".*", weight=QS(format="mxfp8"), act=QS(format="mxfp8"), mode="fake")],
    "mxfp4": [jq.Rule(".*", weight=QS(format="mxfp4"), act=QS(format="mxfp4"), mode="fake")],
    "nvfp4": [jq.Rule(".*", weight=QS(format="nvfp4"), act=QS(format="nvfp4"), mode="fake")],
    "mxfp4_weight_only": [jq.Rule(".*", weight=QS(format="mxfp4"), mode="fake")],
    "int16": [jq.Rule(".*", weight=QS(bits=16), act=QS(bits=16, granularity="tensor"),
                      mode="fake")],
    "w8a16": [jq.Rule(".*", weight=QS(bits=8), act=QS(bits=16, granularity="tensor"),
                      mode="fake")],
}


def stored_bytes(case, k, n):
  """Closed form of a [k, n] kernel's stored bytes: codes + block scales (+ tensor scale)."""
  fmt = CASES[case][0].weight
  if fmt.format == "int":  # per-channel float32 scales
    return k * n * fmt.storage_bits // 8 + 4 * n
  blocks = (k // fmt.group_size) * n  # one byte per block scale (E8M0 / E4M3)
  return k * n * fmt.storage_bits // 8 + blocks + (4 if fmt.format == "nvfp4" else 0)


def _loss(qmodel, params, stats):
  y = qmodel.apply({"params": params, "quant_stats": stats}, X)
  return jnp.mean((y - 1.0) ** 2)


# Slow: mxfp4 activations (mxfp4 weights: mxfp4_weight_only; block-scaled 4-bit
# activations: nvfp4) and w8a16 (int16 activations with calibrate: int16).
_SLOW_CASES = ("mxfp4", "w8a16")


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_CASES else c for c in CASES])
def test_qat_convert_and_size_report(case):
  qmodel = jq.quantize_model(Two(), CASES[case])
  stats = jax.jit(qmodel.init)(jax.random.key(0), X)["quant_stats"]
  loss, grads = jax.jit(jax.value_and_grad(lambda p: _loss(qmodel, p, stats)))(PARAMS)
  for g in jax.tree.leaves(grads):  # straight-through gradients reach every parameter
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  y_float = Two().apply({"params": PARAMS}, X)
  y_qat = jax.jit(qmodel.apply)({"params": PARAMS, "quant_stats": stats}, X)
  err = float(jnp.linalg.norm(y_qat - y_float) / jnp.linalg.norm(y_float))
  assert 0 < err < (0.02 if "16" in case else 0.1 if "8" in case else 0.35), err
  variables = {"params": PARAMS, "quant_stats": stats}
  if "int16" in case or "a16" in case:  # static int16 activation ranges
    variables = jq.calibrate(qmodel, variables, [X])
    y_qat = jax.jit(qmodel.apply)(variables, X)
  smodel, svars = jq.convert(qmodel, variables)
  y_serve = jax.jit(smodel.apply)(svars, X)
  np.testing.assert_allclose(np.asarray(y_serve), np.asarray(y_qat), rtol=0,
                             atol=1e-6 * float(jnp.max(jnp.abs(y_qat))))
  report = jq.size_report(svars)
  for layer, (k, n) in (("fc0", (K0, N0)), ("fc1", (N0, N1))):
    q = svars["params"][layer]["kernel"]
    assert isinstance(q, jq.QTensor)
    row = report.layer(f"{layer}/kernel")
    assert row.float_bytes == k * n * 4
    assert row.quantized_bytes == stored_bytes(case, k, n), (layer, row)
    assert sum(v.nbytes for v in jax.tree.leaves(q)) == row.quantized_bytes


def test_block_formats_size_closed_forms():
  # mxfp4: K·N/2 codes + K/32·N E8M0 scales; nvfp4: K·N/2 + K/16·N E4M3 + 4 (FP32);
  # mxfp8: K·N + K/32·N.
  assert stored_bytes("mxfp4", 64, 64) == 2048 + 128
  assert stored_bytes("nvfp4", 64, 64) == 2048 + 256 + 4
  assert stored_bytes("mxfp8", 64, 64) == 4096 + 128


def test_int16_codes():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((64, 8)), jnp.float32)
  spec = QS(bits=16)
  q = jq.quantize(x, spec, reduce_axes=(0,))
  assert q.values.dtype == jnp.int16 and int(jnp.max(jnp.abs(q.values))) == 32767
  assert spec.storage_bits == 16 and spec.effective_bits == 16 and not spec.is_integer
  step = np.asarray(q.scale)
  assert np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(x)) <= step / 2 * (1 + 1e-5))
  a = QS(bits=16, symmetric=False)
  assert jq.quantize(x, a, reduce_axes=(0,)).values.dtype == jnp.int16
  for bad in (9, 15, 17):
    with pytest.raises(ValueError, match="bits"):
      QS(bits=bad)
  with pytest.raises(ValueError, match="mode"):
    jq.Rule(".*", weight=QS(bits=8), act=QS(bits=16))  # no s16 dot: mode='fake'
  with pytest.raises(ValueError, match="grad"):
    jq.DotSpec(lhs=QS(), rhs=QS(), grad=QS(bits=16), mode="fake")
  with pytest.raises(ValueError, match="ptq"):  # PTQ stores int8 codes
    jq.Rule(".*", weight=QS(bits=16), mode="fake", ptq=jq.PTQ())


def gaussian_errors():
  """Relative RMS error of each format on a gaussian [1024, 256] weight (blocks along
  axis 0), the numbers quoted in the notes."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1024, 256)), jnp.float32)
  specs = {"int8": QS(bits=8), "int4 g32": QS(bits=4, granularity="group", group_size=32),
           "mxfp8": QS(format="mxfp8"), "mxfp4": QS(format="mxfp4"),
           "nvfp4": QS(format="nvfp4"), "int16": QS(bits=16)}
  # One compile per spec (the same values as eager, op by op, at a third of the time).
  rel_err = jax.jit(lambda x, s: jnp.linalg.norm(jq.fake_quant(x, s, reduce_axes=(0,)) - x)
                    / jnp.linalg.norm(x), static_argnums=1)
  return {name: float(rel_err(x, s)) for name, s in specs.items()}


def test_gaussian_error_ordering():
  e = gaussian_errors()
  assert e["int16"] < e["int8"] < e["mxfp8"] < e["nvfp4"] < e["mxfp4"] < 0.2
  assert e["nvfp4"] < e["int4 g32"]
