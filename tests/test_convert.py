"""Tests for jaxquant.calibrate / convert / size_report: serving forward == QAT forward,
no float copy of quantized weights, exact stored bytes, orbax round trip, static vs
dynamic activation ranges and EMA statistics."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxquant as jq
from tests.test_transform import Attention, Net, jit, fill_params, int_ops, normal, qinit, rel_err, run


class Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="fc1")(nn.relu(nn.Dense(16, name="fc0")(x)))


X = normal((3, 6, 6, 3), 11)
PARAMS = fill_params(Net(), X)
KERNEL_SHAPES = {"conv": (3, 3, 3, 8), "proj": (8, 2, 8), "mix": (2, 8, 12), "head": (12, 5)}

# The PRNG key of jitted inits: unsafe_rbg compiles in a fraction of threefry's time.
RBG = jax.random.key(0, impl="unsafe_rbg")
A8 = jq.QuantSpec(bits=8)
ASYM8 = jq.QuantSpec(bits=8, symmetric=False)
LAYERS = ("conv", "proj", "mix", "head")
# (weight spec, act spec) per format.
FORMATS = {
    "int8": (jq.QuantSpec(bits=8), A8),
    "int4": (jq.QuantSpec(bits=4), A8),
    "binary": (jq.QuantSpec(format="binary"), A8),
    "asym": (jq.QuantSpec(bits=4, symmetric=False), ASYM8),
    "lsq": (jq.QuantSpec(bits=4, ste="lsq"), A8),
}


def _latin(k):
  """Case k of a latin square: every format meets every layer kind (conv, DenseGeneral,
  nn.Einsum with two contracting axes, Dense) in one of the five cases."""
  names = list(FORMATS)
  return [jq.Rule(layer, weight=FORMATS[names[(i + k) % 5]][0], act=FORMATS[names[(i + k) % 5]][1])
          for i, layer in enumerate(LAYERS)]


SERVING_CASES = {
    **{f"latin{k}": _latin(k) for k in range(5)},
    "more_formats": [
        jq.Rule("conv", weight=jq.QuantSpec(format="ternary"), act=A8),
        jq.Rule("proj", weight=jq.QuantSpec(bits=4, granularity="group", group_size=4), act=A8),
        jq.Rule("mix", weight=jq.QuantSpec(bits=3), act=jq.QuantSpec(bits=6)),
        jq.Rule("head", weight=jq.QuantSpec(bits=4, ste="pact"), act=ASYM8)],
    "modes": [
        jq.Rule("conv", weight=jq.QuantSpec(bits=4)),  # weight-only
        jq.Rule("proj", act=jq.QuantSpec(bits=4)),  # activation-only
        jq.Rule("mix", weight=jq.QuantSpec(format="fp8_e4m3"),
                act=jq.QuantSpec(format="fp8_e4m3"), mode="fake"),
        jq.Rule("head", weight=jq.QuantSpec(bits=6, granularity="tensor"), act=A8)],
}


# The default run serves latin0-2 (every format on two or three of the four layer kinds,
# each layer kind under three formats) and the other cases; latin3 and latin4, which
# complete the square, run in the slow suite.
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c in ("latin3", "latin4") else c
               for c in SERVING_CASES]


def _factors(shapes, seed=0):
  """Multipliers that move learned step sizes / clip values away from their init, as
  training would."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.6, 1.4, s.shape), s.dtype), shapes)


def prepare(qmodel, params, x, model=None):
  """One jit: quant-variable init (+ 'training' of learned scales), QAT and float
  forward; then `jq.convert`. Returns (qvars, y_qat, y_float, serving model, svars)."""
  model = model or type(qmodel).__mro__[1]()
  init = jit(qmodel.init)(RBG, x)  # 'quant_stats' records the kernel layouts
  stats = init.get("quant_stats", {})
  factors = _factors(init["quant"]) if "quant" in init else None

  @jit
  def f(params):
    v = {"params": params, "quant_stats": stats}
    if factors is not None:
      quant = qmodel.apply(v, x, mutable=["quant"])[1]["quant"]
      v["quant"] = jax.tree.map(lambda q, m: q * m, quant, factors)
    return v, qmodel.apply(v, x), model.apply({"params": params}, x)

  qvars, y_qat, y_float = f(params)
  smodel, svars = jq.convert(qmodel, qvars)
  return qvars, y_qat, y_float, smodel, svars


