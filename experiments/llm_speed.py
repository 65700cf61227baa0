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

from absl import app, flags
from ml_collections import config_flags

from experiments.pretrained.speed import measure

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/smollm2.py",
                                          lock_config=False)
_VARIANTS = flags.DEFINE_list("variants", ["float", "w8", "w4_g128_rtn", "w8a8"],
                              "Variants of the config file to time.")
_DECODE = flags.DEFINE_integer("decode_tokens", 32, "Timed decode steps.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed prefills per variant.", lower_bound=1)
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line per variant.")


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
