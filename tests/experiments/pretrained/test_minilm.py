"""The MiniLM loader and encoder: a tiny random BERT in the checkpoint's file format against
a numpy BERT written from the equations, and the real model against sentence-transformers."""
import json
import os
import warnings

import jax
import numpy as np
import pytest
from scipy.special import erf

from flax import traverse_util

import jaxquant as jq
from experiments.pretrained import minilm
from experiments.pretrained import tokenizer as tk

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "minilm_reference.npz")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "return", "a",
         "new", "list", "##s", "##ed", ".", ",", "!", "?"]
D, H, F, L, MAXPOS = 8, 2, 16, 2, 12


def _write_tiny_checkpoint(path, seed=0):
  """config.json + model.safetensors + tokenizer.json of a random 2-layer BERT."""
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(os.path.join(path, "tokenizer.json"))
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.5
  t = {"bert.embeddings.word_embeddings.weight": r(len(vocab), D),  # BertFor* prefix
       "bert.embeddings.position_embeddings.weight": r(MAXPOS, D),
       "bert.embeddings.token_type_embeddings.weight": r(2, D),
       "bert.embeddings.LayerNorm.weight": 1 + r(D), "bert.embeddings.LayerNorm.bias": r(D)}
  for i in range(L):
    p = f"bert.encoder.layer.{i}."
    for name in ("query", "key", "value"):
      t[p + f"attention.self.{name}.weight"], t[p + f"attention.self.{name}.bias"] = r(D, D), r(D)
    t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"] = r(D, D), r(D)
    t[p + "attention.output.LayerNorm.weight"] = 1 + r(D)
    t[p + "attention.output.LayerNorm.bias"] = r(D)
    t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = r(F, D), r(F)
    t[p + "output.dense.weight"], t[p + "output.dense.bias"] = r(D, F), r(D)
    t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"] = 1 + r(D), r(D)
  save_file(t, os.path.join(path, "model.safetensors"))
  config = {"hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H,
            "intermediate_size": F, "max_position_embeddings": MAXPOS, "vocab_size": len(vocab),
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 10}, f)
  return {k[len("bert."):]: v.astype(np.float64) for k, v in t.items()}


def np_bert_embed(t, ids):
  """Numpy BERT (Devlin et al. 2019: post-norm, erf GELU) + mean pooling + L2 norm, for one
  unpadded sentence."""
  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * t[p + ".weight"] + t[p + ".bias"]

  def lin(x, p):
    return x @ t[p + ".weight"].T + t[p + ".bias"]

  n = len(ids)
  x = ln(t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n]
         + t["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
  dh = D // H
  for i in range(L):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{m}").reshape(n, H, dh) for m in ("query", "key", "value"))
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(dh)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("hts,shd->thd", probs, v).reshape(n, D)
    a = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = lin(a, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = ln(a + lin(h, p + "output.dense"), p + "output.LayerNorm")
  e = x.mean(0)
  return e / np.linalg.norm(e)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  tensors = _write_tiny_checkpoint(path)
  model, params, tok = minilm.load(path)
  return path, tensors, model, params, tok


def test_tiny_checkpoint_matches_numpy_bert(tiny):
  _, tensors, model, params, tok = tiny
  sents = ["The quick brown fox.", "a dog jumps over the lazy foxes!", "lists ? returned"]
  emb = tk.embed(model.apply, {"params": params}, tok, sents, batch_size=2, bucket=4)
  assert emb.shape == (3, D)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  for s, e in zip(sents, emb):
    (ids,) = tok.token_ids([s])
    np.testing.assert_allclose(e, np_bert_embed(tensors, ids), atol=2e-5)


def test_padding_and_batch_order_do_not_change_embeddings(tiny):
  _, _, model, params, tok = tiny
  sents = ["fox", "the quick brown fox jumps over the lazy dog", "new list", "dog."]
  batched = tk.embed(model.apply, {"params": params}, tok, sents, batch_size=3, bucket=8)
  for s, e in zip(sents, batched):
    alone = tk.embed(model.apply, {"params": params}, tok, [s], batch_size=1, bucket=1)
    np.testing.assert_allclose(e, alone[0], atol=1e-5)


def test_truncation_and_tokens(tiny):
  path, _, _, _, tok = tiny
  assert tok.max_length == 10  # from sentence_bert_config.json
  (ids,) = tok.token_ids(["the " * 20])
  assert len(ids) == 10 and ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP]
  (ids,) = tok.token_ids(["Dogs"])  # lower-cased, WordPiece ##s
  assert ids == [2, 5 + WORDS.index("dog"), 5 + WORDS.index("##s"), 3]
  (ids,) = tok.token_ids(["Foxes"])  # no '##es' piece: the whole word is [UNK]
  assert ids == [2, 1, 3]
  with pytest.raises(ValueError, match="one str"):
    tok.token_ids("a sentence")


def test_every_dense_layer_is_reachable_by_path(tiny):
  _, _, model, params, tok = tiny
  ids, mask = tok(["the quick brown fox"])
  rules = [jq.Rule(r"block_\d+/attn/(query|key|value|out)", weight=jq.QuantSpec(bits=8)),
           jq.Rule(r"block_\d+/mlp/fc[12]", weight=jq.QuantSpec(bits=8))]
  qmodel = jq.quantize_model(model, rules)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a rule that matches nothing warns
    warnings.simplefilter("ignore", jq.FloatLayersWarning)  # the embeddings stay float
    # Jitted (here and below): one compile each instead of one per op; the rules'
    # warnings are raised while tracing.
    variables = jax.jit(qmodel.init)(jax.random.key(0), ids, mask)
  stats = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
  assert len([k for k in stats if k.endswith("/kernel_axes")]) == 6 * L  # layouts recorded
  q = jax.jit(qmodel.apply)({**variables, "params": params}, ids, mask)
  f = jax.jit(model.apply)({"params": params}, ids, mask)
  assert float(np.sum(np.asarray(q) * np.asarray(f))) > 0.99  # int8 weights: close


def test_bad_checkpoints_name_the_problem(tiny, tmp_path):
  path, *_ = tiny
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in ("model.safetensors", "tokenizer.json"):
    os.symlink(os.path.join(path, name), bad / name)
  (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act"):
    minilm.load(str(bad))
  (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": F + 1}))
  with pytest.raises(ValueError, match="intermediate.dense.weight.*shape"):
    minilm.load(str(bad))


def test_real_model_matches_sentence_transformers():
  try:
    model_dir = minilm.default_model_dir()
  except ImportError as e:
    if os.environ.get("CI"):  # CI installs the weights (.ci/run): missing is a failure
      pytest.fail(str(e))
    pytest.skip(str(e))
  ref = np.load(FIXTURE)
  sents = [str(s) for s in ref["sentences"]]
  model, params, tok = minilm.load(model_dir)
  emb = tk.embed(model.apply, {"params": params}, tok, sents, batch_size=8)
  cos = np.sum(emb * ref["embeddings"], axis=1) / np.linalg.norm(ref["embeddings"], axis=1)
  assert cos.min() >= 0.99999, cos