def stored(svars, layer):
  """The QTensor convert stored for a layer's kernel."""
  q = svars["params"][layer]["kernel"]
  assert isinstance(q, jq.QTensor), layer
  return q


_JITTED = {}


def serve(smodel, svars, x):
  """smodel.apply under one cached jit per serving model."""
  if id(smodel) not in _JITTED:
    _JITTED[id(smodel)] = (smodel, jit(smodel.apply))
  return _JITTED[id(smodel)][1](svars, x)


@functools.lru_cache(maxsize=None)
def converted(case):
  qmodel = jq.quantize_model(Net(), SERVING_CASES[case])
  return (qmodel,) + prepare(qmodel, PARAMS, X)


def assert_same_forward(y_serve, y_qat):
  """Serving == QAT up to float32 FMA contraction of the scale/bias epilogue, which XLA
  fuses differently in the two programs (≤ a few ulp). Same codes and scales are
  required: one code step off moves an output by ≳1e-3 of its range."""
  y_serve, y_qat = np.asarray(y_serve), np.asarray(y_qat)
  np.testing.assert_allclose(y_serve, y_qat, rtol=0, atol=1e-6 * np.abs(y_qat).max())


def _leaves(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _weight_spec(case, layer):
  return next(r for r in SERVING_CASES[case] if r.matches(layer)).weight


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_serving_forward_equals_qat_forward(case):
  qmodel, qvars, y_qat, y_float, smodel, svars = converted(case)
  assert_same_forward(serve(smodel, svars, X), y_qat)
  assert rel_err(y_qat, y_float) > 1e-4  # quantization did happen
  # No float copy of a quantized weight: 'kernel' gone from its params, and no float
  # array of any quantized kernel's size anywhere in the serving variables.
  quantized = {p for p in LAYERS if _weight_spec(case, p) is not None}
  for path in LAYERS:
    is_q = isinstance(svars["params"][path]["kernel"], jq.QTensor)
    assert is_q == (path in quantized), path
  float_sizes = {int(np.prod(KERNEL_SHAPES[p])) for p in quantized}
  for name, leaf in _leaves(jax.tree.map(lambda a: a, svars)).items():
    if name.startswith("params/") and name.endswith("/kernel") and not isinstance(leaf, jq.QTensor):
      continue  # an unquantized layer's own float kernel
    if isinstance(leaf, jq.QTensor):
      for part in jax.tree.leaves(leaf):
        assert not (jnp.issubdtype(part.dtype, jnp.floating) and part.dtype.itemsize >= 2
                    and part.size in float_sizes), f"float copy of a kernel at {name}"
      continue
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype.itemsize >= 2:
      assert leaf.size not in float_sizes, f"float copy of a kernel at {name}"
  # The QAT variables are left as they were (training can go on).
  assert not any(isinstance(qvars["params"][p]["kernel"], jq.QTensor) for p in LAYERS)


class Chain(nn.Module):
  """Net without biases or additive nonlinearities: every float op after an integer
  contraction is a multiply, so no fused multiply-add can round differently."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="conv")(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = nn.DenseGeneral((2, 8), use_bias=False, name="proj")(x)
    x = nn.relu(nn.Einsum((2, 8, 12), "bthd,hdf->btf", use_bias=False, name="mix")(x))
    return nn.Dense(5, use_bias=False, name="head")(x)


@pytest.mark.parametrize("k", [0, 2])
def test_serving_forward_equals_qat_forward_bit_for_bit(k):
  rules = _latin(k)  # int8 / packed int4 / packed binary / asymmetric / LSQ weights
  qmodel = jq.quantize_model(Chain(), rules)
  _, y_qat, y_float, smodel, svars = prepare(qmodel, fill_params(Chain(), X), X)
  np.testing.assert_array_equal(serve(smodel, svars, X), y_qat)
  assert rel_err(y_qat, y_float) > 1e-4


def _expected_bits(spec):
  if spec.format == "binary":
    return 1
  if spec.format == "ternary" or (spec.format == "int" and spec.bits == 2):
    return 2
  if spec.format == "int" and spec.bits <= 4:
    return 4
  return 8


REDUCE_AXES = {"conv": (0, 1, 2), "proj": (0,), "mix": (0, 1), "head": (0,)}


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_serving_storage_per_spec_and_dequantized_weights(case):
  qmodel, qvars, _, _, _, svars = converted(case)
  for layer, shape in KERNEL_SHAPES.items():
    spec = _weight_spec(case, layer)
    if spec is None:
      continue
    q = stored(svars, layer)
    assert q.shape == shape and q.spec == spec and q.scale.dtype == jnp.float32
    bits, n = _expected_bits(spec), int(np.prod(shape))
    assert spec.storage_bits == bits
    if bits < 8:
      assert q.packed and q.values.dtype == jnp.uint8 and q.values.shape == (-(-n * bits // 8),)
    else:
      want = jnp.int8 if spec.is_integer else jnp.float8_e4m3fn
      assert not q.packed and q.values.dtype == want and q.values.shape == shape
    assert (q.zero_point is not None) == (not spec.symmetric)
    axes = REDUCE_AXES[layer]
    if spec.granularity == "tensor":
      scale_shape = (1,) * len(shape)
    elif spec.granularity == "channel":
      scale_shape = tuple(1 if a in axes else d for a, d in enumerate(shape))
    else:
      scale_shape = tuple(d // spec.group_size if a in axes else d for a, d in enumerate(shape))
    assert q.scale.shape == scale_shape, (layer, q.scale.shape)
    if q.zero_point is not None:
      assert q.zero_point.dtype == jnp.int32 and q.zero_point.shape == scale_shape

  @jit
  def dequantized(svars, qvars):
    """Per quantized layer: (stored weight unpacked and dequantized, QAT's fake-quantized
    kernel)."""
    out = {}
    for layer, shape in KERNEL_SHAPES.items():
      spec = _weight_spec(case, layer)
      if spec is not None:
        learned = qvars.get("quant", {}).get(layer, {}).get(f"weight_{spec.ste}")
        ref = jq.fake_quant(qvars["params"][layer]["kernel"], spec,
                            reduce_axes=REDUCE_AXES[layer], learned=learned)
        out[layer] = (svars["params"][layer]["kernel"].dequantize(), ref)
    return out

  for layer, (deq, ref) in dequantized(svars, qvars).items():
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-7, err_msg=layer)


def test_serving_uses_learned_activation_scales():
  rules = [jq.Rule("fc0", weight=jq.QuantSpec(bits=4),
                   act=jq.QuantSpec(bits=8, granularity="tensor", ste="lsq")),
           jq.Rule("fc1", weight=jq.QuantSpec(bits=4), act=jq.QuantSpec(
               bits=8, granularity="tensor", symmetric=False, ste="pact"))]
  qmodel = jq.quantize_model(Two(), rules)
  x = normal((4, 10), 5)
  _, y_qat, _, smodel, svars = prepare(qmodel, fill_params(Two(), x), x)
  assert_same_forward(serve(smodel, svars, x), y_qat)


@pytest.mark.parametrize("amx", [False, True])
def test_weight_only_dense_kernels_are_stored_transposed(monkeypatch, amx):
  """A weight-only Dense kernel [K, N] with per-channel or per-tensor scales is stored
  as its transpose [N, K] (the same codes and scales as quantizing kernel.T for
  contracting axis 1), packed when sub-byte; grouped and W8A8 kernels keep [K, N].
  Serving equals the QAT forward above 32 rows, on the float dot of the codes (no AMX)
  and on the sliced int8 dot (AMX: the path of decode batches too)."""
  from jaxquant import dot_options  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(dot_options, "cpu_has_amx_int8", lambda: amx)

  class Four(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, f in enumerate((16, 12, 8)):
        x = nn.relu(nn.Dense(f, name=f"fc{i}")(x))
      return nn.Dense(6, name="fc3")(x)

  rules = [jq.Rule("fc0", weight=jq.QuantSpec(bits=4, symmetric=False, ste="lsq")),
           jq.Rule("fc1", weight=jq.QuantSpec(bits=8, granularity="tensor")),
           jq.Rule("fc2", weight=jq.QuantSpec(bits=4, granularity="group", group_size=4)),
           jq.Rule("fc3", weight=jq.QuantSpec(bits=8), act=A8)]
  qmodel = jq.quantize_model(Four(), rules)
  x = normal((40, 10), 7)  # 40 rows: the float dot of the codes, or with AMX the slices
  qvars, y_qat, y_float, smodel, svars = prepare(qmodel, fill_params(Four(), x), x, Four())
  assert_same_forward(jit(smodel.apply)(svars, x), y_qat)
  assert rel_err(y_qat, y_float) > 1e-4
  layers = (("fc0", True), ("fc1", True), ("fc2", False), ("fc3", False))

  @jax.jit  # one compile, as convert's own (eager dispatch compiles every op on its own)
  def references(qvars):
    out = {}
    for layer, transposed in layers:
      kernel = qvars["params"][layer]["kernel"]
      spec = _weight_spec_of(rules, layer)
      learned = qvars.get("quant", {}).get(layer, {}).get("weight_lsq")
      if transposed:
        learned = None if learned is None else learned.T
        out[layer] = jq.quantize_weight(kernel.T, spec, jq.make_layout(2, (1,)), learned=learned)
      else:
        out[layer] = jq.quantize_weight(kernel, spec, jq.make_layout(2, (0,)), learned=learned)
    return out

  wants = references(qvars)
  for layer, _ in layers:
    spec, want = _weight_spec_of(rules, layer), wants[layer]
    got = stored(svars, layer)
    assert (got.shape, got.contracting) == (want.shape, want.contracting), layer
    for a, b in zip(jax.tree.leaves(got.unpacked()), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=layer)
    assert got.packed == (spec.bits < 8)


def _weight_spec_of(rules, layer):
  return next(r for r in rules if r.matches(layer)).weight


def test_group_granularity_with_two_contracting_axes_converts():
  """nn.Einsum 'bthd,hdf' contracts (h, d): QAT groups the flattened h·d = 16 axis in
  4 groups of 4 (as does DenseGeneral with axis=(-2, -1)); serving must do the same."""
  rules = [jq.Rule("mix", weight=jq.QuantSpec(bits=4, granularity="group", group_size=4,
                                              symmetric=False), act=A8)]
  qmodel = jq.quantize_model(Net(), rules)
  _, y_qat, y_float, smodel, svars = prepare(qmodel, PARAMS, X)
  assert_same_forward(serve(smodel, svars, X), y_qat)
  assert rel_err(y_qat, y_float) > 1e-4
  entry = stored(svars, "mix")
  assert entry.scale.shape == entry.zero_point.shape == (2, 2, 12)  # 2 groups per h
  # Independent reference: numpy asymmetric 4-bit over groups of the flattened (h, d).
  w = np.asarray(PARAMS["mix"]["kernel"], np.float64).reshape(4, 4, 12)  # [group, g, f]
  lo, hi = np.minimum(w.min(1, keepdims=True), 0), np.maximum(w.max(1, keepdims=True), 0)
  scale = (hi - lo) / 15
  zp = np.clip(np.round(-8 - lo / scale), -8, 7)
  ref = ((np.clip(np.round(w / scale + zp), -8, 7) - zp) * scale).reshape(2, 8, 12)
  np.testing.assert_allclose(entry.dequantize(), ref, rtol=1e-5, atol=1e-6)
  # The attention output projection (DenseGeneral over (heads, head_dim)), groups of 2.
  attn = Attention(heads=2, head_dim=4)
  x = normal((2, 3, 8), 8)
  q_attn = jq.quantize_model(attn, [jq.Rule("out", weight=jq.QuantSpec(
      bits=4, granularity="group", group_size=2), act=A8)])
  _, y_qat, _, smodel, svars = prepare(q_attn, fill_params(attn, x), x, model=attn)
  assert stored(svars, "out").scale.shape == (2, 2, 8)
  assert_same_forward(serve(smodel, svars, x), y_qat)


class Straddle(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((2, 6, 4), "bhd,hdf->bf", name="mix")(x)


def test_group_straddling_contracting_axes_is_a_clear_error():
  x = normal((3, 2, 6), 9)
  qmodel = jq.quantize_model(Straddle(), [jq.Rule("mix", weight=jq.QuantSpec(
      bits=4, granularity="group", group_size=4))])  # groups of 4 over a 2 x 6 contraction
  qvars = qinit(qmodel, fill_params(Straddle(), x), x)
  with pytest.raises(ValueError, match="group_size=4 splits the contracting axes"):
    jq.convert(qmodel, qvars)


class Narrow(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="kv")(x)


def test_grouped_weight_only_narrow_dense_serves():
  """K = 32 in one group of 32, N = 16: the weight-only serving kernel is stored [N, K],
  whose leading 16 must not be taken for the contracted features (that used to refuse
  the converted model with "group_size=32 does not divide its 16 ...")."""
  x = normal((4, 32), 12)
  qmodel = jq.quantize_model(Narrow(), [jq.Rule("kv", weight=jq.QuantSpec(
      bits=8, granularity="group", group_size=32))])
  _, y_qat, _, smodel, svars = prepare(qmodel, fill_params(Narrow(), x), x, model=Narrow())
  assert stored(svars, "kv").logical_shape == (16, 32)
  assert_same_forward(serve(smodel, svars, x), y_qat)


def test_serving_path_is_integer():
  _, _, _, _, smodel, svars = converted("latin1")  # int4, binary, asym, lsq: all int8 codes
  assert int_ops(smodel.apply, svars, X, prim="conv_general_dilated")[0] >= 1
  n_int, n_all = int_ops(smodel.apply, svars, X, prim="conv_general_dilated")
  assert n_int == n_all  # the asymmetric conv's zero-point terms are integer too
  assert int_ops(smodel.apply, svars, X, prim="dot_general") == (3, 3)


def test_convert_works_from_the_variables_alone_on_a_never_traced_model():
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=A8)]
  x = normal((4, 10), 3)
  qvars = jit(jq.quantize_model(Two(), rules).init)(RBG, x)
  fresh = jq.quantize_model(Two(), rules)  # built anew, never initialized or applied
  smodel, svars = jq.convert(fresh, qvars)
  assert all(isinstance(svars["params"][p]["kernel"], jq.QTensor) for p in ("fc0", "fc1"))
  assert_same_forward(run(smodel, svars, x), run(fresh, qvars, x))


def test_convert_of_float_params_needs_example_inputs():
  qmodel = jq.quantize_model(Two(), [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=A8)])
  x = normal((4, 10), 3)
  qvars = {"params": fill_params(Two(), x)}  # a float model's variables: no layouts
  with pytest.raises(ValueError, match="example inputs"):
    jq.convert(qmodel, qvars)
  smodel, svars = jq.convert(qmodel, qvars, x)  # one trace records the layouts
  assert all(isinstance(svars["params"][p]["kernel"], jq.QTensor) for p in ("fc0", "fc1"))
  assert_same_forward(run(smodel, svars, x), run(qmodel, qvars, x))


def test_convert_under_jit_and_zeroed_layouts_are_clear_errors():
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=4))]
  qmodel = jq.quantize_model(Two(), rules)
  x = normal((4, 10), 3)
  qvars = jit(qmodel.init)(RBG, x)
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda v: jq.convert(qmodel, v)[1])(qvars)
  zeroed = {**qvars, "quant_stats": jax.tree.map(jnp.zeros_like, qvars["quant_stats"])}
  with pytest.raises(ValueError, match="names no contracted axis"):
    jq.convert(qmodel, zeroed)


# ----------------------------------------------------------------------------- sizes

class Big(nn.Module):
  @nn.compact
  def __call__(self, x):
    for name in ("w8", "w4", "w1", "w4asym", "w3", "w2t", "w6"):
      x = nn.Dense(512, name=name)(x)
    return nn.Dense(8, name="head")(x)


def test_size_report_bytes_are_exact_and_ratios_approach_the_bit_widths():
  t = dict(granularity="tensor")
  rules = [jq.Rule("w8", weight=jq.QuantSpec(bits=8, **t)),
           jq.Rule("w4", weight=jq.QuantSpec(bits=4, **t)),
           jq.Rule("w1", weight=jq.QuantSpec(format="binary", **t)),
           jq.Rule("w4asym", weight=jq.QuantSpec(bits=4, symmetric=False)),  # per channel
           jq.Rule("w3", weight=jq.QuantSpec(bits=3)),
           jq.Rule("w2t", weight=jq.QuantSpec(format="ternary")),
           jq.Rule("w6", weight=jq.QuantSpec(bits=6), act=A8)]
  x = jnp.ones((2, 512))
  qmodel = jq.quantize_model(Big(), rules)
  params = jax.tree.map(lambda s: jnp.asarray(
      np.random.default_rng(0).normal(0, 0.05, s.shape), s.dtype),
      jax.eval_shape(Big().init, jax.random.key(0), x)["params"])
  qvars, _, _, _, svars = prepare(qmodel, params, x)
  report = jq.size_report(svars)
  n, f32 = 512 * 512, 4
  shape_record = 0  # the shape is static metadata of the QTensor, not stored bytes
  per_channel = 512 * 4  # float32 scale per output column
  expected = {  # codes + scale (+ zero point), by hand
      "w8": n + 4 + shape_record,
      "w4": n // 2 + 4 + shape_record,
      "w1": n // 8 + 4 + shape_record,
      "w4asym": n // 2 + per_channel + 512 * 4 + shape_record,
      "w3": n // 2 + per_channel + shape_record,  # 3-bit codes stored 2 per byte
      "w2t": n // 4 + per_channel + shape_record,
      "w6": n + per_channel + shape_record,
  }
  for layer, n_bytes in expected.items():
    row = report.layer(f"{layer}/kernel")
    assert (row.float_bytes, row.quantized_bytes) == (n * f32, n_bytes), layer
    # ... and the report counts what the variables really hold.
    held = sum(v.nbytes for v in jax.tree.leaves(stored(svars, layer)))
    assert held == n_bytes
    bias = report.layer(f"{layer}/bias")
    assert bias.float_bytes == bias.quantized_bytes == 512 * f32
  head = report.layer("head/kernel")
  assert head.float_bytes == head.quantized_bytes == 512 * 8 * f32
  assert len(report.tensors) == 2 * 8
  total_float = 7 * (n + 512) * f32 + (512 * 8 + 8) * f32
  assert report.total_float_bytes == total_float
  assert report.total_quantized_bytes == sum(expected.values()) + 7 * 512 * f32 + (512 * 8 + 8) * f32
  for layer, bits in (("w8", 4), ("w4", 8), ("w1", 32)):
    ratio = report.layer(f"{layer}/kernel").ratio
    assert bits * 0.99 < ratio < bits, (layer, ratio)
  assert "total" in str(report) and "w4asym/kernel" in str(report)
  # Training variables: stored == float for every tensor.
  train = jq.size_report(qvars)
  assert train.total_float_bytes == train.total_quantized_bytes == total_float
  with pytest.raises(KeyError):
    report.layer("w8/scale")


# ----------------------------------------------------------------------------- checkpoints

def test_serving_variables_round_trip_through_orbax(tmp_path):
  import orbax.checkpoint as ocp
  _, _, _, _, smodel, svars = converted("latin2")  # int8, packed int4 / binary, zero points
  y = serve(smodel, svars, X)
  ckptr = ocp.StandardCheckpointer()
  path = tmp_path / "serving"
  ckptr.save(path, svars)
  ckptr.wait_until_finished()
  restored = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, svars))
  assert jax.tree.structure(restored) == jax.tree.structure(svars)  # QTensors come back
  assert isinstance(restored["params"]["conv"]["kernel"], jq.QTensor)
  dtypes = set()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(svars)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    dtypes.add(np.dtype(a.dtype).name)
  assert {"int8", "uint8", "int32", "float32"} <= dtypes
  np.testing.assert_array_equal(serve(smodel, restored, X), y)


# ----------------------------------------------------------------------------- calibration

TENSOR = dict(granularity="tensor")


@pytest.mark.parametrize("act", [jq.QuantSpec(bits=4, **TENSOR),
                                 jq.QuantSpec(bits=4, symmetric=False, **TENSOR)],
                         ids=["symmetric", "asymmetric"])
def test_static_ranges_from_the_evaluation_batch_equal_dynamic_ranges(act):
  x = normal((8, 10), 21)
  other = 3.0 * normal((8, 10), 22) + 0.5
  qmodel = jq.quantize_model(Two(), [jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=act)])
  qvars = qinit(qmodel, fill_params(Two(), x), x)
  calibrated = jq.calibrate(qmodel, qvars, [x])
  stats = calibrated["quant_stats"]
  assert {"act_lo", "act_hi", "act_count"} <= set(stats["fc0"])
  assert int(stats["fc0"]["act_count"]) == 1
  # The stored range of the first layer is the batch's own (numpy), up to the grid.
  xn = np.asarray(x)
  if act.symmetric:
    np.testing.assert_allclose(stats["fc0"]["act_hi"], np.abs(xn).max(), rtol=1e-6)
    np.testing.assert_allclose(stats["fc0"]["act_lo"], -np.abs(xn).max(), rtol=1e-6)
  else:
    step = (xn.max() - xn.min()) / 15
    np.testing.assert_allclose(stats["fc0"]["act_lo"], xn.min(), atol=step / 2 + 1e-6)
    np.testing.assert_allclose(stats["fc0"]["act_hi"], xn.max(), atol=step / 2 + 1e-6)

  f = jit(lambda v, x: qmodel.apply(v, x))
  np.testing.assert_allclose(f(calibrated, x), f(qvars, x), rtol=1e-6, atol=1e-6)
  # On another batch the static ranges are used, so the outputs differ from dynamic ones.
  assert rel_err(f(calibrated, other), f(qvars, other)) > 1e-2
  # Serving keeps the static ranges: serving == QAT with them.
  smodel, svars = jq.convert(qmodel, calibrated)
  assert "act_hi" in svars["quant_stats"]["fc1"]
  assert_same_forward(run(smodel, svars, other), f(calibrated, other))


def test_calibration_statistics_over_several_batches():
  x1, x2 = normal((8, 10), 31), 2.0 * normal((8, 10), 32)
  absmax = jq.QuantSpec(bits=8, **TENSOR)
  pct = jq.QuantSpec(bits=8, calibration="percentile", percentile=90.0, **TENSOR)
  qmodel = jq.quantize_model(Two(), [jq.Rule("fc0", act=absmax), jq.Rule("fc1", act=pct)])
  qvars = qinit(qmodel, fill_params(Two(), x1), x1)
  cal = jq.calibrate(qmodel, qvars, [x1, (x2,)])
  s0, s1 = cal["quant_stats"]["fc0"], cal["quant_stats"]["fc1"]
  assert int(s0["act_count"]) == int(s1["act_count"]) == 2
  # absmax: the max over batches.
  np.testing.assert_allclose(s0["act_hi"], max(np.abs(x1).max(), np.abs(x2).max()), rtol=1e-6)
  # percentile: the mean over batches of the 90th percentile of |fc1's input|, with fc1's
  # input computed in numpy (fc0 quantizes its input per tensor, dynamically, while
  # calibrating).
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), qvars["params"])

  def fc1_input(x):
    x = np.asarray(x, np.float64)
    scale = np.abs(x).max() / 127
    xq = np.clip(np.round(x / scale), -127, 127) * scale
    return np.maximum(xq @ p["fc0"]["kernel"] + p["fc0"]["bias"], 0.0)

  expected = np.mean([np.percentile(np.abs(fc1_input(b)), 90.0) for b in (x1, x2)])
  np.testing.assert_allclose(s1["act_hi"], expected, rtol=1e-5)
  np.testing.assert_allclose(s1["act_lo"], -expected, rtol=1e-5)
  # Recalibrating forgets the earlier statistics.
  again = jq.calibrate(qmodel, cal, [x2])
  np.testing.assert_allclose(again["quant_stats"]["fc0"]["act_hi"], np.abs(x2).max(), rtol=1e-6)
  assert int(again["quant_stats"]["fc0"]["act_count"]) == 1
  with pytest.raises(ValueError, match="at least one batch"):
    jq.calibrate(qmodel, qvars, [])


def test_ema_statistics_update_only_when_mutable():
  x1, x2 = normal((8, 10), 41), 3.0 * normal((8, 10), 42)
  qmodel = jq.quantize_model(Two(), [jq.Rule("fc0", act=jq.QuantSpec(bits=8)),
                                     jq.Rule("fc1", weight=jq.QuantSpec(bits=8))])
  qvars = qinit(qmodel, fill_params(Two(), x1), x1)
  assert set(qvars["quant_stats"]["fc1"]) == {"kernel_axes"}  # weight-only: no range
  step = jit(lambda v, x: qmodel.apply(v, x, mutable=["quant_stats"]))
  y1, upd = step(qvars, x1)
  s = upd["quant_stats"]["fc0"]
  m1, m2 = np.abs(np.asarray(x1)).max(), np.abs(np.asarray(x2)).max()
  assert int(s["ema_count"]) == 1
  np.testing.assert_allclose([s["ema_lo"], s["ema_hi"]], [-m1, m1], rtol=1e-6)
  _, upd2 = step({**qvars, **upd}, x2)
  s2 = upd2["quant_stats"]["fc0"]
  assert int(s2["ema_count"]) == 2
  np.testing.assert_allclose(s2["ema_hi"], 0.99 * m1 + 0.01 * m2, rtol=1e-6)
  np.testing.assert_allclose(s2["ema_lo"], -(0.99 * m1 + 0.01 * m2), rtol=1e-6)
  # EMA statistics are not static ranges: outputs stay dynamic.
  np.testing.assert_array_equal(run(qmodel, {**qvars, **upd2}, x1), y1)
  # Not mutable: apply returns only the output and the statistics stay as they were.
  out = run(qmodel, qvars, x1)
  assert not isinstance(out, tuple)


def test_calibrating_a_per_token_activation_spec_keeps_it_dynamic():
  """A per-row ('channel') activation spec has no single static range: calibrate leaves
  such a layer dynamic (no act_lo/act_hi), instead of silently storing a per-tensor one."""
  x = normal((8, 10), 31)
  qmodel = jq.quantize_model(Two(), [jq.Rule("fc0", weight=jq.QuantSpec(bits=8),
                                             act=jq.QuantSpec(bits=8, granularity="channel")),
                                     jq.Rule("fc1", weight=jq.QuantSpec(bits=8),
                                             act=jq.QuantSpec(bits=8, granularity="tensor"))])
  qvars = qinit(qmodel, fill_params(Two(), x), x)
  stats = jq.calibrate(qmodel, qvars, [x])["quant_stats"]
  assert "act_hi" not in stats["fc0"] and "act_hi" in stats["fc1"]


def test_stochastic_weights_serve_without_a_key():
  """Stochastic rounding (int) and BinaryConnect's stochastic binarization draw at every
  QAT forward; convert rounds once to nearest, so serving needs no 'quant' rng and is the
  deterministic quantizer (sign for binary)."""
  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8)(x)

  x = jax.random.normal(jax.random.key(0), (4, 16))
  for weight in (jq.QuantSpec(bits=4, rounding="stochastic"),
                 jq.QuantSpec(format="binary", rounding="stochastic", scaled=False,
                              ste="clipped")):
    qmodel = jq.quantize_model(One(), [jq.Rule(".*", weight=weight)])
    variables = jit(qmodel.init)({"params": RBG, "quant": RBG}, x)
    smodel, svars = jq.convert(qmodel, variables)
    nearest = dataclasses.replace(weight, rounding="nearest")
    want = run(jq.quantize_model(One(), [jq.Rule(".*", weight=nearest)]), variables, x)
    np.testing.assert_allclose(np.asarray(run(smodel, svars, x)), np.asarray(want),
                               rtol=1e-6, atol=1e-6)
