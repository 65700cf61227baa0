"""Quantized `nn.Embed`: per-row tables (gather) and the tied head (`attend`), QAT and
serving, against a numpy reference of per-row quantization."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.np_reference import np_quant

V, D = 40, 16


class TiedLM(nn.Module):
  """ids → embed → Dense → logits through the same table (`attend`)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, name="embed")
    h = nn.Dense(D, name="mix")(embed(ids))
    return embed(ids), embed.attend(h), h


IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(3, 5)), jnp.int32)
W8 = jq.QuantSpec(bits=8)
W4G = jq.QuantSpec(bits=4, granularity="group", group_size=8, symmetric=False)
A8 = jq.QuantSpec(bits=8, granularity="channel")
SPECS = {"int8_row": W8, "int4_g8_asym": W4G,
         "int4_full_range": jq.QuantSpec(bits=4, full_range=True)}


def _table(seed=1):
  """A random table whose largest |x| in each row (and each group of 8) is positive:
  no value sits exactly half-way between two full-range codes."""
  t = np.random.default_rng(seed).normal(size=(V, D)).astype(np.float32)
  for c in range(0, D, 8):
    t[:, c] = 1.25 * np.max(np.abs(t[:, c:c + 8]), axis=1)
  return jnp.asarray(t)


def _variables(rules):
  qmodel = jq.quantize_model(TiedLM(), rules)
  # jit (eager compiles op by op) and a fast-compiling PRNG.
  variables = jax.jit(qmodel.init)(jax.random.key(0, impl="unsafe_rbg"), IDS)
  variables["params"]["embed"]["embedding"] = _table()
  return qmodel, variables


@pytest.mark.parametrize("name", list(SPECS))
def test_gather_matches_numpy_per_row_quantization_and_serving_is_bit_identical(name):
  spec = SPECS[name]
  qmodel, variables = _variables([jq.Rule("embed", weight=spec)])
  table = np.asarray(variables["params"]["embed"]["embedding"])
  rows_qat, logits_qat, h = jax.jit(qmodel.apply)(variables, IDS)
  ref_table = np_quant(table, spec, (1,))  # one scale per row (per group of the row)
  np.testing.assert_allclose(np.asarray(rows_qat), ref_table[np.asarray(IDS)], rtol=1e-6,
                             atol=1e-7)
  # attend (weight-only): query · deq(table)ᵀ.
  np.testing.assert_allclose(np.asarray(logits_qat), np.asarray(h) @ ref_table.T, rtol=1e-4,
                             atol=1e-4)
  smodel, svars = jq.convert(qmodel, variables)
  stored = svars["params"]["embed"]["embedding"]
  assert isinstance(stored, jq.QTensor) and stored.shape == (V, D)
  assert stored.packed == (spec.bits == 4)
  rows_srv, logits_srv, _ = jax.jit(smodel.apply)(svars, IDS)
  np.testing.assert_array_equal(np.asarray(rows_srv), np.asarray(rows_qat))
  np.testing.assert_allclose(np.asarray(logits_srv), np.asarray(logits_qat), rtol=1e-5, atol=1e-5)
  # Stored bytes, exactly: codes (packed to 4 bits), float32 scales, int32 zero points.
  groups = D // spec.group_size if spec.granularity == "group" else 1
  want = V * D * spec.storage_bits // 8 + V * groups * 4 * (1 if spec.symmetric else 2)
  row = jq.size_report(svars).layer("embed/embedding")
  assert (row.float_bytes, row.quantized_bytes) == (V * D * 4, want)


def test_gather_rows_only_touches_the_rows_it_looks_up():
  qmodel, variables = _variables([jq.Rule("embed", weight=W4G)])
  _, svars = jq.convert(qmodel, variables)
  stored = svars["params"]["embed"]["embedding"]
  from jaxquant.linen_embed import gather_rows
  ids = jnp.asarray([[3, 3, 39], [0, 7, 1]])
  np.testing.assert_array_equal(np.asarray(gather_rows(stored, ids)),
                                np.asarray(stored.dequantize())[np.asarray(ids)])
  # Its jaxpr gathers ids.size byte rows of D and unpacks only those, never the V·D table.
  jaxpr = str(jax.make_jaxpr(lambda q: gather_rows(q, ids))(stored))
  assert f"i8[2,3,{D}]" in jaxpr and f"{V * D}]" not in jaxpr and f"[{V},{D}]" not in jaxpr


def test_tied_head_with_act_spec_runs_the_int_dot_against_numpy():
  qmodel, variables = _variables([jq.Rule("embed", weight=W8, act=A8)])
  table = np.asarray(variables["params"]["embed"]["embedding"])
  _, logits, h = jax.jit(qmodel.apply)(variables, IDS)
  h = np.asarray(h)
  ref = np_quant(h, A8, (2,)) @ np_quant(table, W8, (1,)).T
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
  smodel, svars = jq.convert(qmodel, variables)
  np.testing.assert_allclose(np.asarray(jax.jit(smodel.apply)(svars, IDS)[1]), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)


def test_qat_gradient_reaches_the_table_straight_through():
  qmodel, variables = _variables([jq.Rule("embed", weight=W8)])
  loss = lambda p: jnp.sum(qmodel.apply({**variables, "params": p}, IDS)[0])
  g = jax.jit(jax.grad(loss))(variables["params"])["embed"]["embedding"]
  counts = np.bincount(np.asarray(IDS).ravel(), minlength=V)
  # The attend path is not in this loss: each row's gradient is its lookup count.
  np.testing.assert_allclose(np.asarray(g), np.repeat(counts[:, None], D, axis=1), rtol=1e-6)


def test_embed_rules_refuse_ptq_and_bad_groups_naming_the_layer():
  with pytest.raises(ValueError, match="'embed'.*nn.Embed"):
    _variables([jq.Rule("embed", weight=W8, ptq=jq.PTQ(method="gptq"))])
  with pytest.raises(ValueError, match="'embed'.*group_size=5"):
    _variables([jq.Rule("embed", weight=jq.QuantSpec(bits=4, granularity="group",
                                                     group_size=5))])


def test_eager_attend_runs_one_compiled_contraction_equal_to_the_jitted_model():
  """Called outside a trace, the tied head's contraction (`attend`) runs as one cached
  compiled call, like the other layers' (not op by op), with the jitted model's output:
  in the eager init, the QAT apply and serving ("mix" is a float layer: attend is the
  only quantized contraction)."""
  from jaxquant import dot as qdot  # pylint: disable=import-outside-toplevel
  cache = qdot.dot_general_compiled.jitted._cache_size  # pylint: disable=protected-access
  ids = jnp.asarray(np.random.default_rng(3).integers(0, V, size=(2, 7)), jnp.int32)
  qmodel = jq.quantize_model(TiedLM(), [jq.Rule("embed", weight=W8, act=A8)])
  qdot.dot_general_compiled.jitted.clear_cache()  # whatever ran before in this worker
  before = cache()
  variables = qmodel.init(jax.random.key(0, impl="unsafe_rbg"), ids)  # a fast PRNG
  assert cache() == before + 1
  _, svars = jq.convert(qmodel, variables)
  for v, new_entries in ((variables, 0), (svars, 1)):
    before = cache()
    logits = qmodel.apply(v, ids)[1]
    assert cache() == before + new_entries
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(jax.jit(qmodel.apply)(v, ids)[1]))
