"""Tiny byte-level transformers: a GPT-style causal LM and a BERT-style encoder.

Both use the same pre-norm block (GPT-2, Radford et al. 2019; pre-norm placement as in
Xiong et al. 2020): `x + attn(LN(x))`, then `x + mlp(LN(x))`, with a final LayerNorm.
BERT (Devlin et al. 2019) is post-norm; we use pre-norm for it too so the two models
share one block and train stably without warmup tricks. Weights live only in standard
layers (nn.Embed, nn.DenseGeneral, nn.Dense, nn.LayerNorm) so quantization can intercept
them; the attention products themselves are `jnp.einsum` calls inside `SelfAttention`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
  """Multi-head self-attention, `softmax(Q K^T / sqrt(d_head)) V`, optionally causal.

  Attributes:
    num_heads: attention heads; must divide the model width.
    causal: if True, position t attends only to positions <= t.

  Module paths: `query`, `key`, `value` (DenseGeneral D -> [H, Dh]) and `out`
  (DenseGeneral [H, Dh] -> D).
  """

  num_heads: int
  causal: bool

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, mask_BxT: Optional[jax.Array] = None) -> jax.Array:
    """Maps `[B, T, D]` to `[B, T, D]`; `mask_BxT` (optional, 1 = a real token) is a
    key padding mask: padded positions get no attention weight."""
    d_model = x_BxTxD.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={d_model}")
    head_dim = d_model // self.num_heads
    heads = (self.num_heads, head_dim)
    q_BxTxHxK = nn.DenseGeneral(heads, name="query")(x_BxTxD)
    k_BxTxHxK = nn.DenseGeneral(heads, name="key")(x_BxTxD)
    v_BxTxHxK = nn.DenseGeneral(heads, name="value")(x_BxTxD)

    q_BxTxHxK = q_BxTxHxK / jnp.sqrt(jnp.asarray(head_dim, q_BxTxHxK.dtype))
    scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK)
    # Softmax in float32 even if activations are lower precision.
    scores_BxHxTxS = scores_BxHxTxS.astype(jnp.float32)
    allowed = None
    if self.causal:
      seq_len = x_BxTxD.shape[1]
      allowed = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None, :, :]
    if mask_BxT is not None:
      keep_Bx1x1xS = (mask_BxT > 0)[:, None, None, :]
      allowed = keep_Bx1x1xS if allowed is None else allowed & keep_Bx1x1xS
    if allowed is not None:
      # Finite fill (not -inf): a fully masked row gives uniform weights, not NaN.
      scores_BxHxTxS = jnp.where(allowed, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxTxHxK.dtype)
    ctx_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxTxHxK)
    return nn.DenseGeneral(d_model, axis=(-2, -1), name="out")(ctx_BxTxHxK)


class FeedForward(nn.Module):
  """Position-wise MLP: Dense(mlp_ratio * D) -> GELU -> Dense(D).

  Module paths: `fc1`, `fc2`.
  """

  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    """Maps `[B, T, D]` to `[B, T, D]`."""
    d_model = x_BxTxD.shape[-1]
    h = nn.gelu(nn.Dense(self.mlp_ratio * d_model, name="fc1")(x_BxTxD))
    return nn.Dense(d_model, name="fc2")(h)


class TransformerBlock(nn.Module):
  """Pre-norm residual block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`.

  Module paths: `ln_1`, `attn/{query,key,value,out}`, `ln_2`, `mlp/{fc1,fc2}`.
  """

  num_heads: int
  causal: bool
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    """Maps `[B, T, D]` to `[B, T, D]`."""
    h = nn.LayerNorm(name="ln_1")(x_BxTxD)
    x_BxTxD = x_BxTxD + SelfAttention(self.num_heads, self.causal, name="attn")(h)
    h = nn.LayerNorm(name="ln_2")(x_BxTxD)
    return x_BxTxD + FeedForward(self.mlp_ratio, name="mlp")(h)


def _encode(tokens_BxT: jax.Array, *, vocab_size: int, d_model: int, num_heads: int,
            num_layers: int, max_len: int, mlp_ratio: int, causal: bool) -> jax.Array:
  """Embeddings, blocks and final LayerNorm -> `[B, T, D]`.

  A plain function called from a compact `__call__`: the layers it creates attach to
  the calling model, so paths read `block_0/attn/query`, not `encoder/block_0/...`.
  """
  seq_len = tokens_BxT.shape[1]
  if seq_len > max_len:
    raise ValueError(f"sequence length {seq_len} exceeds max_len={max_len}")
  tok_BxTxD = nn.Embed(vocab_size, d_model, embedding_init=_EMBED_INIT,
                       name="token_embed")(tokens_BxT)
  pos_1xTxD = nn.Embed(max_len, d_model, embedding_init=_EMBED_INIT,
                       name="pos_embed")(jnp.arange(seq_len)[None, :])
  x_BxTxD = tok_BxTxD + pos_1xTxD
  for i in range(num_layers):
    x_BxTxD = TransformerBlock(num_heads, causal, mlp_ratio, name=f"block_{i}")(x_BxTxD)
  return nn.LayerNorm(name="ln_f")(x_BxTxD)


class GPT(nn.Module):
  """GPT-style causal language model over bytes (untied input/output embeddings).

  Attributes:
    vocab_size: tokens in and logits out (256 for bytes).
    d_model, num_heads, num_layers, mlp_ratio: transformer size.
    max_len: longest sequence (size of the learned position table).

  Module paths: `token_embed`, `pos_embed`, `block_{i}/...`, `ln_f`, `head`.
  """

  vocab_size: int = 256
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  max_len: int = 256
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Maps int tokens `[B, T]` (T <= max_len) to next-token logits `[B, T, vocab]`."""
    x_BxTxD = _encode(tokens_BxT, vocab_size=self.vocab_size, d_model=self.d_model,
                      num_heads=self.num_heads, num_layers=self.num_layers,
                      max_len=self.max_len, mlp_ratio=self.mlp_ratio, causal=True)
    return nn.Dense(self.vocab_size, name="head")(x_BxTxD)


class BERT(nn.Module):
  """BERT-style bidirectional encoder with a sequence classifier (pre-norm blocks).

  No padding mask: every position attends to every other, so inputs are expected to
  be full-length token windows (as the byte datasets produce).

  Attributes:
    num_classes: classifier logits.
    vocab_size: input tokens (256 for bytes).
    d_model, num_heads, num_layers, mlp_ratio: transformer size.
    max_len: longest sequence (size of the learned position table).

  Module paths: `token_embed`, `pos_embed`, `block_{i}/...`, `ln_f`, `classifier`.
  """

  num_classes: int
  vocab_size: int = 256
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  max_len: int = 256
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Maps int tokens `[B, T]` to `[B, num_classes]` logits of the mean-pooled states."""
    x_BxTxD = _encode(tokens_BxT, vocab_size=self.vocab_size, d_model=self.d_model,
                      num_heads=self.num_heads, num_layers=self.num_layers,
                      max_len=self.max_len, mlp_ratio=self.mlp_ratio, causal=False)
    pooled_BxD = jnp.mean(x_BxTxD, axis=1)
    return nn.Dense(self.num_classes, name="classifier")(pooled_BxD)
