r"""Why rotation can hurt round-to-nearest weights: the residual stream's energy per channel
against the RMSNorm scale there, and weight-only int4 with and without rotation.

    python -m experiments.pretrained.rotation_check --stats_tokens=256 --ppl_tokens=512

For each listed block, with e_k the mean of (x/rms(x))_k² over tokens at the input of
`mlp_norm` and g its scale, it prints the top-3 channels' share of Σ e_k, their g, and
the factor (Σ_k e_k)(mean_k g_k²) / Σ_k e_k g_k²: how much more energy the linears'
inputs carry along the weight error's directions after rotation (a weight error spread
evenly over the rows of Qᵀ·diag(g)·W meets the whole Σ e_k; unrotated, each row's error
meets e_k g_k²). Then the perplexity of int4 symmetric RTN weights (the `w4a8` groups,
no activation quantization, embedding and head float) of the float and the rotated model
on the first `ppl_tokens` tokens of the evaluation text.
"""
from __future__ import annotations

from absl import app, flags
import jax
import numpy as np

import jaxquant as jq
from configs import smollm2
from experiments.pretrained import gguf_llama, llm_run, perplexity, rotation

_STATS_TOKENS = flags.DEFINE_integer("stats_tokens", 256, "tokens for the channel energies")
_PPL_TOKENS = flags.DEFINE_integer("ppl_tokens", 512, "tokens for the W4 perplexities")
_BLOCKS = flags.DEFINE_list("blocks", ["0", "5", "10", "15", "20", "25", "29"], "blocks")


def channel_stats(model, params, ids, block: int):
  """(top-3 channel shares of the energy, g at them, amplification factor) at the input
  of block `block`'s `mlp_norm` (module docstring)."""
  _, state = model.apply({"params": params}, ids, capture_intermediates=True,
                         mutable=["intermediates"])
  g = np.asarray(params[f"block_{block}"]["mlp_norm"]["scale"], np.float64)
  out = np.asarray(state["intermediates"][f"block_{block}"]["mlp_norm"]["__call__"][0],
                   np.float64)[0]
  e = ((out / g) ** 2).mean(0)  # norm output / g = x / rms(x)
  top = np.argsort(e)[::-1][:3]
  return e[top] / e.sum(), g[top], e.sum() * (g ** 2).mean() / (e * g ** 2).sum()


def w4_rules():
  """int4 symmetric RTN weights in the `w4a8` groups, nothing else quantized."""
  def spec(group):
    return jq.QuantSpec(bits=4, granularity="group", group_size=group)
  return [jq.Rule(smollm2.K576, weight=spec(192)), jq.Rule(smollm2.K1536, weight=spec(128))]


def main(argv):
  """Prints the channel statistics and the two weight-only perplexities."""
  del argv
  model, params, gg = gguf_llama.load(None)
  config = smollm2.get_config("float")
  config.eval.max_tokens = _STATS_TOKENS.value
  ids = np.asarray(llm_run.text_ids(gg.tokenizer(), config))[None]
  for b in (int(x) for x in _BLOCKS.value):
    shares, g, factor = channel_stats(model, params, ids, b)
    print(f"block {b}: top-3 energy shares {np.round(shares, 3).tolist()}, g there "
          f"{np.round(g, 4).tolist()}, amplification {factor:.2f}", flush=True)
  config.eval.max_tokens = _PPL_TOKENS.value
  wins = perplexity.windows(llm_run.text_ids(gg.tokenizer(), config), 512)
  rmodel, rparams = rotation.rotate(model, params)
  for name, m, p in [("unrotated", model, params), ("rotated", rmodel, rparams)]:
    smodel, svars = llm_run.quantize(m, p, w4_rules(), [np.asarray(wins[0])[None]],
                                     progress=False)
    forward = jax.jit(smodel.apply)
    ppl = perplexity.evaluate(lambda x: np.asarray(forward(svars, x)), wins, 4)["perplexity"]
    print(f"w4 weight-only, {name}: perplexity {ppl:.3f} on {_PPL_TOKENS.value} tokens",
          flush=True)


if __name__ == "__main__":
  app.run(main)
