r"""Batch-1 decode tokens/s, 512-token prefill time and weight bytes of SmolLM2 variants,
measured side by side in one process (so the ratios share the machine's state).

    python -m experiments.llm_speed --config=configs/smollm2.py \
        --variants=float,w8,w4_g128_rtn,w8a8 [--decode_tokens=32 --repeats=3]

For each variant: the serving model (`jq.convert`), a jitted forward of one 512-token
window, and `--decode_tokens` greedy decode steps through a fixed-size KV cache
(`experiments/pretrained/decode.py`). Every variant is built and compiled first; then
`--repeats` rounds time each variant in turn (so a change in the machine's load hits all
of them alike), and the table gives the medians. Bytes are `jq.size_report`'s stored bytes.
Prints one markdown table (and `--json` one object per variant).
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from experiments.config_file import load_config_module
from experiments.pretrained import decode, llm_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/smollm2.py",
                                          lock_config=False)
_VARIANTS = flags.DEFINE_list("variants", ["float", "w8", "w4_g128_rtn", "w8a8"],
                              "Variants of the config file to time.")
_DECODE = flags.DEFINE_integer("decode_tokens", 32, "Timed decode steps.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed prefills per variant.", lower_bound=1)
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line per variant.")


def measure(config, config_path, variants, decode_tokens=32, repeats=3):
  """[{variant, prefill_512_s, decode_tokens_per_s, weight_bytes, bits_per_weight}]."""
  module = load_config_module(config_path.split(":")[0])
  model, params, gg = llm_run.load_model(config)
  tok = gg.tokenizer()
  ids = np.asarray(llm_run.text_ids(tok, config)[:512], np.int32)[None]
  built = {}
  for variant in variants:
    c = module.get_config(variant)
    rules = module.rules(c)
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


def main(argv):
  """Measures the variants and prints the table."""
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  rows = measure(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]),
                 _VARIANTS.value, _DECODE.value, _REPEATS.value)
  base = rows[0]
  print(f"| variant | prefill 512 tok (s) | vs {base['variant']} | decode tok/s | vs "
        f"{base['variant']} | weight bytes | bits/weight |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['prefill_512_s']:.2f} | "
          f"{r['prefill_512_s'] / base['prefill_512_s']:.2f}x | "
          f"{r['decode_tokens_per_s']:.2f} | "
          f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
          f"{r['weight_bytes']:,} | {r['bits_per_weight']:.2f} |")
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))


if __name__ == "__main__":
  app.run(main)
