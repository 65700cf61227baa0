"""A BERT-style block through `jq.to_integer`: the attention products ('matmul'), the
I-BERT softmax and GELU ops (ops/softmax.py, ops/gelu.py) and LayerNorm ('norm'), the
JAX program bit-exact against the numpy runtime and close to the float model."""
import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.integer_only import ops
from tests.integer_only.int_helpers import float_dtypes_in, float_in_program, numpy_runtime

D, H, T, F = 32, 4, 8, 64


class TinyBlock(nn.Module):
  """LayerNorm → multi-head self-attention (einsums, softmax) → LayerNorm → erf-GELU MLP
  → LayerNorm → mean over tokens, as a post-norm BERT block computes them."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="embed_ln")(x)
    b, t, d = x.shape
    q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, H, d // H) for n in ("query", "key", "value"))
    q = q / jnp.sqrt(jnp.float32(d // H))
    scores = jnp.einsum("bthk,bshk->bhts", q, k)
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhts,bshk->bthk", probs, v).reshape(b, t, d)
    a = nn.LayerNorm(name="ln_1")(x + nn.Dense(d, name="out")(ctx))
    m = nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(F, name="fc1")(a), approximate=False))
    h = nn.LayerNorm(name="ln_2")(a + m)
    return jnp.mean(h, axis=1)


@pytest.fixture(scope="module")
def block():
  model = TinyBlock()
  rng = np.random.default_rng(0)
  calib = [rng.normal(size=(8, T, D)).astype(np.float32) for _ in range(4)]
  variables = jax.jit(model.init)(jax.random.key(0), calib[0])  # one compile, not one per op
  program = jq.to_integer(model, variables, calib)
  x = rng.normal(size=(16, T, D)).astype(np.float32)
  return model, variables, program, x


def test_block_lowers_to_the_new_ops(block):
  _, _, program, _ = block
  kinds = [op["op"] for op in program.graph.ops]
  assert kinds.count("matmul") == 2 and kinds.count("softmax") == 1
  assert kinds.count("gelu") == 1 and kinds.count("norm") == 3


def test_jax_program_equals_numpy_runtime(block, tmp_path):
  _, _, program, x = block
  x_q = np.asarray(program.quantize_input(x))
  program.save(str(tmp_path))
  rt = numpy_runtime()
  np.testing.assert_array_equal(np.asarray(program.run(x_q)),
                                rt.run(rt.load(str(tmp_path)), x_q))


def test_block_close_to_float(block):
  # int8 activations at every tensor (≈ 8 requantizations in series, each ≤ half a step
  # of its range) plus i-exp / i-erf's polynomial errors (I-BERT reports < 1e-2 for
  # both): the per-row cosine to float stays above 0.99 on inputs outside calibration.
  model, variables, program, x = block
  ref = np.asarray(model.apply(variables, x), np.float64)
  got = np.asarray(program(x), np.float64) * program.output_scale
  cos = np.sum(ref * got, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
  assert cos.min() >= 0.99, cos


def test_program_jaxpr_holds_no_float(block):
  _, _, program, x = block
  x_q = program.quantize_input(x)
  closed = jax.make_jaxpr(program.run)(x_q)
  assert float_dtypes_in(closed) == []


def test_softmax_pattern_needs_the_last_axis():
  class AxisOne(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jax.nn.softmax(nn.Dense(4)(x), axis=1).sum(axis=1)

  x = np.random.default_rng(1).normal(size=(4, 3, 4)).astype(np.float32)
  variables = AxisOne().init(jax.random.key(0), x)
  with pytest.raises(jq.IntegerOnlyError, match="max over an axis"):
    jq.to_integer(AxisOne(), variables, [x])


V, PAD = 50, 0


class TinyBert(nn.Module):
  """Token + position embeddings → LayerNorm → self-attention with the key padding mask
  of the ids → LayerNorm → erf-GELU MLP → LayerNorm → Σ over unpadded tokens."""

  @nn.compact
  def __call__(self, ids):
    b, t = ids.shape
    keep = (ids != PAD).astype(jnp.float32)
    x = nn.Embed(V, D, name="token_embed")(ids)
    x = x + nn.Embed(T, D, name="pos_embed")(jnp.arange(t)[None, :])
    x = nn.LayerNorm(name="embed_ln")(x)
    q, k, v = (nn.Dense(D, name=n)(x).reshape(b, t, H, D // H) for n in ("query", "key", "value"))
    scores = jnp.einsum("bthk,bshk->bhts", q / jnp.sqrt(jnp.float32(D // H)), k)
    scores = jnp.where((keep > 0)[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    ctx = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, D)
    a = nn.LayerNorm(name="ln_1")(x + nn.Dense(D, name="out")(ctx))
    m = nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(F, name="fc1")(a), approximate=False))
    h = nn.LayerNorm(name="ln_2")(a + m)
    return jnp.sum(h * keep[:, :, None], axis=1)


def _ids(rng, n):
  """Token ids with 1..T real tokens per row, then padding."""
  ids = rng.integers(1, V, size=(n, T)).astype(np.int32)
  lengths = rng.integers(1, T + 1, size=n)
  ids[np.arange(T)[None, :] >= lengths[:, None]] = PAD
  return ids


@pytest.fixture(scope="module")
def bert():
  model = TinyBert()
  rng = np.random.default_rng(0)
  calib = [_ids(rng, 8) for _ in range(4)]
  variables = jax.jit(model.init)(jax.random.key(0), calib[0])  # one compile, not one per op
  program = jq.to_integer(model, variables, calib)
  return model, variables, program, _ids(rng, 16)


def test_bert_ids_program_matches_numpy_runtime_and_float(bert, tmp_path):
  model, variables, program, ids = bert
  kinds = [op["op"] for op in program.graph.ops]
  assert {"embed", "masked_softmax", "masked_sum"} <= set(kinds)
  program.save(str(tmp_path))
  rt = numpy_runtime()
  got = np.asarray(program(ids))
  np.testing.assert_array_equal(got, rt.run(rt.load(str(tmp_path)), ids))
  ref = np.asarray(model.apply(variables, ids), np.float64)
  got = got.astype(np.float64) * program.output_scale
  cos = np.sum(ref * got, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
  assert cos.min() >= 0.99, cos  # the bound of test_block_close_to_float, with padding


def test_padded_tokens_take_no_part(bert):
  # Three real tokens then padding vs the same row with the padding's position embedding
  # made real by a fourth token: only the second may change (masking is exact in ints).
  # Both batches have the fixture's batch size, so the program compiled for it is reused.
  _, _, program, ids = bert
  row = ids.copy()
  row[:2] = PAD
  row[:2, :3] = [[5, 7, 9], [5, 7, 9]]
  row[1, 3] = 11
  out = np.asarray(program(row))
  assert not np.array_equal(out[0], out[1])
  again = ids[::-1].copy()  # other rows around it, at another position in the batch
  again[5] = PAD
  again[5, :3] = [5, 7, 9]  # explicit: identical padding → identical result, batch-independent
  np.testing.assert_array_equal(np.asarray(program(again))[5], out[0])


def test_ids_program_has_no_float_op(bert, tmp_path):
  _, _, program, ids = bert
  program.save(str(tmp_path))
  assert float_in_program(program, program.quantize_input(ids), str(tmp_path)) == []


def test_no_float_walk_finds_a_float(bert, tmp_path):
  # The walk itself can fail: a float field planted in one op is reported.
  _, _, program, ids = bert
  ops_ = [dict(op) for op in program.graph.ops]
  ops_[0]["scale"] = 0.5
  planted = jq.IntegerProgram(dataclasses.replace(program.graph, ops=tuple(ops_)))
  planted.save(str(tmp_path))
  found = float_in_program(planted, planted.quantize_input(ids), str(tmp_path))
  assert any("field scale=0.5" in f for f in found)
