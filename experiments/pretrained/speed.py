"""Timing SmolLM2 variants side by side (what `experiments.llm_speed` prints): every
variant built and compiled first, then timed in rounds so load changes hit all alike."""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from experiments.config_file import load_config_module
from experiments.pretrained import decode, llm_run


def measure(config, config_path, variants, decode_tokens=32, repeats=3):
  """[{variant, prefill_512_s, decode_tokens_per_s, weight_bytes, bits_per_weight}]."""
  module = load_config_module(config_path.split(":")[0])
  model, params, gg = llm_run.load_model(config)
  tok = gg.tokenizer()
  ids = np.asarray(llm_run.text_ids(tok, config)[:512], np.int32)[None]
  built = {}
  for variant in variants:
    c = module.get_config(variant)
    rules = llm_run.recipe_rules(c)
    calib = llm_run.calibration_batches(tok, c) if llm_run.needs_calibration(rules) else [ids]
    smodel, svars = llm_run.quantize(model, params, rules, calib, progress=False)
    forward = jax.jit(smodel.apply)
    forward(svars, ids).block_until_ready()  # compile
    gen = decode.Generator(smodel, svars, cache_size=ids.shape[1] + decode_tokens + 1)
    gen.generate(ids[0, :16].tolist(), 3)  # compile prefill and step
    built[variant] = (forward, svars, gen)
  prefill = {v: [] for v in variants}
  speed = {v: [] for v in variants}
  for _ in range(repeats):  # rounds over the variants, so load changes hit them alike
    for variant, (forward, svars, gen) in built.items():
      t0 = time.perf_counter()
      forward(svars, ids).block_until_ready()
      prefill[variant].append(time.perf_counter() - t0)
      speed[variant].append(gen.generate(ids[0, :16].tolist(), decode_tokens + 1)
                            ["tokens_per_s"])
  rows = []
  for variant, (_, svars, _) in built.items():
    bpw, nbytes = llm_run.bits_per_weight(svars)
    rows.append({"variant": variant, "prefill_512_s": statistics.median(prefill[variant]),
                 "decode_tokens_per_s": statistics.median(speed[variant]),
                 "weight_bytes": nbytes["quantized"], "bits_per_weight": bpw})
    print(f"  {variant}: {rows[-1]}", flush=True)
  return rows
