"""all-MiniLM-L6-v2 as an integer-only program (`jq.to_integer`): token ids in, int32
pooled sums out, no float op in between.

`IdsMiniLM` is `minilm.MiniLM`'s encoder with the same parameters and module paths,
taking only the token ids: the padding mask is `ids != [PAD]` (the tokenizer pads with
[PAD] and never emits it inside a sentence, so this is the mask `MiniLM` is given), and
it returns the masked sum Σ_t m_t·h_t instead of the unit-norm mean. The mean's 1/Σm and
the L2 normalization are one positive factor per sentence, so they are left to the
documented final dequantization (`embed`): e = y/‖y‖ of the int32 output y (the program's
output scale cancels), the only float step after the input ids.

Every layer is W8A8 (per-channel int8 weights, int8 per-tensor activation grids measured
on the calibration sentences), the residual stream into each LayerNorm int16
(`residual_bits=16`); the word / position / type tables are int8 per column
(ops/embed.py); LayerNorm, softmax and GELU are the integer kernels of ops/norm.py and
I-BERT's i-softmax / i-GELU (ops/softmax.py, ops/gelu.py).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from experiments.pretrained import minilm


class IdsMiniLM(nn.Module):
  """Masked sums Σ_t m_t·h_L[t] `[B, D]` of int32 token ids `[B, T]` (m = ids ≠ pad)."""
  config: minilm.MiniLMConfig = minilm.MiniLMConfig()
  pad_id: int = 0

  @nn.compact
  def __call__(self, ids_BxT):
    mask_BxT = (ids_BxT != self.pad_id).astype(jnp.float32)
    h_BxTxD = minilm.hidden_states(self.config, ids_BxT, mask_BxT)
    return jnp.sum(h_BxTxD * mask_BxT[:, :, None], axis=1)


def pad_to(tok, sentences: Sequence[str], length: int) -> np.ndarray:
  """int32 ids [N, length] of the sentences (truncated to the tokenizer's max length,
  then padded with [PAD]); a ValueError when a sentence has more than `length` tokens."""
  ids = tok.token_ids(list(sentences))
  longest = max(len(i) for i in ids)
  if longest > length:
    raise ValueError(f"a sentence has {longest} tokens, more than the program's {length}")
  out, _ = tok.pad(ids, length)
  return np.asarray(out, np.int32)


def build(model: minilm.MiniLM, params, tok, calib_sentences: Sequence[str], *,
          length: int, batch_size: int = 64, residual_bits: int = 16) -> jq.IntegerProgram:
  """The integer program of `model` for ids [*, length], ranges measured on
  `calib_sentences` (the PTQ rows' calibration split); the residual stream into each
  LayerNorm as int16 codes unless `residual_bits=8` (`jq.to_integer`'s option: the
  residual sums hold one outlier channel, on which an int8 grid rounds the others away)."""
  ids = pad_to(tok, calib_sentences, length)
  batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
  return jq.to_integer(IdsMiniLM(model.config, tok.pad_id), {"params": params}, batches,
                       residual_bits=residual_bits)


def numpy_runner(program: jq.IntegerProgram):
  """`ids -> int32` through jaxquant/deploy/numpy_runtime.py (numpy only), the program
  handed over as its graph and arrays."""
  from jaxquant.deploy import numpy_runtime  # pylint: disable=import-outside-toplevel
  graph = program.graph
  loaded = {"graph": {"input": dict(graph.input), "output": dict(graph.output),
                      "ops": [dict(op) for op in graph.ops]},
            "arrays": dict(graph.arrays)}
  return lambda ids: numpy_runtime.run(loaded, np.asarray(ids, np.int32))


def embed(program: jq.IntegerProgram, tok, sentences: Sequence[str], *,
          batch_size: int = 64, runner=None) -> np.ndarray:
  """float32 [N, D] unit-norm embeddings: the int32 program output y per sentence, then
  the final dequantization e = y/‖y‖ (the one float step). `runner(ids) -> int32`
  replaces `program.run` (e.g. the numpy runtime)."""
  length = program.input_shape[0]
  ids = pad_to(tok, sentences, length)
  run = runner or (lambda x: np.asarray(program.run(x)))
  ys = [np.asarray(run(ids[i:i + batch_size])) for i in range(0, len(ids), batch_size)]
  y = np.concatenate(ys).astype(np.float64)  # --- float from here on: the final step
  return (y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-30)).astype(np.float32)
