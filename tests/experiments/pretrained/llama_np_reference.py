"""An independent numpy Llama forward on GGUF-named tensors, in llama.cpp's convention.

Imports numpy only (no jax, no flax, nothing from experiments/): the Flax model is checked
against it. It works on the tensors as the GGUF file stores them (`[out, in]`, Q/K rows in
GGML's interleaved RoPE order) and applies RoPE to the interleaved pairs (x[2i], x[2i+1])
of each head, as llama.cpp's `ggml_rope` (mode 0) does, so the loader's row un-permutation
and the model's rotate-half RoPE are both tested against the file's own convention.
"""
import numpy as np


def rms_norm(x, w, eps):
  """x / sqrt(mean(x²) + eps) · w over the last axis (float64)."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x_TxHxK, pos_T, theta):
  """Rotates (x[2i], x[2i+1]) of every head by pos · theta^(−2i/K)."""
  k = x_TxHxK.shape[-1]
  inv = theta ** (-np.arange(0, k, 2, dtype=np.float64) / k)
  ang = pos_T[:, None, None] * inv[None, None, :]
  even, odd = x_TxHxK[..., 0::2], x_TxHxK[..., 1::2]
  out = np.empty_like(x_TxHxK)
  out[..., 0::2] = even * np.cos(ang) - odd * np.sin(ang)
  out[..., 1::2] = even * np.sin(ang) + odd * np.cos(ang)
  return out


def kv_quant(x_TxHxK, bits):
  """Symmetric round-to-nearest per (token, head): scale = absmax / (2^(b−1) − 1)."""
  qmax = 2 ** (bits - 1) - 1
  s = np.abs(x_TxHxK).max(axis=-1, keepdims=True).astype(np.float32) / np.float32(qmax)
  s = np.where(s == 0, 1, s)
  return np.clip(np.round(x_TxHxK / s), -qmax, qmax) * s


def key_groups_quant(k_TxHxK, bits, group):
  """KIVI keys: symmetric round-to-nearest per (channel, head) over each run of `group`
  consecutive tokens (the last run may be shorter); scale = absmax / (2^(b−1) − 1)."""
  qmax = 2 ** (bits - 1) - 1
  out = np.empty_like(k_TxHxK)
  for j in range(0, k_TxHxK.shape[0], group):
    run = k_TxHxK[j:j + group]
    s = np.abs(run).max(axis=0, keepdims=True).astype(np.float32) / np.float32(qmax)
    s = np.where(s == 0, 1, s)
    out[j:j + group] = np.clip(np.round(run / s), -qmax, qmax) * s
  return out


def block(t, i, x_TxD, cfg):
  """One llama block on `[T, D]` states; `t` maps GGUF names to float arrays.
  `cfg['kv_bits']` (optional, 8 or 4) quantizes keys (after RoPE) and values;
  `cfg['kv_key_group']` = G > 0 quantizes keys per channel over runs of G tokens, a
  query at p reading the key at s quantized only once s's run ended at or before p
  (float otherwise, as a cache written token by token holds it; with
  `cfg['kv_key_requant']` quantized with the absmax of the run's keys up to p)."""
  p = f"blk.{i}."
  n_h, n_kv, eps, theta = cfg["heads"], cfg["kv_heads"], cfg["eps"], cfg["theta"]
  steps, d = x_TxD.shape
  dh = d // n_h
  w = lambda n: np.asarray(t[p + n + ".weight"], np.float64)
  h = rms_norm(x_TxD, w("attn_norm"), eps)
  q = (h @ w("attn_q").T).reshape(steps, n_h, dh)
  k = (h @ w("attn_k").T).reshape(steps, n_kv, dh)
  v = (h @ w("attn_v").T).reshape(steps, n_kv, dh)
  pos = np.arange(steps, dtype=np.float64)
  q, k = rope_interleaved(q, pos, theta), rope_interleaved(k, pos, theta)
  group = cfg.get("kv_key_group", 0)
  k_read = k
  if cfg.get("kv_bits"):
    v = kv_quant(v, cfg["kv_bits"])
    k_read = key_groups_quant(k, cfg["kv_bits"], group) if group else kv_quant(k, cfg["kv_bits"])
  ctx = np.zeros((steps, n_h, dh))
  causal = np.tril(np.ones((steps, steps), bool))
  for head in range(n_h):
    kv = head // (n_h // n_kv)
    s = q[:, head] @ k_read[:, kv].T / np.sqrt(dh)
    for query in range(steps) if group else ():  # keys of the query's unfinished run
      first = query // group * group
      if (query + 1) % group:
        own = k[first:query + 1, kv]
        if cfg.get("kv_key_requant"):  # quantized with the run's absmax so far
          own = key_groups_quant(own[:, None], cfg["kv_bits"], group)[:, 0]
        s[query, first:query + 1] = q[query, head] @ own.T / np.sqrt(dh)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(axis=1, keepdims=True))
    ctx[:, head] = (s / s.sum(axis=1, keepdims=True)) @ v[:, kv]
  x_TxD = x_TxD + ctx.reshape(steps, d) @ w("attn_output").T
  h = rms_norm(x_TxD, w("ffn_norm"), eps)
  g = h @ w("ffn_gate").T
  return x_TxD + ((g / (1 + np.exp(-g))) * (h @ w("ffn_up").T)) @ w("ffn_down").T


def forward(t, ids_T, cfg):
  """Logits `[T, vocab]` (float64) of one sequence; tied head unless 'output.weight'."""
  emb = np.asarray(t["token_embd.weight"], np.float64)
  x = emb[np.asarray(ids_T)]
  for i in range(cfg["layers"]):
    x = block(t, i, x, cfg)
  x = rms_norm(x, np.asarray(t["output_norm.weight"], np.float64), cfg["eps"])
  head = np.asarray(t.get("output.weight", emb), np.float64)
  return x @ head.T


def perplexity(logits_TxV, ids_T):
  """exp(mean NLL) of ids[1:] under logits[:-1] (the first token unscored)."""
  z = logits_TxV[:-1]
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  nll = -logp[np.arange(len(ids_T) - 1), np.asarray(ids_T)[1:]]
  return float(np.exp(nll.mean()))
