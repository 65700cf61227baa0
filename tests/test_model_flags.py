"""A model's own Python flags (`train=False`) through every entry point that runs it:
calibrate, convert, compute_report, to_integer and export_serving, on a small ResNet
written the way the flax ImageNet example writes it (BatchNorm with
`use_running_average=not train`, layers made with `functools.partial`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.test_third_party import ResNet as ExampleResNet
from tests.test_third_party import ResNetBlock

# The flax ImageNet example's ResNet, one tiny stage (jq.convert's example-input trace runs
# the model eagerly, so its time grows with the layer count), a 3x3 stem and named blocks.
ResNet = functools.partial(ExampleResNet, stage_sizes=(1,), block_cls=ResNetBlock,
                           num_classes=5, num_filters=4, stem_kernel=3, named=True)


ACT = jq.QuantSpec(bits=8, granularity="tensor", symmetric=False, static=True)
RULES = [jq.Rule(".*", weight=jq.QuantSpec(bits=8), act=ACT)]
X = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)


@pytest.fixture(scope="module")
def trained():
  """Float variables whose running statistics differ from any one batch's."""
  model = ResNet()
  key = jax.random.key(0, impl="unsafe_rbg")  # compiles fast
  v = jax.jit(functools.partial(model.init, train=False))(key, X)
  _, upd = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      v, X * 3.0 + 1.0)
  return model, {"params": v["params"], "batch_stats": upd["batch_stats"]}


def test_flag_in_a_batch_is_traced_and_fails(trained):
  """The issue's failure: a flag passed as part of the batch is a traced value."""
  model, v = trained
  qmodel = jq.quantize_model(model, RULES)
  with pytest.raises(jax.errors.TracerBoolConversionError):
    jq.calibrate(qmodel, v, [(X, False)])


def test_calibrate_and_convert_take_model_flags(trained):
  model, v = trained
  qmodel = jq.quantize_model(model, RULES)
  cal = jq.calibrate(qmodel, v, [X], forward="float", train=False)
  np.testing.assert_array_equal(  # eval mode: running statistics untouched
      cal["batch_stats"]["bn_init"]["mean"], v["batch_stats"]["bn_init"]["mean"])
  # The head's static range is that of the eval-mode float model's pooled features.
  _, inter = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True))(
      v, X)
  feats = np.asarray(inter["intermediates"]["block_0_0"]["__call__"][0]).mean(axis=(1, 2))
  head = cal["quant_stats"]["head"]
  np.testing.assert_allclose(head["act_hi"], feats.max(), rtol=1e-5)
  np.testing.assert_allclose(head["act_lo"], min(feats.min(), 0.0), rtol=1e-5, atol=1e-7)
  # ... not the training-mode model's (batch statistics), which a traced flag would give.
  _, inter_t = jax.jit(functools.partial(model.apply, train=True, capture_intermediates=True,
                                         mutable=["batch_stats"]))(v, X)
  feats_t = np.asarray(inter_t["intermediates"]["block_0_0"]["__call__"][0]).mean(axis=(1, 2))
  assert abs(feats_t.max() - feats.max()) > 1e-3

  # convert traces the model with its flags when the variables hold no layouts.
  _, served = jq.convert(qmodel, {k: cal[k] for k in ("params", "batch_stats")}
                         | {"quant_stats": _without_layouts(cal["quant_stats"])}, X,
                         train=False)
  assert isinstance(served["params"]["head"]["kernel"], jq.QTensor)
  assert isinstance(served["params"]["block_0_0"]["Conv_0"]["kernel"], jq.QTensor)
  apply = jax.jit(functools.partial(qmodel.apply, train=False))  # eager compiles op by op
  y_serve, y_qat = apply(served, X), apply(cal, X)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-5, atol=1e-5)

  report = jq.compute_report(qmodel, cal, X, train=False)
  assert report.layer("head").weight_bits == 8 and report.layer("head").act_bits == 8


def test_export_takes_model_flags(trained, tmp_path):
  model, v = trained
  qmodel = jq.quantize_model(model, RULES)
  cal = jq.calibrate(qmodel, v, [X], train=False)
  smodel, served = jq.convert(qmodel, cal)
  path = str(tmp_path / "resnet.jqx")
  jq.export_serving(smodel, served, X, path, batch_polymorphic=False, train=False)
  np.testing.assert_array_equal(
      jq.load_exported(path)(X), jax.jit(lambda v, x: smodel.apply(v, x, train=False))(
          served, X))


def _without_layouts(stats):
  """'quant_stats' with the recorded kernel layouts dropped (as after a float restore)."""
  if not isinstance(stats, dict):
    return stats
  return {k: _without_layouts(v) for k, v in stats.items() if k != "kernel_axes"}
