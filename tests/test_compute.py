"""jq.compute_report: MACs against closed forms (dense, conv, einsum, scan, attention),
bit widths from the rules, BOPs = MACs x b_w x b_a."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq

def shapes(qmodel, x):
  """The variables' shapes only (compute_report traces; nothing needs values)."""
  return jax.eval_shape(lambda k: qmodel.init(k, x), jax.random.key(0))


W4A8 = jq.Rule(".*", weight=jq.QuantSpec(bits=4), act=jq.QuantSpec(bits=8))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):  # x [B, L, C]
    h = nn.Conv(6, (3,), strides=(2,), padding="VALID", feature_group_count=1, name="conv")(x)
    h = nn.Conv(6, (3,), padding="SAME", feature_group_count=3, name="grouped")(h)
    h = h.reshape(h.shape[0], -1)
    h = nn.Dense(7, name="fc")(h)
    return nn.Einsum((7, 5), "bk,kn->bn", name="ein")(h)


def test_macs_match_closed_forms_and_bits_follow_the_rules():
  x = jnp.ones((2, 11, 4))
  rules = [jq.Rule("conv", weight=jq.QuantSpec(format="binary"), act=jq.QuantSpec(bits=8)),
           jq.Rule("fc", weight=jq.QuantSpec(bits=3)),  # weight-only: activations float
           jq.Rule("grouped", weight=jq.QuantSpec(format="ternary"),
                   act=jq.QuantSpec(format="fp8_e4m3"), mode="fake")]
  q = jq.quantize_model(Net(), rules)
  report = jq.compute_report(q, shapes(q, x), x)
  L1 = (11 - 3) // 2 + 1  # VALID, stride 2
  expected = {
      "conv": (2 * L1 * 6 * 3 * 4, 1, 8),
      "grouped": (2 * L1 * 6 * 3 * (6 // 3), 2, 8),
      "fc": (2 * 7 * L1 * 6, 3, 32),
      "ein": (2 * 5 * 7, 32, 32),  # no rule matches it
  }
  assert [l.path for l in report.layers] == list(expected)
  for path, (macs, wb, ab) in expected.items():
    row = report.layer(path)
    assert (row.macs, row.weight_bits, row.act_bits) == (macs, wb, ab), path
    assert row.bops == macs * wb * ab and row.float_bops == macs * 1024
  assert report.total_macs == sum(m for m, _, _ in expected.values())
  assert report.ratio == pytest.approx(report.total_float_bops / report.total_bops)
  assert "total" in str(report) and "grouped" in str(report)
  with pytest.raises(KeyError, match="rows"):
    report.layer("nope")


def test_einsum_layer_and_batch_scaling():
  q = jq.quantize_model(Net(), [W4A8])
  small, large = jnp.ones((1, 11, 4)), jnp.ones((8, 11, 4))
  v = shapes(q, small)
  a, b = jq.compute_report(q, v, small), jq.compute_report(q, v, large)
  assert b.total_macs == 8 * a.total_macs
  assert a.ratio == pytest.approx(32 * 32 / (4 * 8))
  assert a.layer("ein").weight_bits == 4  # jnp.einsum's inner name scope -> the layer


class Looped(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3, name="cell")
    h = dense(x)
    def body(carry, _):
      return carry @ jnp.eye(3), None  # a float contraction in a scan, 5 times
    h, _ = jax.lax.scan(body, h, None, length=5)
    return h


def test_scan_multiplies_and_attention_products_count_as_float():
  x = jnp.ones((2, 3))
  q = jq.quantize_model(Looped(), [W4A8])
  report = jq.compute_report(q, shapes(q, x), x)
  assert report.layer("cell").macs == 2 * 3 * 3
  (other,) = [l for l in report.layers if l.path != "cell"]
  assert other.macs == 5 * 2 * 3 * 3 and (other.weight_bits, other.act_bits) == (32, 32)


def test_while_loop_contraction_is_refused():
  class W(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]),
                                (0, x))[1]
  x = jnp.ones((3, 3))
  q = jq.quantize_model(W(), [W4A8])
  with pytest.raises(ValueError, match="while_loop"):
    jq.compute_report(q, {}, x)


def test_needs_a_quantized_model():
  with pytest.raises(ValueError, match="quantize_model"):
    jq.compute_report(Net(), {}, jnp.ones((1, 11, 4)))
