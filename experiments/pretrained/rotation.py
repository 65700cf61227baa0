"""QuaRot-style rotation of a float Llama (Ashkboos et al. 2024, "QuaRot: Outlier-Free
4-Bit Inference in Rotated LLMs"): the same function, with activations that quantize
better.

`rotate(model, params, seed)` returns `(rotated model, rotated params)` computing the same
logits up to float rounding. With Q an orthogonal D×D matrix (a random Hadamard,
H_D · diag(±1); D = hidden_size), the steps on the `[in, out]` Flax kernels are:

1. Fold every RMSNorm scale g into the linears that read the norm's output, and set the
   scale to 1: W_q,k,v ← diag(g_attn) W, W_gate,up ← diag(g_mlp) W, and the head
   W_head ← diag(g_final) Eᵀ. (RMSNorm(x) · W = (x / rms(x)) · diag(g) W.)
2. Rotate the residual stream h → h Q. An RMSNorm without scale commutes with Q, because
   rms(h Q) = rms(h) for an orthogonal Q. So: the embedding rows E ← E Q; every linear
   reading the residual (through a norm) W ← Qᵀ W (q/k/v, gate/up, head); every linear
   writing to it W ← W Q (attention `out`, `down`).
3. An online Hadamard on `down`'s input: the model multiplies it by H_F (F =
   intermediate_size) and W_down ← H_Fᵀ W_down, so down(h H_F) = down(h).
4. Values per head: W_v's columns of each KV head ← · H_dh (dh = head_dim), and the rows of
   `out` for each query head ← H_dhᵀ ·, so every head's attention output is rotated and
   rotated back inside `out` (folded, nothing online). Queries and keys are multiplied per
   head by H_dh online after RoPE (the model's `hadamard=True`; q kᵀ is unchanged), so the
   cached keys and values are the rotated ones.

The embedding is no longer the head: the lookup needs E Q, the head Qᵀ diag(g_final) Eᵀ,
and diag(g_final) does not commute with Q. The rotated model therefore has an untied
`lm_head` (`tie_embeddings=False`), one more vocab × D matrix.

QuaRot also applies an online Hadamard across heads before `out` (H_heads ⊗ H_dh); with
9 heads (no Hadamard of order 9) only the per-head part (step 4) is done here.
Everything is computed in float64 and stored as float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import numpy as np

from experiments.models import hadamard
from experiments.models.llama import Llama


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
  """H_n · diag(s), s uniform random signs (seeded): an orthogonal n×n matrix, float64."""
  signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
  return hadamard.matrix(n) * signs[None, :]


def _per_head(n_heads: int, h: np.ndarray) -> np.ndarray:
  """The block-diagonal matrix with `n_heads` copies of h."""
  return np.kron(np.eye(n_heads), h)


def rotate(model: Llama, params: Dict[str, Any], seed: int = 0) -> Tuple[Llama, Dict]:
  """(model with `hadamard=True` and an untied head, its other fields kept (KV cache
  settings), rotated float32 params) computing the same function as `model` on `params`
  (module docstring). `params` is the float
  `'params'` collection of an unrotated Llama (tied or untied head); it is not modified.
  """
  if not isinstance(model, Llama):
    raise TypeError(f"rotate: model must be an experiments.models.llama.Llama, got "
                    f"{type(model).__name__}")
  if model.hadamard:
    raise ValueError("rotate: the model already has hadamard=True (rotated twice?)")
  c = model.config
  d, f, dh = c.hidden_size, c.intermediate_size, c.head_dim
  q_rot = random_hadamard(d, seed)
  h_f, h_dh = hadamard.matrix(f), hadamard.matrix(dh)
  get = lambda *path: np.asarray(_lookup(params, path), np.float64)
  out: Dict[str, Any] = {}
  embed = get("token_embed", "embedding")  # [V, D]
  head = embed.T if c.tie_embeddings else get("lm_head", "kernel")  # [D, V]
  out["token_embed"] = {"embedding": embed @ q_rot}
  out["lm_head"] = {"kernel": q_rot.T @ (get("final_norm", "scale")[:, None] * head)}
  out["final_norm"] = {"scale": np.ones(d)}
  for i in range(c.num_layers):
    b = f"block_{i}"
    g_attn = get(b, "attn_norm", "scale")[:, None]
    g_mlp = get(b, "mlp_norm", "scale")[:, None]
    reads = lambda g, *path: q_rot.T @ (g * get(b, *path, "kernel"))
    out[b] = {
        "attn_norm": {"scale": np.ones(d)},
        "mlp_norm": {"scale": np.ones(d)},
        "attn": {
            "query": {"kernel": reads(g_attn, "attn", "query")},
            "key": {"kernel": reads(g_attn, "attn", "key")},
            "value": {"kernel": reads(g_attn, "attn", "value") @ _per_head(c.num_kv_heads, h_dh)},
            "out": {"kernel": _per_head(c.num_heads, h_dh).T @ get(b, "attn", "out", "kernel")
                              @ q_rot},
        },
        "mlp": {
            "gate": {"kernel": reads(g_mlp, "mlp", "gate")},
            "up": {"kernel": reads(g_mlp, "mlp", "up")},
            "down": {"kernel": h_f.T @ get(b, "mlp", "down", "kernel") @ q_rot},
        },
    }
  rotated = model.clone(config=dataclasses.replace(c, tie_embeddings=False), hadamard=True)
  return rotated, _to_float32(out)


def _lookup(params, path):
  node = params
  for i, key in enumerate(path):
    if key not in node:
      raise KeyError(f"rotate: params have no {'/'.join(path[:i + 1])!r}; expected the "
                     "'params' collection of an experiments.models.llama.Llama")
    node = node[key]
  return node


def _to_float32(tree):
  if isinstance(tree, dict):
    return {k: _to_float32(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)
