"""PTQ of a (tiny, random) BERT checkpoint through the harness: every algorithm through
the rules, and the `experiments.embed` command end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxquant as jq
from experiments.pretrained import metrics, minilm, sentences, tokenizer
from experiments.pretrained.ptq_run import quantized_encoder, recipe_rules
from experiments.training.config_build import rules_from_list
from experiments.training.schema import ptq_spec, quant_rule
from configs import minilm_ptq
from tests.experiments.pretrained.test_minilm import _write_tiny_checkpoint

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LAYERS = minilm_ptq.LAYERS
G8 = lambda: minilm_ptq.group(4, size=8)  # noqa: E731 (a fresh ConfigDict per rule)
CASES = {  # in the recipes' config dialect, built by the trainer's rule builder
    "rtn": [quant_rule(LAYERS, weight=G8())],
    "gptq": [quant_rule(LAYERS, weight=G8(), ptq=ptq_spec(method="gptq"))],
    "awq": [quant_rule(LAYERS, weight=G8(), ptq=ptq_spec(method="awq", grid=4))],
    "smoothquant": [quant_rule(LAYERS, weight=minilm_ptq.w8(), act=minilm_ptq.a8_static(),
                               ptq=ptq_spec(method="smoothquant", alpha=0.8))],
    "w8a8_token": [quant_rule(LAYERS, weight=minilm_ptq.w8(), act=minilm_ptq.a8_token())],
    "w8_embed8": minilm_ptq.get_config("w8").quant.rules,
    "w4_full_range_gptq": [quant_rule(LAYERS, weight=minilm_ptq.group(4, size=8, full_range=True),
                                      ptq=ptq_spec(method="gptq"))],
}


def test_recipe_rules_come_from_the_config_and_refuse_a_variant_override():
  rules = recipe_rules(minilm_ptq.get_config("w8a8_smoothquant"))
  assert rules[0].ptq == jq.PTQ(method="smoothquant", alpha=0.8)
  assert rules[0].act == jq.QuantSpec(bits=8, granularity="tensor", static=True)
  assert rules[1] == jq.Rule(minilm_ptq.EMBED, weight=jq.QuantSpec(bits=8))
  assert recipe_rules(minilm_ptq.get_config("float")) == []
  with pytest.raises(ValueError, match="configs/minilm_ptq.py:VARIANT"):
    recipe_rules(minilm_ptq.get_config("w8"), {"variant": "w4_g128_gptq"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_bert_ptq"))
  _write_tiny_checkpoint(path)
  return path


def _config(path):
  c = minilm_ptq.get_config("w8a8")
  c.model_dir, c.n_calib, c.n_eval, c.batch_size = path, 16, 24, 8
  return c


@pytest.fixture(scope="module")
def float_embeddings(tiny_dir):
  """The float model's embeddings of the evaluation sentences, shared by the cases."""
  config = _config(tiny_dir)
  model, params, tok = minilm.load(tiny_dir)
  return tokenizer.embed(model.apply, {"params": params}, tok,
                         sentences.evaluation(config.n_eval), config.batch_size)


# The harness path of a PTQ method through calibrate and convert (GPTQ) and of the
# embedding table. The other cases repeat that path with other algorithms, each already
# proven against a numpy reference in tests/ptq/ (SmoothQuant's rescaled inputs and static
# ranges through the rules in tests/ptq/test_rules.py), so they run with the slow tests.
DEFAULT_CASES = ("gptq", "w8_embed8")


@pytest.mark.parametrize("case", [
    c if c in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_every_algorithm_runs_on_a_bert_and_stays_close_to_float(tiny_dir, float_embeddings,
                                                                case):
  config = _config(tiny_dir)
  rules = rules_from_list(CASES[case])
  _, _, tok, smodel, svars = quantized_encoder(config, rules, progress=False)
  kernels = [v for v in __import__("jax").tree.leaves(
      svars["params"], is_leaf=lambda x: isinstance(x, jq.QTensor)) if isinstance(v, jq.QTensor)]
  embed = case == "w8_embed8"  # the word embedding too, per-row int8
  assert len(kernels) == 6 * 2 + embed  # q, k, v, out, fc1, fc2 in each of the 2 blocks
  assert isinstance(svars["params"]["token_embed"]["embedding"], jq.QTensor) == embed
  evaluation = sentences.evaluation(config.n_eval)
  e_q = tokenizer.embed(smodel.apply, svars, tok, evaluation, config.batch_size)
  result = metrics.compare(float_embeddings, e_q)
  assert result["cos_mean"] > 0.9, result
  assert result["cos_mean"] < 1.0  # quantization did happen
  if case in ("awq", "smoothquant"):
    assert "input_scale" in svars["quant_stats"]["block_0"]["mlp"]["fc1"]


def test_embed_command_writes_normalized_float32_rows_in_input_order(tiny_dir, tmp_path):
  lines = ["The quick brown fox.", "", "a dog jumps over the lazy foxes!", "lists ? returned"]
  src, out = tmp_path / "in.txt", tmp_path / "out.npy"
  src.write_text("\n".join(lines), encoding="utf-8")
  cmd = [sys.executable, "-m", "experiments.embed", "--config=configs/minilm_ptq.py:w8a8",
         f"--config.model_dir={tiny_dir}", "--config.n_calib=16", "--config.batch_size=2",
         f"--input={src}", f"--output={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  e = np.load(out)
  assert e.dtype == np.float32 and e.shape[0] == len(lines)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
  config = _config(tiny_dir)
  model, params, tok, _, _ = quantized_encoder(config, [], progress=False)
  ref = tokenizer.embed(model.apply, {"params": params}, tok, lines, 2)
  assert metrics.compare(ref, e)["cos_mean"] > 0.9  # row i is line i
