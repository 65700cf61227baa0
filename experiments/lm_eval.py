r"""Perplexity of a (quantized) llama GGUF model on a text, as a sweep trainer.

    python -m experiments.lm_eval --config=configs/smollm2.py:w8 --workdir=DIR \
        [--config.eval.text_file=PATH] [--config.eval.max_tokens=16384] [--config.eval.window=512]

Loads the GGUF (dequantized to float32), quantizes the recipe's variant (its rules'
PTQ statistics calibrated on the recipe's calibration split), scores the first
`eval.max_tokens` tokens of the text in non-overlapping windows
(`experiments/pretrained/perplexity.py` gives the method) and writes DIR/summary.json
through the one summary writer (`experiments.training.results.write_summary`: a temp
file renamed over the old one, so a failed run leaves the previous summary intact):
`perplexity`, `num_tokens`, `bits_per_weight` (stored bits of every parameter / their
count) and `kv_cache_bytes_per_token` (what a KV cache of the variant's `kv_bits` /
`kv_key_group` stores per token: codes and scales, from the `nbytes` of an empty cache
of one window, `experiments.models.llama.cache_bytes`) at the top level and in
`metrics`, plus `config`, `param_bytes`, `kv_cache_fixed_bytes` (the float residual of
per-channel keys, per sequence), `wall_time_s`.
`experiments.sweep --trainer=experiments.lm_eval` runs the variants and
`experiments.report --metric=perplexity` tables them.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from experiments.models import llama
from experiments.pretrained import llm_run, perplexity
from experiments.training import config_build
from experiments.training.results import write_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/smollm2.py:VARIANT",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


def evaluate(config, overrides=(), progress: bool = True):
  """The summary dict of one run (nothing written); `overrides` are the command line's
  `--config.KEY` overrides (a `variant` override is refused)."""
  start = time.time()
  rules = llm_run.recipe_rules(config, overrides)
  model, params, gg = llm_run.load_model(config)
  tok = gg.tokenizer()
  bos = gg.bos_id if gg.add_bos else None
  ids = llm_run.text_ids(tok, config)
  wins = perplexity.windows(ids, int(config.eval.window), bos_id=bos)
  calib = llm_run.calibration_batches(tok, config, bos) if rules else []
  smodel, svars = llm_run.quantize(model, params, rules, calib, progress=progress)
  forward = jax.jit(smodel.apply)
  logits = lambda x: np.asarray(forward(svars, x))
  report = (lambda d, n: print(f"  {d}/{n} windows", flush=True)) if progress else None
  result = perplexity.evaluate(logits, wins, int(config.eval.batch_size), report)
  bpw, param_bytes = llm_run.bits_per_weight(svars)
  kv = llama.cache_bytes(llama.init_cache(
      model.config, 1, min(int(config.eval.window), model.config.max_position),
      kv_bits=model.kv_bits, kv_key_group=model.kv_key_group))
  metrics = {**{k: float(v) for k, v in result.items()}, "bits_per_weight": bpw,
             "kv_cache_bytes_per_token": kv["per_token"]}
  return {"config": config_build.config_to_dict(config), "metrics": metrics,
          "param_bytes": param_bytes,
          "perplexity": metrics["perplexity"], "num_tokens": int(result["num_tokens"]),
          "bits_per_weight": bpw, "kv_cache_bytes_per_token": kv["per_token"],
          "kv_cache_fixed_bytes": kv["fixed"], "bos_added": bos is not None,
          "gguf": os.path.basename(gg.path), "quantized": bool(rules),
          "wall_time_s": round(time.time() - start, 3)}


def main(argv):
  """Evaluates one variant and writes WORKDIR/summary.json."""
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  summary = evaluate(config, config_flags.get_override_values(flags.FLAGS["config"]))
  os.makedirs(workdir, exist_ok=True)
  write_summary(workdir, summary)
  print({k: summary[k] for k in ("perplexity", "num_tokens", "bits_per_weight",
                                 "kv_cache_bytes_per_token", "kv_cache_fixed_bytes",
                                 "wall_time_s")}, flush=True)


if __name__ == "__main__":
  app.run(main)
